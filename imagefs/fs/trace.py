"""The access trace of a mount: which files and chunks were first touched, in order.

Recording is a set lookup and, the first time only, a tuple appended to a list, so it stays on.
Paths and digests are filled in only when the trace is dumped. The trace feeds prefetch profiles.
"""
from __future__ import annotations

import time
from typing import Any

from imagefs.index import ROOT_INO, ImageIndex

DEFAULT_LIMIT = 1_000_000

FILE = "file"
CHUNK = "chunk"


class AccessTrace:
    """First touches of inodes (on open) and chunks (on read), with monotonic timestamps."""

    def __init__(self, limit: int = DEFAULT_LIMIT, clock: Any = time.monotonic_ns) -> None:
        self.limit = limit
        self.truncated = False
        self._clock = clock
        self._start = clock()
        self._files: set[int] = set()
        self._chunks: set[int] = set()
        # (nanoseconds since start, kind, inode, chunk number or -1, file offset or -1)
        self.events: list[tuple[int, str, int, int, int]] = []

    def file(self, ino: int) -> None:
        if ino not in self._files:
            self._files.add(ino)
            self._add(FILE, ino, -1, -1)

    def chunk(self, chunk: int, ino: int, file_offset: int) -> None:
        if chunk not in self._chunks:
            self._chunks.add(chunk)
            self._add(CHUNK, ino, chunk, file_offset)

    def _add(self, kind: str, ino: int, chunk: int, offset: int) -> None:
        if len(self.events) >= self.limit:
            self.truncated = True
            return
        self.events.append((self._clock() - self._start, kind, ino, chunk, offset))

    def __len__(self) -> int:
        return len(self.events)

    def dump(self, index: ImageIndex) -> list[dict[str, Any]]:
        """The events as JSON-ready dicts with paths and chunk digests."""
        paths = paths_by_inode(index, {e[2] for e in self.events})
        out: list[dict[str, Any]] = []
        for t_ns, kind, ino, chunk, offset in self.events:
            doc: dict[str, Any] = {"t": t_ns / 1e9, "kind": kind, "ino": ino,
                                   "path": paths.get(ino, b"").decode("utf-8", "surrogateescape")}
            if kind == CHUNK:
                doc.update(chunk=index.chunks[chunk], size=index.chunk_sizes[chunk], offset=offset)
            out.append(doc)
        return out


def paths_by_inode(index: ImageIndex, wanted: set[int]) -> dict[int, bytes]:
    """The first path (in tree order) of each wanted inode."""
    found: dict[int, bytes] = {}
    if ROOT_INO in wanted:
        found[ROOT_INO] = b"/"
    for path, ino in index.walk():
        if ino in wanted and ino not in found:
            found[ino] = path
            if len(found) == len(wanted):
                break
    return found

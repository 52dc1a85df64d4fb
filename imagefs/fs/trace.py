"""The access trace of a mount: which files and chunks were first touched, in order, and which
byte ranges of each chunk were read; also which names the kernel looked up (found or not) and
which directories it listed, in order: the kernel asks each only once, as its caches keep the
answers (entry and listing timeouts are long), so these are the round trips a start-up waits for.

Recording is a set lookup and, the first time only, a tuple appended to a list; the ranges read
of a chunk grow in place while reads go on from where the last one ended. It stays on. Paths and
digests are filled in only when the trace is dumped. The trace feeds prefetch profiles (the ranges
their read-set packs: imagefs.profile).
"""
from __future__ import annotations

import time
from typing import Any, Iterable

from imagefs.index import ROOT_INO, ImageIndex

DEFAULT_LIMIT = 1_000_000
SPAN_GAP = 32 * 1024  # ranges of a chunk closer than this are kept as one
# Ranges kept in all (about 150 bytes each): a start-up needs a few hundred (`import torch`: 350);
# a long-lived random reader would otherwise grow the list for as long as it runs.
SPAN_LIMIT = 100_000
# Names kept (lookups and listings): `import torch` makes about 2,000; a process that looks up
# ever new names (say, probing for files that do not exist) stops growing the trace here.
NAME_LIMIT = 100_000

FILE = "file"
CHUNK = "chunk"
LOOKUP = "lookup"  # inode: the directory; the name is kept aside (AccessTrace.names)
LIST = "list"  # inode: the directory listed
NAME_KINDS = frozenset({LOOKUP, LIST})


# Names looked up only to see whether a mount answers (imagefs.fs.mounts.probe_answer),
# random after the prefix so the kernel never has them cached:
# the model leaves them out of the trace.
PROBE_PREFIX = b".coldstart-probe-"


class AccessTrace:
    """First touches of inodes (on open), chunks (on read) and names (on lookup and listing),
    with monotonic timestamps."""

    def __init__(self, limit: int = DEFAULT_LIMIT, clock: Any = time.monotonic_ns,
                 span_limit: int = SPAN_LIMIT, name_limit: int = NAME_LIMIT) -> None:
        self.limit = limit
        self.span_limit = span_limit
        self.name_limit = name_limit
        self.truncated = False
        self._clock = clock
        self._start = clock()
        self._files: set[int] = set()
        self._chunks: set[int] = set()
        self._spans: dict[int, list[list[int]]] = {}  # chunk -> [start, end) ranges read, in read order
        self._span_count = 0
        self._looked_up: set[tuple[int, bytes]] = set()
        self._listed: set[int] = set()
        self.names: list[bytes] = []  # the names of LOOKUP events, which hold their position here
        # (nanoseconds since start, kind, inode, chunk number or -1 (LOOKUP: position in names),
        # file offset or -1)
        self.events: list[tuple[int, str, int, int, int]] = []

    def file(self, ino: int) -> None:
        if ino not in self._files:
            self._files.add(ino)
            self._add(FILE, ino, -1, -1)

    def read(self, chunk: int, offset: int, length: int, ino: int, file_offset: int) -> None:
        """length bytes at offset of chunk number chunk were read (as file_offset of inode ino)."""
        spans = self._spans.get(chunk)
        if spans is None:
            self._chunks.add(chunk)
            self._add(CHUNK, ino, chunk, file_offset)
            self._spans[chunk] = [[offset, offset + length]]
            self._span_count += 1
            return
        last, end = spans[-1], offset + length
        if last[0] <= offset <= last[1] + SPAN_GAP:
            last[1] = max(last[1], end)
        elif self._span_count < self.span_limit:
            spans.append([offset, end])
            self._span_count += 1
        else:
            self.truncated = True

    def lookup(self, parent: int, name: bytes) -> None:
        """The kernel asked for name in directory parent (whether or not it exists)."""
        key = (parent, name)
        if key in self._looked_up or not self._room_for_name():
            return
        self._looked_up.add(key)
        if self._add(LOOKUP, parent, len(self.names), -1):
            self.names.append(name)

    def listing(self, ino: int) -> None:
        """The kernel read directory ino from its start."""
        if ino in self._listed or not self._room_for_name():
            return
        self._listed.add(ino)
        self._add(LIST, ino, -1, -1)

    def _room_for_name(self) -> bool:
        if len(self._looked_up) + len(self._listed) < self.name_limit:
            return True
        self.truncated = True
        return False

    def spans(self, chunk: int) -> list[tuple[int, int]]:
        """The ranges read of a chunk as sorted, merged (offset, length) pairs."""
        return merge_spans((a, b - a) for a, b in self._spans.get(chunk, ()))

    def _add(self, kind: str, ino: int, chunk: int, offset: int) -> bool:
        if len(self.events) >= self.limit:
            self.truncated = True
            return False
        self.events.append((self._clock() - self._start, kind, ino, chunk, offset))
        return True

    def __len__(self) -> int:
        return len(self.events)

    def dump(self, index: ImageIndex, kinds: frozenset[str] | None = None) -> list[dict[str, Any]]:
        """The events (of these kinds, else all) as JSON-ready dicts with paths and chunk digests."""
        events = self.events if kinds is None else [e for e in self.events if e[1] in kinds]
        paths = paths_by_inode(index, {e[2] for e in events})
        out: list[dict[str, Any]] = []
        for t_ns, kind, ino, chunk, offset in events:
            doc: dict[str, Any] = {"t": t_ns / 1e9, "kind": kind, "ino": ino,
                                   "path": paths.get(ino, b"").decode("utf-8", "surrogateescape")}
            if kind == CHUNK:
                doc.update(chunk=index.chunks[chunk], size=index.chunk_sizes[chunk], offset=offset,
                           spans=self.spans(chunk))
            elif kind == LOOKUP:  # the path looked up; "ino" stays the directory's
                doc["path"] = name_path(paths.get(ino, b""), self.names[chunk]).decode("utf-8", "surrogateescape")
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


def name_path(directory: bytes, name: bytes) -> bytes:
    return directory.rstrip(b"/") + b"/" + name


def merge_spans(spans: Iterable[tuple[int, int]], gap: int = SPAN_GAP) -> list[tuple[int, int]]:
    """(offset, length) ranges sorted, with overlapping ones and those closer than gap joined."""
    out: list[list[int]] = []
    for off, n in sorted(spans):
        if out and off <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], off + n)
        else:
            out.append([off, off + n])
    return [(a, b - a) for a, b in out]

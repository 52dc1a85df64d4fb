"""Pushing a profile's read set into the kernel's page cache as its pack arrives.

A container's first read of a page goes to the daemon and waits for the answer: for `import torch`
about 1,300 reads, each a round trip. With a read-set pack the daemon holds those bytes before they
are asked for, so it can hand them to the kernel unasked (FUSE_NOTIFY_STORE) and the reads find
them in the page cache. plan() maps each segment's parts back to the files that hold those bytes
(the regular files among the profile's looked-up names) as page-aligned runs; the daemon pushes a
segment's runs from a thread (the kernel may wait for a page a read in flight holds, and the event
loop must keep answering reads meanwhile) once the segment is at hand.
"""
from __future__ import annotations

import errno
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from imagefs.chunks import Digest
from imagefs.index import ImageIndex
from imagefs.profile import NAME_LOOKUP

PAGE = 4096


@dataclass(frozen=True)
class Run:
    """Bytes of one file to push: pieces of chunks, one after another from file offset start."""

    ino: int
    start: int
    pieces: tuple[tuple[Digest, int, int], ...]  # (chunk, offset in the chunk, length)

    @property
    def length(self) -> int:
        return sum(n for _, _, n in self.pieces)


def plan(index: ImageIndex, names: Iterable[tuple[str, str]],
         segments: Sequence[tuple[Digest, int, Sequence[tuple[Digest, int, int, int]]]]
         ) -> list[tuple[Digest, list[Run]]]:
    """For each segment (digest, size, parts as (chunk, offset, length, offset in segment)), the
    runs of the profile's files its parts fill, page-aligned (a page is pushed whole or not)."""
    holders = _holders(index, names)
    out: list[tuple[Digest, list[Run]]] = []
    for seg, _size, parts in segments:
        pieces: list[tuple[int, int, Digest, int, int]] = []  # (ino, file offset, chunk, offset, length)
        for chunk, off, n, _at in parts:
            for ino, fstart, coff, clen in holders.get(chunk, ()):
                lo, hi = max(off, coff), min(off + n, coff + clen)
                if hi > lo:
                    pieces.append((ino, fstart + lo - coff, chunk, lo, hi - lo))
        out.append((seg, _runs(index, sorted(pieces))))
    return out


def _holders(index: ImageIndex, names: Iterable[tuple[str, str]]) -> dict[str, list[tuple[int, int, int, int]]]:
    """chunk digest -> (inode, file offset of the extent, offset in the chunk, length) of each
    extent of the regular files among the names."""
    seen: set[int] = set()
    out: dict[str, list[tuple[int, int, int, int]]] = {}
    for kind, path in names:
        if kind != NAME_LOOKUP:
            continue
        ino = index.resolve(path.encode("utf-8", "surrogateescape"))
        if ino is None or ino in seen:
            continue
        seen.add(ino)
        node = index.inode(ino)
        if not node.is_reg:
            continue
        ext, pos = node.extents or [], 0
        for i in range(0, len(ext), 3):
            chunk, coff, clen = ext[i], ext[i + 1], ext[i + 2]
            out.setdefault(index.chunks[chunk], []).append((ino, pos, coff, clen))
            pos += clen
    return out


def _runs(index: ImageIndex, pieces: list[tuple[int, int, Digest, int, int]]) -> list[Run]:
    """Contiguous (or overlapping) pieces of a file joined, then trimmed to whole pages (the
    last page of a file may be short)."""
    runs: list[Run] = []
    current: tuple[int, int, int, list[tuple[Digest, int, int]]] | None = None  # ino, start, end, pieces

    def close() -> None:
        if current is not None:
            ino, start, end, group = current
            run = _trim(ino, start, end, group, index.inode(ino).size)
            if run is not None:
                runs.append(run)

    for ino, fo, chunk, off, n in pieces:
        if current is not None and current[0] == ino and fo <= current[2]:
            skip = current[2] - fo  # bytes of this piece the run already has
            if n > skip:
                current[3].append((chunk, off + skip, n - skip))
                current = (ino, current[1], fo + n, current[3])
            continue
        close()
        current = (ino, fo, fo + n, [(chunk, off, n)])
    close()
    return runs


def _trim(ino: int, start: int, end: int, group: list[tuple[Digest, int, int]], size: int) -> Run | None:
    a = -(-start // PAGE) * PAGE
    b = end if end == size else end // PAGE * PAGE
    if b <= a:
        return None
    pieces: list[tuple[Digest, int, int]] = []
    pos = start
    for chunk, off, n in group:
        lo, hi = max(pos, a), min(pos + n, b)
        if hi > lo:
            pieces.append((chunk, off + lo - pos, hi - lo))
        pos += n
    return Run(ino, a, tuple(pieces))


@dataclass
class PushStats:
    runs: int = 0
    bytes: int = 0
    not_known: int = 0  # runs of files the kernel had not looked up yet (tried again later)
    dropped: int = 0  # of those, the ones it still did not know once the names were looked up
    seconds: float = 0.0
    running: bool = False

    def as_dict(self) -> dict[str, object]:
        return {"runs": self.runs, "bytes": self.bytes, "not_known": self.not_known, "dropped": self.dropped,
                "seconds": round(self.seconds, 3), "running": self.running}


class Gate:
    """Lets the daemon stop a pushing thread before it closes the FUSE session: a push after that
    would use a session that no longer exists."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = False
        self._inside = threading.Event()  # a thread is in a push

    def enter(self) -> bool:
        with self._lock:
            if self._stopped:
                return False
            self._inside.set()
            return True

    def leave(self) -> None:
        self._inside.clear()

    def close(self, timeout: float) -> bool:
        """No push starts from now on; waits up to timeout for one under way (False if it is
        still under way: blocked on a page a read the daemon no longer answers holds, which
        ends when the session's device closes)."""
        with self._lock:
            self._stopped = True
        deadline = time.monotonic() + timeout
        while self._inside.is_set() and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._inside.is_set()


def store_runs(items: Sequence[tuple[Run, Sequence[object]]], notify: Callable[[int, int, bytes], None],
               stats: PushStats, gate: Gate) -> list[tuple[Run, list[bytes]]]:
    """Hand each run's bytes (its pieces' buffers, in order) to the kernel; the runs of inodes
    the kernel does not know (ENOENT) come back, with their bytes joined, to be tried again. Run
    in a thread: a store may wait for a page a read in flight holds. Stops when the gate closes."""
    later: list[tuple[Run, list[bytes]]] = []
    for run, views in items:
        data = b"".join(views)  # type: ignore[arg-type]
        if not gate.enter():
            break
        try:
            notify(run.ino, run.start, data)
        except OSError as e:
            if e.errno == errno.ENOENT:
                later.append((run, [data]))
                continue
            raise
        finally:
            gate.leave()
        stats.runs += 1
        stats.bytes += len(data)
    return later

"""The host chunk cache, shared by every mount and image on the machine, and a small memory tier.

On disk: ``<root>/chunks/<first two hex>/<digest>`` holds the verified, decompressed content of a
chunk. Files appear by rename of a complete temp file (written with O_DIRECT where the filesystem
takes it, see DIRECT_MIN), and every load checks the blake3 again, so a torn or rotten file is
dropped and refetched, never served (which is why no fsync is needed).
A file this process has verified (or written) is kept open (a few, LRU) and parts of it are then
read straight from the page cache without verifying again: the open descriptor pins the verified
inode, and each such read checks first that its size and mtime are still those verified (new
content arrives by rename; a file changed in place anyway is verified again before use).
Recency is the file's mtime, refreshed on a hit at most once a minute. The total is bounded:
when a process sees it exceed the budget it takes ``<root>/lock`` (flock) and deletes the least
recently used files down to 90 % of it. Several daemons may share one directory.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import blake3

from imagefs.chunks import Content, Digest, is_digest
from imagefs.errors import ImageFSError
from imagefs.regular import NotRegularFile, open_regular

log = logging.getLogger(__name__)

DEFAULT_SIZE = 10 << 30
DEFAULT_MEMORY_SIZE = 256 << 20
LOW_WATER = 0.9
TOUCH_INTERVAL = 60.0
STALE_TEMP_AGE = 3600.0
OPEN_FILES = 64  # verified chunk files kept open for reads of parts
# Chunk files are written with O_DIRECT (from DIRECT_MIN bytes on): the disk DMAs from a buffer
# that stays mapped instead of the CPU copying into freshly allocated page-cache folios, and the
# page cache does not hold a second copy of what the mount's own page cache and memory tier hold.
# Measured on the development VM (a Firecracker guest, where first touches of page-cache memory
# are slow): 375 MB of chunk files took 0.10-0.12 s of CPU that way, 2.1-2.8 s buffered.
DIRECT_ALIGN = 4096
DIRECT_MIN = 64 << 10
DIRECT_BUFFER = 1 << 20
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(text: str) -> int:
    """Bytes from '123', '512M', '10G', '1.5GiB' (binary units)."""
    m = _SIZE.fullmatch(text)
    if not m:
        raise ImageFSError(f"not a size: {text!r} (use e.g. 512M, 10G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_cache_dir() -> Path:
    """$COLDSTART_CACHE, else /var/cache/coldstart for root, else the user's cache home."""
    env = os.environ.get("COLDSTART_CACHE")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/cache/coldstart")
    home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(home) / "coldstart"


@dataclass
class DiskCounters:
    hits: int = 0
    misses: int = 0
    corrupt_dropped: int = 0
    writes: int = 0
    write_bytes: int = 0
    write_errors: int = 0
    evictions: int = 0
    evicted_files: int = 0
    evicted_bytes: int = 0
    part_reads: int = 0  # reads of parts of verified files served from the page cache


class HostCache:
    """Content-addressed chunk files under root, bounded to max_bytes, LRU by mtime."""

    def __init__(self, root: str | os.PathLike[str], max_bytes: int = DEFAULT_SIZE) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.direct_writes = True  # cleared if the filesystem refuses O_DIRECT
        self.counters = DiskCounters()
        self._chunks = self.root / "chunks"
        self._tmp = self.root / "tmp"
        self._lock_path = self.root / "lock"
        self._mutex = threading.Lock()
        self._verified: dict[str, tuple[int, ...]] = {}  # digest -> _identity of the file checked
        self._open: OrderedDict[str, int] = OrderedDict()  # verified files kept open (event loop only)
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._chunks.mkdir(exist_ok=True)
        except OSError as e:
            raise ImageFSError(f"cannot create cache directory {self.root}: {e.strerror}") from e
        self._remove_stale_temps()
        # One listing of the files already here gives both the bytes they take and which chunks
        # they are (a mount counts its image's cached chunks from it instead of a lookup each).
        # Counting in a background thread was tried: it took the listing of a big cache off a
        # mount's start (40k files, page cache dropped: 580-640 ms to open, then 2-12 ms) but
        # competed with the index decode for the GIL, which made the container suite's torch
        # mounts 20-60 ms slower with its small caches; not kept.
        names: list[str] = []
        self._used = 0
        for path, size, _mtime in self._scan():
            names.append(os.path.basename(path))
            self._used += size
        self._present = frozenset(names)  # the chunks here when this cache was opened

    @property
    def used_bytes(self) -> int:
        return self._used

    def count_present(self, digests: Iterable[str]) -> int:
        """How many of these chunks the cache held when it was opened."""
        return len(self._present.intersection(digests))

    def path(self, digest: str) -> Path:
        """Where a chunk's file is; ValueError for anything but a digest (never a path of its own)."""
        if not is_digest(digest):
            raise ValueError(f"not a chunk digest: {digest[:80]!r}")
        return self._chunks / digest[:2] / digest

    def get(self, digest: Digest, size: int) -> bytes | None:
        """The verified content, or None (missing, or found corrupt and dropped)."""
        path = self.path(digest)
        fd = self._open_file(path, digest, size)
        if fd is None:
            return None
        try:
            data = os.pread(fd, size + 1, 0)
            ok = len(data) == size and blake3.blake3(data).hexdigest() == digest
            if ok:
                self._accept(fd, digest)
        finally:
            os.close(fd)
        if not ok:
            self._drop_corrupt(path, digest, len(data), size)
            return None
        return data

    def verify(self, digest: Digest, size: int) -> bool:
        """Check a file in place (no copy): True if it is present and right; a bad file is dropped."""
        path = self.path(digest)
        fd = self._open_file(path, digest, size)
        if fd is None:
            return False
        try:
            got = os.fstat(fd).st_size
            ok = got == size and _hash_file(fd, size) == digest
            if ok:
                self._accept(fd, digest)
        finally:
            os.close(fd)
        if not ok:
            self._drop_corrupt(path, digest, got, size)
        return ok

    def _open_file(self, path: Path, digest: str, size: int) -> int | None:
        """A descriptor of a chunk's file, or None (a miss: missing, or not a regular file, which is
        dropped; a FIFO put there is never waited on)."""
        try:
            return open_regular(path)
        except FileNotFoundError:
            self._count(misses=1)
        except NotRegularFile:
            self._drop_corrupt(path, digest, 0, size)
        return None

    def _accept(self, fd: int, digest: str) -> None:
        """A file just verified: count the hit, refresh its recency, remember which file it was."""
        self._count(hits=1)
        st = os.fstat(fd)
        if time.time() - st.st_mtime > TOUCH_INTERVAL:
            try:
                os.utime(fd)
                st = os.fstat(fd)
            except OSError:
                pass
        self._verified[digest] = _identity(st)

    def is_verified(self, digest: Digest) -> bool:
        return digest in self._verified

    def read_part(self, digest: Digest, offset: int, length: int, *,
                  wait: bool = False) -> bytearray | None:
        """length bytes at offset of a file this process verified, else None (see read_into)."""
        buf = bytearray(length)
        return buf if self.read_into(digest, offset, memoryview(buf), wait=wait) else None

    def read_into(self, digest: Digest, offset: int, dst: memoryview, *, wait: bool = False) -> bool:
        """Fill dst from offset of a file this process verified; False if that cannot be done.

        Without wait (event loop only), only bytes already in the page cache are read
        (RWF_NOWAIT) from a file kept open; False then means "read it in a thread". With wait
        (worker threads), the file is opened for this one read.
        """
        if digest not in self._verified:
            return False
        if wait:
            fd = self._open_verified(digest)
            if fd is None:
                return False
            try:
                return self._pread(fd, offset, dst, 0)
            finally:
                os.close(fd)
        fd = self._open.get(digest)
        if fd is None:
            fd = self._keep_open(digest)
            if fd is None:
                return False
        else:
            self._open.move_to_end(digest)
        try:
            # Still the file verified? (Not one changed in place since: its mtime moved. The
            # next load of the chunk then verifies it again.)
            if _identity(os.fstat(fd)) != self._verified.get(digest):
                self._close_fd(digest)
                self._verified.pop(digest, None)
                return False
            return self._pread(fd, offset, dst, os.RWF_NOWAIT)
        except OSError:
            self._close_fd(digest)
            return False

    def _pread(self, fd: int, offset: int, dst: memoryview, flags: int) -> bool:
        try:
            n = os.preadv(fd, [dst], offset, flags)
        except BlockingIOError:
            return False
        if n != len(dst):
            return False
        self.counters.part_reads += 1
        return True

    def _open_verified(self, digest: str) -> int | None:
        """An fd of the very file this process verified (not a later one under its name)."""
        try:
            fd = open_regular(self.path(digest))
        except OSError:
            self._verified.pop(digest, None)  # evicted: the next load verifies the new file
            return None
        if _identity(os.fstat(fd)) != self._verified.get(digest):
            os.close(fd)
            self._verified.pop(digest, None)
            return None
        return fd

    def _keep_open(self, digest: str) -> int | None:
        fd = self._open_verified(digest)
        if fd is not None:
            self._open[digest] = fd
            while len(self._open) > OPEN_FILES:
                os.close(self._open.popitem(last=False)[1])
        return fd

    def _close_fd(self, digest: str) -> None:
        fd = self._open.pop(digest, None)
        if fd is not None:
            os.close(fd)

    def close_files(self) -> None:
        """Close the verified files kept open (they are reopened on demand)."""
        while self._open:
            os.close(self._open.popitem()[1])

    def put(self, digest: Digest, data: Content) -> None:
        """Add verified content; errors (disk full, ...) are logged and counted, never raised."""
        path = self.path(digest)
        if path.exists():
            return
        try:
            written = self._write(path, data)
        except OSError as e:
            self._count(write_errors=1)
            log.warning("host cache: cannot write chunk %s: %s", digest, e.strerror or e)
            return
        # Verified content this process wrote itself: parts of it may be read from the page
        # cache at once (read_into), also after the memory tier has let the chunk go.
        self._verified[digest] = written
        with self._mutex:
            self.counters.writes += 1
            self.counters.write_bytes += len(data)
            self._used += len(data)
            over = self._used > self.max_bytes
        if over:
            self.evict()

    def _write(self, path: Path, data: Content) -> tuple[int, ...]:
        """Write data under path by rename of a complete temp file; the identity of that file.
        The temp file never outlives a failure (the folders, if something removed them, are made
        again)."""
        tmp = self._tmp / f"{path.name}.{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            self._tmp.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                view = memoryview(data)
                if self.direct_writes and len(view) >= DIRECT_MIN:
                    view = self._write_direct(fd, view)
                _write_all(fd, view)
                written = _identity(os.fstat(fd))
            finally:
                os.close(fd)
            try:
                os.replace(tmp, path)
            except FileNotFoundError:  # first chunk of this shard (or chunks/ was removed)
                path.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return written

    def _write_direct(self, fd: int, view: memoryview) -> memoryview:
        """Write the block-aligned head of view with O_DIRECT, through a buffer this thread
        reuses; the rest (a partial block), or all of it where the filesystem refuses O_DIRECT
        (then never tried again), is left to a buffered write."""
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT)
        except OSError:
            self.direct_writes = False
            return view
        done = 0
        try:
            buf = _direct_buffer()
            head = len(view) - len(view) % DIRECT_ALIGN
            while done < head:
                n = min(len(buf), head - done)
                buf[:n] = view[done:done + n]
                written = os.write(fd, buf[:n])
                if written != n:  # O_DIRECT writes whole blocks or fail
                    raise OSError(errno.EIO, f"short direct write ({written} of {n} bytes)")
                done += n
        except OSError as e:
            if e.errno != errno.EINVAL or done:
                raise
            self.direct_writes = False  # e.g. a block size this alignment does not meet
            log.info("host cache: O_DIRECT writes refused in %s; writing through the page cache",
                     self.root)
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
        return view[done:]

    def _drop_corrupt(self, path: Path, digest: str, got: int, want: int) -> None:
        log.warning("host cache: dropping corrupt chunk %s (%d bytes, expected %d)", digest, got, want)
        self._count(corrupt_dropped=1, misses=1)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        with self._mutex:
            self._used = max(0, self._used - got)

    def _count(self, **deltas: int) -> None:
        with self._mutex:
            for name, n in deltas.items():
                setattr(self.counters, name, getattr(self.counters, name) + n)

    # -- eviction ------------------------------------------------------------------------------
    def evict(self) -> int:
        """Under the cache lock, delete least recently used files until below the low-water mark."""
        with open(self._lock_path, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            files = sorted(self._scan(), key=lambda f: f[2])
            total = sum(size for _p, size, _m in files)
            target = int(self.max_bytes * LOW_WATER)
            freed = removed = 0
            for path, size, _mtime in files:
                if total - freed <= target:
                    break
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                freed += size
                removed += 1
        with self._mutex:
            self._used = total - freed
            self.counters.evictions += 1
            self.counters.evicted_files += removed
            self.counters.evicted_bytes += freed
        log.info("host cache: evicted %d chunks (%d bytes)", removed, freed)
        return freed

    def _scan(self) -> Iterator[tuple[str, int, float]]:
        """(path, size, mtime) of every chunk file."""
        try:
            shards = list(os.scandir(self._chunks))
        except FileNotFoundError:
            return
        for shard in shards:
            try:
                entries = list(os.scandir(shard.path))
            except (FileNotFoundError, NotADirectoryError):
                continue
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield entry.path, st.st_size, st.st_mtime

    def _remove_stale_temps(self) -> None:
        """Temp files of writers that died long ago; recent ones may belong to a live daemon."""
        now = time.time()
        for entry in os.scandir(self._tmp):
            try:
                if now - entry.stat().st_mtime > STALE_TEMP_AGE:
                    os.unlink(entry.path)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.warning("host cache: cannot remove stale temp file %s: %s", entry.path, e)


def _identity(st: os.stat_result) -> tuple[int, ...]:
    """Which file this is. A file put in its place (by a writer, or another one after eviction) has
    another inode or mtime; only a rewrite in place within one clock tick would go unnoticed, and
    cache files are never rewritten in place."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


_HASH_BLOCK = 1 << 20
_scratch = threading.local()


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _direct_buffer() -> memoryview:
    """This thread's page-aligned buffer for O_DIRECT writes (an anonymous mapping, reused)."""
    buf = getattr(_scratch, "direct", None)
    if buf is None:
        buf = _scratch.direct = memoryview(mmap.mmap(-1, DIRECT_BUFFER))
    return buf


def _hash_file(fd: int, size: int) -> str:
    """The blake3 hex digest of the first size bytes of an open file, read through a buffer that
    each thread reuses (no copy of the whole chunk, no mapping that a truncation could break)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None:
        buf = _scratch.buf = memoryview(bytearray(_HASH_BLOCK))
    hasher, offset = blake3.blake3(), 0
    while offset < size:
        n = os.preadv(fd, [buf[:min(_HASH_BLOCK, size - offset)]], offset)
        if n <= 0:
            break
        hasher.update(buf[:n])
        offset += n
    return hasher.hexdigest()


@dataclass
class MemoryCounters:
    hits: int = 0
    misses: int = 0
    evicted_chunks: int = 0


class MemoryCache:
    """A small LRU of hot chunks, bounded in bytes. Used from the event loop only."""

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_SIZE) -> None:
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self.counters = MemoryCounters()
        self._lru: OrderedDict[str, Content] = OrderedDict()

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, digest: str) -> bool:
        return digest in self._lru

    def peek(self, digest: str) -> Content | None:
        """The content if held, without counting a hit or making it recent."""
        return self._lru.get(digest)

    def get(self, digest: str, *, count_miss: bool = True) -> Content | None:
        data = self._lru.get(digest)
        if data is None:
            self.counters.misses += count_miss
            return None
        self._lru.move_to_end(digest)
        self.counters.hits += 1
        return data

    def put(self, digest: str, data: Content) -> None:
        if len(data) > self.max_bytes or digest in self._lru:
            return
        self._lru[digest] = data
        self.used_bytes += len(data)
        while self.used_bytes > self.max_bytes:
            _d, old = self._lru.popitem(last=False)
            self.used_bytes -= len(old)
            self.counters.evicted_chunks += 1

"""Turn a BuildTree into stored chunks and an image index.

File contents are concatenated in tree order and cut with FastCDC, so small neighbouring files share
a chunk and identical runs of content deduplicate across images whatever surrounds them. Chunks are
hashed, compressed and uploaded by a bounded pool of threads; the index is written only after every
chunk it names is stored, so a readable index never points at a missing chunk.
"""
from __future__ import annotations

import stat
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

from pyfastcdc import FastCDC

from imagefs import chunks as blobs
from imagefs.chunks import Digest
from imagefs.errors import UnsafeInput
from imagefs.index import ImageConfig, ImageIndex, Inode, encode_index
from imagefs.store.base import BlobStore
from imagefs.tree import BuildTree, ExtentSource, Node, Reader, Source


@dataclass(frozen=True)
class ChunkerParams:
    """FastCDC sizes. Changing them changes every digest: the golden test pins the defaults."""

    avg_size: int = 1 << 20
    min_size: int = 1 << 18
    max_size: int = 1 << 22

    def cutter(self) -> FastCDC:
        return FastCDC(self.avg_size, min_size=self.min_size, max_size=self.max_size)


@dataclass
class WriteStats:
    files: int = 0
    file_bytes: int = 0
    chunks: int = 0  # chunk references made by this write (before dedup within the image)
    unique_chunks: int = 0
    new_chunks: int = 0  # chunks actually uploaded
    new_bytes: int = 0  # stored (compressed) bytes uploaded
    new_raw_bytes: int = 0
    reused_bytes: int = 0  # file bytes taken from a parent image without reading them
    index_bytes: int = 0  # stored size of the image index blob

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


ProgressFn = Callable[[int], None]


READ_AHEAD = 256 << 20  # bytes of upcoming file content the kernel is asked to read in advance


class _Concat:
    """A reader over the concatenated contents of sources, for FastCDC.cut_stream.

    A helper thread keeps the kernel reading up to READ_AHEAD bytes beyond the cursor, so a
    cold-cache import keeps the disk queue full instead of reading one small file at a time.
    """

    def __init__(self, sources: list[Source]) -> None:
        self._all = sources
        self._sources = iter(sources)
        self._cur: Reader | None = None
        self._left = 0
        self._consumed = 0
        self._stop = threading.Event()
        self._tick = threading.Condition()
        self._ahead = threading.Thread(target=self._read_ahead, name="import-readahead", daemon=True)
        self._ahead.start()

    def _read_ahead(self) -> None:
        advised = 0
        for src in self._all:
            advise = getattr(src, "advise", None)
            if advise is None:
                continue
            with self._tick:
                while advised - self._consumed > READ_AHEAD and not self._stop.is_set():
                    self._tick.wait(0.5)
            if self._stop.is_set():
                return
            advise()
            advised += src.size

    def readinto(self, buf: memoryview) -> int:
        done = 0
        while done < len(buf):
            if self._cur is None and not self._next():
                break
            assert self._cur is not None
            want = min(self._left, len(buf) - done)
            n = self._cur.readinto(buf[done:done + want])
            if not n:
                raise UnsafeInput("a source file shrank while it was being read")
            done += n
            self._left -= n
            self._consumed += n
            if self._left == 0:
                self._cur.close()
                self._cur = None
        with self._tick:
            self._tick.notify()
        return done

    def _next(self) -> bool:
        for src in self._sources:
            if src.size:
                self._cur, self._left = src.open(), src.size
                return True
        return False

    def close(self) -> None:
        self._stop.set()
        with self._tick:
            self._tick.notify()
        self._ahead.join()
        if self._cur is not None:
            self._cur.close()


class _Uploader:
    """Hash, compress and store chunks in a bounded pool; skips chunks the store already has."""

    def __init__(self, store: BlobStore, workers: int, stats: WriteStats) -> None:
        self.store, self.stats = store, stats
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="chunk-upload")
        self.inflight: deque[Future[Digest]] = deque()
        self.limit = workers * 2
        self.lock = threading.Lock()
        self.seen: set[Digest] = set()

    def submit(self, data: bytes) -> Future[Digest]:
        while len(self.inflight) >= self.limit:
            self.inflight.popleft().result()
        fut = self.pool.submit(self._store_one, data)
        self.inflight.append(fut)
        return fut

    def _store_one(self, data: bytes) -> Digest:
        digest = blobs.digest_of(data)
        with self.lock:
            if digest in self.seen:
                return digest
            self.seen.add(digest)
        key = blobs.chunk_key(digest)
        if not self.store.exists(key):
            blob = blobs.encode(data)
            self.store.put(key, blob)
            with self.lock:
                self.stats.new_chunks += 1
                self.stats.new_bytes += len(blob)
                self.stats.new_raw_bytes += len(data)
        return digest

    def finish(self) -> None:
        try:
            while self.inflight:
                self.inflight.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Layout:
    """Inodes and directory entries in tree order, and the files whose content must be streamed."""

    inodes: list[Inode] = field(default_factory=list)
    children: dict[int, dict[bytes, int]] = field(default_factory=dict)
    streamed: list[tuple[Inode, Source]] = field(default_factory=list)
    reused: list[tuple[Inode, ExtentSource]] = field(default_factory=list)


def _layout(tree: BuildTree) -> _Layout:
    out, ino_of = _Layout(), {}
    parent_ino: dict[tuple[bytes, ...], int] = {}
    for parts, node in tree.walk():
        known = ino_of.get(id(node))
        if known is None:
            known = ino_of[id(node)] = len(out.inodes) + 1
            out.inodes.append(_inode_of(node))
            _queue_content(out, out.inodes[-1], node)
        if node.is_dir:
            out.children[known] = {}
            parent_ino[parts] = known
        if parts:
            out.children[parent_ino[parts[:-1]]][parts[-1]] = known
    return out


def _inode_of(node: Node) -> Inode:
    # Every regular file has an extent list (empty for empty files), whatever the importer gave it.
    return Inode(mode=node.mode, uid=node.uid, gid=node.gid, mtime_ns=node.mtime_ns, size=node.size,
                 rdev=node.rdev, target=node.target, xattrs=dict(node.xattrs) or None,
                 extents=[] if stat.S_ISREG(node.mode) else None)


def _queue_content(out: _Layout, inode: Inode, node: Node) -> None:
    if not stat.S_ISREG(node.mode) or node.source is None:
        return
    if isinstance(node.source, ExtentSource):
        out.reused.append((inode, node.source))
    else:
        out.streamed.append((inode, node.source))


def write_image(store: BlobStore, tree: BuildTree, config: ImageConfig | None = None, *,
                params: ChunkerParams = ChunkerParams(), workers: int = 4,
                progress: ProgressFn | None = None) -> tuple[Digest, WriteStats]:
    """Store every chunk of the tree, then its index. Returns (image ID, stats). Moves no tag."""
    stats = WriteStats()
    lay = _layout(tree)
    chunk_futs = _stream_chunks(store, lay.streamed, params, workers, stats, progress)
    table, sizes = _ChunkTable(), []
    for digest_fut, size in chunk_futs:
        table.add(digest_fut.result(), size, sizes)
    _resolve_streamed(lay.streamed, chunk_futs, table)
    for inode, src in lay.reused:
        inode.extents = [x for d, off, n in src.extents
                         for x in (table.add(Digest(d), src.chunk_sizes[d], sizes), off, n)]
        stats.reused_bytes += src.size
    stats.files = len(lay.streamed) + len(lay.reused)
    stats.unique_chunks = len(sizes)
    index = ImageIndex(lay.inodes, lay.children, table.digests, sizes, config or ImageConfig())
    image_id, blob = encode_index(index)
    store.put(blobs.index_key(image_id), blob)
    stats.index_bytes = len(blob)
    return image_id, stats


class _ChunkTable:
    def __init__(self) -> None:
        self.digests: list[Digest] = []
        self.pos: dict[Digest, int] = {}

    def add(self, digest: Digest, size: int, sizes: list[int]) -> int:
        n = self.pos.get(digest)
        if n is None:
            n = self.pos[digest] = len(self.digests)
            self.digests.append(digest)
            sizes.append(size)
        return n


def _stream_chunks(store: BlobStore, files: list[tuple[Inode, Source]], params: ChunkerParams,
                   workers: int, stats: WriteStats,
                   progress: ProgressFn | None) -> list[tuple[Future[Digest], int]]:
    """Cut the concatenated file contents; returns (digest future, length) per chunk in order."""
    up = _Uploader(store, workers, stats)
    reader = _Concat([src for _, src in files])
    out: list[tuple[Future[Digest], int]] = []
    try:
        for c in params.cutter().cut_stream(reader):
            out.append((up.submit(bytes(c.data)), c.length))
            stats.file_bytes += c.length
            if progress:
                progress(c.length)
    finally:
        reader.close()
        up.finish()
    stats.chunks = len(out)
    expected = sum(src.size for _, src in files)
    if stats.file_bytes != expected:
        raise UnsafeInput(f"read {stats.file_bytes} bytes of file content, expected {expected}")
    return out


def _resolve_streamed(files: Iterable[tuple[Inode, Source]],
                      chunk_futs: list[tuple[Future[Digest], int]], table: _ChunkTable) -> None:
    """Give each streamed file the extents of the chunks its bytes landed in."""
    ci, cstart, pos = 0, 0, 0  # current chunk, its start in the stream, the stream position
    for inode, src in files:
        ext: list[int] = []
        left = src.size
        while left:
            clen = chunk_futs[ci][1]
            off = pos - cstart
            n = min(left, clen - off)
            ext += (table.pos[chunk_futs[ci][0].result()], off, n)
            pos += n
            left -= n
            if off + n == clen:
                ci, cstart = ci + 1, cstart + clen
        inode.extents = ext

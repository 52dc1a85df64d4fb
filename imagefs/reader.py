"""Read file contents of a stored image chunk by chunk, verified. Used by export and tools."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Iterator

from imagefs import chunks as blobs
from imagefs.index import ImageIndex, Inode
from imagefs.store.base import BlobStore


class ChunkReader:
    """Fetch, verify and decompress chunks, keeping the last few in memory."""

    def __init__(self, store: BlobStore, keep: int = 8) -> None:
        self.store = store
        self.keep = keep
        self._lru: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.fetches = 0

    def get(self, digest: str) -> bytes:
        with self._lock:
            data = self._lru.get(digest)
            if data is not None:
                self._lru.move_to_end(digest)
                return data
        data = blobs.decode(self.store.get(blobs.chunk_key(digest)), digest)
        with self._lock:
            self.fetches += 1
            self._lru[digest] = data
            while len(self._lru) > self.keep:
                self._lru.popitem(last=False)
        return data


def iter_file(reader: ChunkReader, index: ImageIndex, inode: Inode) -> Iterator[bytes]:
    """The content of a regular file, piece by piece."""
    ext = inode.extents or []
    for i in range(0, len(ext), 3):
        c, off, n = ext[i:i + 3]
        yield reader.get(index.chunks[c])[off:off + n]


def read_range(reader: ChunkReader, index: ImageIndex, inode: Inode, offset: int, size: int) -> bytes:
    parts = [reader.get(index.chunks[c])[coff:coff + n]
             for c, coff, n, _ in inode.extents_for(offset, size)]
    return b"".join(parts)

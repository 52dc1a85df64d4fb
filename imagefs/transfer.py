"""Copy an image (index and chunks) from one store to another, skipping what is already there."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from imagefs import chunks as blobs
from imagefs.images import load_index
from imagefs.store.base import BlobStore


def copy_image(src: BlobStore, dst: BlobStore, image_id: str, *, workers: int = 8) -> int:
    """Make image_id readable from dst; returns the number of chunks copied. The index is written
    last, so dst never holds an index whose chunks are missing."""
    index = load_index(src, image_id)

    def one(digest: str) -> int:
        key = blobs.chunk_key(digest)
        if dst.exists(key):
            return 0
        dst.put(key, src.get(key))
        return 1

    with ThreadPoolExecutor(workers, thread_name_prefix="copy-chunk") as pool:
        copied = sum(pool.map(one, index.chunks))
    key = blobs.index_key(image_id)
    if not dst.exists(key):
        dst.put(key, src.get(key))
    return copied

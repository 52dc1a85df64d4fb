"""Image indexes kept on the host, so that a mount (and the runner) need not fetch them again.

An index is immutable and named by the blake3 of its content, so a cached copy never goes stale;
it only has to be intact. The stored blob is kept as the store has it, under
``<cache dir>/indexes/<image id>``, written to a temporary file and renamed into place, and it is
verified (imagefs.chunks.decode) on every load: a torn or rotten file is dropped and fetched
again. The cache is best-effort: a failure to write it is logged, never raised. At most
MAX_ENTRIES indexes are kept, the oldest going first.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import msgpack

from imagefs import chunks as blobs
from imagefs.errors import BlobNotFound, CorruptBlob, ImageNotFound
from imagefs.hostfiles import HostFiles
from imagefs.index import FORMAT_VERSION, ImageConfig, ImageIndex
from imagefs.store.base import BlobStore

log = logging.getLogger(__name__)

SUBDIR = "indexes"
MAX_ENTRIES = 256


class IndexCache:
    """Stored index blobs of images, by image ID, in one directory."""

    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self._files = HostFiles(Path(cache_dir) / SUBDIR, MAX_ENTRIES)
        self.dir = self._files.dir

    def path(self, image_id: str) -> Path:
        if not blobs.is_digest(image_id):
            raise ValueError(f"not an image ID: {image_id!r}")
        return self._files.path(image_id)

    def has(self, image_id: str) -> bool:
        return blobs.is_digest(image_id) and self.path(image_id).is_file()

    def load(self, image_id: str) -> bytes | None:
        """The verified, decoded index, or None (not cached, or found damaged and dropped)."""
        blob = self._files.read(self.path(image_id).name)
        if blob is None:
            return None
        try:
            return blobs.decode(blob, image_id)
        except CorruptBlob as e:
            log.warning("index cache: dropping %s: %s", image_id, e.reason)
            self._files.remove(image_id)
            return None

    def save(self, image_id: str, blob: bytes) -> None:
        """Keep a stored index blob (the caller has verified it); errors are only logged."""
        self._files.write(self.path(image_id).name, blob)


def load_index(store: BlobStore, image_id: str, cache_dir: str | os.PathLike[str] | None) -> ImageIndex:
    """The image's index: from the host cache when it holds an intact copy, else from the store
    (and then kept). ImageNotFound if the store does not have it either."""
    return ImageIndex.decode(load_raw(store, image_id, cache_dir), image_id)


def load_config(store: BlobStore, image_id: str, cache_dir: str | os.PathLike[str] | None) -> ImageConfig:
    """Only the image's config (all a runner needs), without building the whole tree."""
    return config_of(load_raw(store, image_id, cache_dir), image_id)


def load_raw(store: BlobStore, image_id: str, cache_dir: str | os.PathLike[str] | None) -> bytes:
    """The verified, decoded index: the host's copy if intact, else the store's (then kept)."""
    if cache_dir is None or not blobs.is_digest(image_id):
        return blobs.decode(_fetch(store, image_id), image_id)
    cache = IndexCache(cache_dir)
    raw = cache.load(image_id)
    if raw is None:
        blob = _fetch(store, image_id)
        raw = blobs.decode(blob, image_id)
        cache.save(image_id, blob)
    return raw


def config_of(raw: bytes, image_id: str) -> ImageConfig:
    """The config of an encoded index (a msgpack map holding "v" and "config" among others),
    read without decoding the tree: a 100k-file index takes tens of milliseconds to decode."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(raw), 1))
    unpacker.feed(raw)
    found: dict[str, Any] = {}
    try:
        for _ in range(unpacker.read_map_header()):
            key = unpacker.unpack()
            if key in ("v", "config"):
                found[key] = unpacker.unpack()
            else:
                unpacker.skip()
        if found.get("v") != FORMAT_VERSION:
            raise CorruptBlob(image_id, f"unknown index version {found.get('v')}")
        return ImageConfig.from_wire(found["config"])
    except (KeyError, TypeError, ValueError, AttributeError, msgpack.UnpackException) as e:
        raise CorruptBlob(image_id, f"malformed image index: {e}") from None


def _fetch(store: BlobStore, image_id: str) -> bytes:
    try:
        return store.get(blobs.index_key(image_id))
    except BlobNotFound:
        raise ImageNotFound(f"image index {image_id} is missing from the store") from None

"""Garbage collection, and the store consistency check (fsck).

gc keeps every image a tag, a build-cache entry or a live mount lease names, the profiles tags
name, and what those reach; it deletes the rest that is older than the grace period. Leases
(imagefs.leases) keep it and imports apart: gc defers while any live import lease exists, and an
import waits while a live gc lease exists, so gc never deletes a chunk that a running import has
just found "already stored". gc removes stale leases.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from imagefs import chunks as blobs
from imagefs.errors import BlobNotFound, CorruptBlob, ImageFSError, StoreError
from imagefs.images import list_tags, load_index
from imagefs.leases import LEASE_TIMEOUT, lease, lease_live, leases, live_leases
from imagefs.profile import ProfileNotFound
from imagefs.profile import load as profile_load
from imagefs.store.base import BlobInfo, BlobStore

__all__ = ["GcDeferred", "GcReport", "FsckReport", "gc", "fsck", "import_lease", "lease", "live_leases",
           "LEASE_TIMEOUT"]


class GcDeferred(ImageFSError):
    """gc found a running import (or an import found a running gc) and stood back."""

    exit_code = 5


@contextmanager
def import_lease(store: BlobStore, wait: float = 600.0) -> Iterator[str]:
    """An import's shared lease; waits (up to `wait` s) while a gc runs."""
    deadline = time.monotonic() + wait
    while True:
        with lease(store, "import") as key:
            if not live_leases(store, "gc", key):
                yield key
                return
        if time.monotonic() > deadline:
            raise GcDeferred("a garbage collection is running on this store; try again later")
        time.sleep(1.0)


# -- reachability -------------------------------------------------------------------------------
def _root_docs(store: BlobStore) -> Iterator[dict[str, Any]]:
    """Every tag and build-cache entry. A tag that cannot be read stops gc (the image it named
    would otherwise look unreferenced); a malformed build-cache entry is only a cache miss."""
    corrupt: list[str] = []
    for _ref, doc in list_tags(store, corrupt):
        yield doc
    if corrupt:
        raise StoreError(f"gc stopped: {corrupt[0]} (fix it or `coldstart rm` it)")
    for info in store.list("buildcache/"):
        try:
            doc = json.loads(store.get(info.key))
        except (BlobNotFound, ValueError):
            continue
        if isinstance(doc, dict):
            yield doc


def _chunks_of(store: BlobStore, image_id: str) -> set[str]:
    return set(load_index(store, image_id).chunks)


@dataclass
class GcReport:
    roots: int = 0
    kept_indexes: int = 0
    deleted_indexes: list[str] = field(default_factory=list)
    deleted_chunks: int = 0
    deleted_bytes: int = 0
    deleted_profiles: int = 0
    deleted_temp_files: int = 0  # torn writes left by killed writers (local store)
    kept_young: int = 0
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def gc(store: BlobStore, *, grace: float = 900.0, dry_run: bool = False) -> GcReport:
    """Delete indexes, profiles and chunks that no tag, build-cache entry or mount reaches."""
    if not (math.isfinite(grace) and grace >= 0):
        raise ImageFSError(f"gc grace must be a number of seconds >= 0, not {grace}")
    with lease(store, "gc") as key:
        if live_leases(store, "import", key):
            raise GcDeferred("an import is running on this store; gc deferred (nothing deleted)")
        mounted = {str(doc.get("image")) for doc in live_leases(store, "mount", key)}
        rep = _collect(store, grace, dry_run, mounted)
        if not dry_run:
            _remove_stale_leases(store, key)
        return rep


def _remove_stale_leases(store: BlobStore, own_key: str) -> None:
    """Leases whose holders died without removing them (a kill -9)."""
    found, now = leases(store, own_key)
    for info, doc in found:
        if info.key != own_key and not lease_live(doc, info.mtime, now):
            store.delete(info.key)


def _collect(store: BlobStore, grace: float, dry_run: bool, mounted: set[str]) -> GcReport:
    rep, cutoff = GcReport(dry_run=dry_run), time.time() - grace
    roots, profiles = {d for d in mounted if blobs.is_digest(d)}, set()
    for doc in _root_docs(store):
        rep.roots += 1
        if blobs.is_digest(str(doc.get("image", ""))):
            roots.add(doc["image"])
        if doc.get("profile"):
            profiles.add(str(doc["profile"]))
    live_chunks: set[str] = set()
    listed = set()
    for info in list(store.list("index/")):
        image_id = info.key[len("index/"):]
        listed.add(image_id)
        if image_id in roots or info.mtime > cutoff:
            rep.kept_indexes += 1
            rep.kept_young += image_id not in roots
            live_chunks |= _safe_chunks(store, image_id)
        else:
            rep.deleted_indexes.append(image_id)
            if not dry_run:
                store.delete(info.key)
    for image_id in sorted(roots - listed):  # a listing that left some out must not drive the sweep
        if store.exists(blobs.index_key(image_id)):
            raise StoreError(f"gc stopped: the store's listing left out index {image_id}, which exists")
    for info in list(store.list("profiles/")):
        digest = info.key[len("profiles/"):]
        if digest not in profiles and info.mtime <= cutoff:
            rep.deleted_profiles += 1
            if not dry_run:
                store.delete(info.key)
        else:
            live_chunks |= _safe_segments(store, digest)
    _sweep_chunks(store, live_chunks, cutoff, rep, dry_run)
    _sweep_temp_files(store, cutoff, rep, dry_run)
    return rep


def _safe_chunks(store: BlobStore, image_id: str) -> set[str]:
    try:
        return _chunks_of(store, image_id)
    except (CorruptBlob, ImageFSError) as e:
        # An unreadable index keeps nothing alive but is not deleted either: fsck reports it.
        raise StoreError(f"gc stopped: cannot read index {image_id}: {e}") from e


def _segments_of(store: BlobStore, profile: str) -> set[str]:
    """The read-set pack segments (chunk blobs) of a stored profile; a missing profile has none."""
    try:
        return {seg.digest for seg in profile_load(store, profile).pack}
    except ProfileNotFound:  # deleted since it was listed
        return set()


def _safe_segments(store: BlobStore, profile: str) -> set[str]:
    """As _segments_of; a profile that cannot be read (corrupt, or the store failing) stops gc,
    which would otherwise sweep segments the profile may need."""
    try:
        return _segments_of(store, profile)
    except ImageFSError as e:
        raise StoreError(f"gc stopped: cannot read profile {profile}: {e}") from e


def _sweep_chunks(store: BlobStore, live: set[str], cutoff: float, rep: GcReport, dry_run: bool) -> None:
    for info in list(store.list("chunks/")):
        digest = info.key[len("chunks/"):]
        if digest in live or info.mtime > cutoff:
            continue
        rep.deleted_chunks += 1
        rep.deleted_bytes += info.size
        if not dry_run:
            store.delete(info.key)


def _sweep_temp_files(store: BlobStore, cutoff: float, rep: GcReport, dry_run: bool) -> None:
    """Temp files of writers killed before their rename (only the local backend has them)."""
    stale = getattr(store, "stale_temp_files", None)
    for path in stale() if stale else ():
        try:
            if path.stat().st_mtime > cutoff:
                continue
            rep.deleted_temp_files += 1
            if not dry_run:
                path.unlink()
        except FileNotFoundError:
            continue


# -- fsck ---------------------------------------------------------------------------------------
@dataclass
class FsckReport:
    errors: list[str] = field(default_factory=list)
    tags: int = 0
    indexes: int = 0
    chunks: int = 0
    orphan_indexes: int = 0
    orphan_chunks: int = 0
    verified_chunks: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def fsck(store: BlobStore, *, verify_chunks: bool = False) -> FsckReport:
    """Every tag names a readable index; every chunk an index names exists (and verifies); every
    stored profile is readable and the segments of its read-set pack exist (and verify)."""
    rep = FsckReport()
    stored: dict[str, BlobInfo] = {i.key[len("chunks/"):]: i for i in store.list("chunks/")}
    indexes = {i.key[len("index/"):] for i in store.list("index/")}
    rep.chunks, rep.indexes = len(stored), len(indexes)
    tagged = set()
    profiles = sorted(i.key[len("profiles/"):] for i in store.list("profiles/"))
    for ref, doc in list_tags(store, rep.errors):
        rep.tags += 1
        tagged.add(doc["image"])
        if doc["image"] not in indexes:
            rep.errors.append(f"tag {ref} names missing image {doc['image']}")
        if doc.get("profile") and str(doc["profile"]) not in profiles:
            rep.errors.append(f"tag {ref} names missing profile {doc['profile']}")
    referenced: set[str] = set()
    for kind, owner, blob, names, needs_of in (
            ("index", "image", "chunk", sorted(indexes), _chunks_of),
            ("profile", "profile", "pack segment", profiles, _segments_of)):
        for name in names:
            try:
                needed = needs_of(store, name)
            except ImageFSError as e:
                rep.errors.append(f"{kind} {name}: {e}")
                continue
            referenced |= needed
            rep.errors += [f"{owner} {name} needs missing {blob} {d}" for d in sorted(needed - stored.keys())]
    rep.orphan_indexes = len(indexes - tagged)
    rep.orphan_chunks = len(stored.keys() - referenced)
    if verify_chunks:
        _verify_all(store, referenced & stored.keys(), rep)
    return rep


def _verify_all(store: BlobStore, digests: set[str], rep: FsckReport) -> None:
    for d in sorted(digests):
        try:
            blobs.decode(store.get(blobs.chunk_key(d)), d)
            rep.verified_chunks += 1
        except (CorruptBlob, BlobNotFound) as e:
            rep.errors.append(str(e))

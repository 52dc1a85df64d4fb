"""Garbage collection, leases that keep gc, imports and mounts apart, and the store consistency check.

Imports hold a shared lease (leases/import-*) while they write; gc holds an exclusive one
(leases/gc-*). gc defers while any live import lease exists, and an import waits while a live gc
lease exists, so gc never deletes a chunk that a running import has just found "already stored".
A mount holds a lease naming its image (leases/mount-*, see MountLease) for as long as its daemon
runs: gc keeps that image as if it were tagged, so a container of an image whose tag moved on
(a re-import, `coldstart rm`) keeps reading it.
Belt and braces: nothing younger than the grace period is ever deleted.

A lease is live while its holder refreshes it: one taken on this host is live exactly while its
process (the same pid, started at the same time) exists, whatever the clocks say (a stopped
process still holds it); one from another host while the store's own time stamp of it is younger
than LEASE_TIMEOUT, measured against the time stamp the store gave the caller's lease just
written, so hosts' clocks are never compared. gc removes stale leases.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from imagefs import chunks as blobs
from imagefs.errors import BlobNotFound, CorruptBlob, ImageFSError, ImageNotFound, StoreError
from imagefs.images import Ref, load_index, read_tag
from imagefs.profile import ProfileNotFound
from imagefs.profile import load as profile_load
from imagefs.store.base import BlobInfo, BlobStore

log = logging.getLogger(__name__)

LEASE_TIMEOUT = 120.0
HEARTBEAT = 30.0


class GcDeferred(ImageFSError):
    """gc found a running import (or an import found a running gc) and stood back."""

    exit_code = 5


# -- leases -------------------------------------------------------------------------------------
def _process_start(pid: int) -> str:
    """When process pid started (clock ticks since boot, /proc/PID/stat field 22); "" if unknown.
    Tells a lease holder from a later process that was given the same pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    return stat[stat.rfind(b")") + 2:].split()[19].decode()


def _lease_doc(kind: str, **extra: Any) -> dict[str, Any]:
    now, pid = time.time(), os.getpid()
    return {"kind": kind, "host": socket.gethostname(), "pid": pid, "pid_start": _process_start(pid),
            "started": now, "heartbeat": now, **extra}


def _holder_alive(doc: dict[str, Any]) -> bool:
    """Whether the process that took a lease on this host still runs (not a pid reused since)."""
    pid = int(doc.get("pid", 0))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = doc.get("pid_start")
    return not started or _process_start(pid) in ("", started)


def _lease_live(doc: dict[str, Any], stamped: float, now: float) -> bool:
    """doc: the lease; stamped: the store's time stamp of it; now: the store's time now."""
    if doc.get("host") == socket.gethostname():
        return _holder_alive(doc)
    return now - stamped <= LEASE_TIMEOUT


def _leases(store: BlobStore, own_key: str | None) -> tuple[list[tuple[BlobInfo, dict[str, Any]]], float]:
    """Every readable lease with its listing entry, and the store's time now: the stamp it gave
    own_key (the caller's lease, just written), else this host's clock."""
    found, now = [], None
    for info in store.list("leases/"):
        if info.key == own_key:
            now = info.mtime
        try:
            doc = json.loads(store.get(info.key))
        except (BlobNotFound, ValueError):
            continue
        if isinstance(doc, dict):
            found.append((info, doc))
    return found, time.time() if now is None else now


def live_leases(store: BlobStore, kind: str, own_key: str | None = None) -> list[dict[str, Any]]:
    """The live leases of kind other than own_key (see the module's notes on liveness)."""
    found, now = _leases(store, own_key)
    return [doc for info, doc in found
            if info.key.startswith(f"leases/{kind}-") and info.key != own_key and _lease_live(doc, info.mtime, now)]


def _lease_key(kind: str) -> str:
    return f"leases/{kind}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"


class _Heartbeat:
    """Rewrites a lease every HEARTBEAT seconds in a thread of its own, until stopped."""

    def __init__(self, store: BlobStore, key: str, doc: dict[str, Any]) -> None:
        self.store, self.key, self.doc = store, key, doc
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-heartbeat-{doc['kind']}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            self.doc["heartbeat"] = time.time()
            try:
                self.store.put(self.key, json.dumps(self.doc).encode())
            except StoreError:
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


@contextmanager
def lease(store: BlobStore, kind: str, **extra: Any) -> Iterator[str]:
    """Hold a lease of kind 'import' or 'gc', refreshed by a heartbeat thread, removed at exit."""
    key, doc = _lease_key(kind), _lease_doc(kind, **extra)
    store.put(key, json.dumps(doc).encode())
    beat = _Heartbeat(store, key, doc)
    beat.start()
    try:
        yield key
    finally:
        beat.stop()
        store.delete(key)


class MountLease:
    """A mount's lease on its image, taken and dropped off the caller's thread (a mount must not
    wait for the store to write it); a store that refuses the write (read-only credentials) is
    logged once and the mount goes on without one (gc then does not know the image is in use)."""

    def __init__(self, store: BlobStore, image_id: str) -> None:
        self.store, self.key = store, _lease_key("mount")
        self.doc = _lease_doc("mount", image=image_id)
        self._beat = _Heartbeat(store, self.key, self.doc)
        self._taken = threading.Event()
        self._released = threading.Event()

    def start(self, delay: float = 0.0) -> None:
        """Write the lease delay seconds from now (unless released by then), then keep it fresh."""
        threading.Thread(target=self._take, args=(delay,), name="mount-lease", daemon=True).start()

    def _take(self, delay: float) -> None:
        if self._released.wait(delay):
            return
        try:
            self.store.put(self.key, json.dumps(self.doc).encode())
        except ImageFSError as e:
            log.warning("cannot write a lease on image %s (gc will not see it in use): %s", self.doc["image"], e)
            return
        self._taken.set()
        self._beat.start()

    def release(self) -> None:
        self._released.set()
        self._beat.stop()
        if self._taken.is_set():
            try:
                self.store.delete(self.key)
            except ImageFSError as e:
                log.warning("cannot remove the lease %s: %s", self.key, e)


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
    for info in store.list("tags/"):
        ref = _tag_ref(info.key)
        try:
            yield read_tag(store, ref)
        except ImageNotFound:  # removed since it was listed
            continue
        except ImageFSError as e:
            raise StoreError(f"gc stopped: {e} (fix it or `coldstart rm {ref}`)") from None
    for info in store.list("buildcache/"):
        try:
            doc = json.loads(store.get(info.key))
        except (BlobNotFound, ValueError):
            continue
        if isinstance(doc, dict):
            yield doc


def _tag_ref(key: str) -> Ref:
    name, _, tag = key[len("tags/"):].rpartition("/")
    return Ref(name, tag)


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
    found, now = _leases(store, own_key)
    for info, doc in found:
        if info.key != own_key and not _lease_live(doc, info.mtime, now):
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
    for info in store.list("tags/"):
        ref = _tag_ref(info.key)
        try:
            doc = read_tag(store, ref)
        except ImageNotFound:  # removed since it was listed
            continue
        except ImageFSError as e:
            rep.errors.append(str(e))
            continue
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

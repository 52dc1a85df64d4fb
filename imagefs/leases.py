"""Leases in the store: documents under leases/ by which imports, gc and mounts see each other.

Imports hold a shared lease (leases/import-*) while they write and gc an exclusive one
(leases/gc-*); imagefs.gc keeps the two apart. A mount holds a lease naming its image
(leases/mount-*, MountLease) for as long as its daemon runs, and gc keeps that image as if it were
tagged.

A lease is live while its holder keeps it: one taken on this host exactly while its process (the
same pid, started at the same time) exists, whatever the clocks say (a stopped process still
holds it); one from another host while the store's own time stamp of it is younger than
LEASE_TIMEOUT, measured against the time stamp the store gave the reader's lease just written, so
no two hosts' clocks are ever compared. Holders rewrite their lease every HEARTBEAT seconds.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from imagefs.errors import BlobNotFound, ImageFSError, StoreError
from imagefs.store.base import BlobInfo, BlobStore

log = logging.getLogger(__name__)

LEASE_TIMEOUT = 120.0
HEARTBEAT = 30.0


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


def lease_live(doc: dict[str, Any], stamped: float, now: float) -> bool:
    """doc: the lease; stamped: the store's time stamp of it; now: the store's time now."""
    if doc.get("host") == socket.gethostname():
        return _holder_alive(doc)
    return now - stamped <= LEASE_TIMEOUT


def leases(store: BlobStore, own_key: str | None, kind: str = "") -> tuple[list[tuple[BlobInfo, dict[str, Any]]], float]:
    """The readable leases of kind (every kind if empty) with their listing entries, and the
    store's time now: the stamp it gave own_key (the caller's lease, just written), else this
    host's clock. Only the leases of kind are read."""
    found, now = [], None
    for info in store.list("leases/"):
        if info.key == own_key:
            now = info.mtime
        if not info.key.startswith(f"leases/{kind}"):
            continue
        try:
            doc = json.loads(store.get(info.key))
        except (BlobNotFound, ValueError):
            continue
        if isinstance(doc, dict):
            found.append((info, doc))
    return found, time.time() if now is None else now


def live_leases(store: BlobStore, kind: str, own_key: str | None = None) -> list[dict[str, Any]]:
    """The live leases of kind other than own_key."""
    found, now = leases(store, own_key, f"{kind}-")
    return [doc for info, doc in found if info.key != own_key and lease_live(doc, info.mtime, now)]


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
    """A mount's lease on its image. take() writes it, refresh() rewrites it (every HEARTBEAT
    seconds: the store's time stamp is what keeps it live for other hosts), release() removes it;
    the daemon calls them off its start path (imagefs.fs.daemon). A store that refuses the write
    (read-only credentials) is logged and the mount goes on without a lease (gc then does not
    know the image is in use). A release while take() is writing removes what it wrote."""

    def __init__(self, store: BlobStore, image_id: str) -> None:
        self.store, self.image_id = store, image_id
        self.key: str | None = None
        self._doc: dict[str, Any] = {}
        self._released = False
        self._lock = threading.Lock()

    def take(self) -> bool:
        key, doc = _lease_key("mount"), _lease_doc("mount", image=self.image_id)
        try:
            self.store.put(key, json.dumps(doc).encode())
        except ImageFSError as e:
            log.warning("cannot write a lease on image %s (gc will not see it in use): %s", self.image_id, e)
            return False
        with self._lock:
            late = self._released
            if not late:
                self.key, self._doc = key, doc
        if late:
            self._delete(key)
        return not late

    def refresh(self) -> None:
        with self._lock:
            key, doc = self.key, self._doc
        if key is not None:
            doc["heartbeat"] = time.time()
            try:
                self.store.put(key, json.dumps(doc).encode())
            except ImageFSError as e:
                log.warning("cannot refresh the lease %s: %s", key, e)

    def release(self) -> None:
        with self._lock:
            self._released = True
            key, self.key = self.key, None
        if key is not None:
            self._delete(key)

    def _delete(self, key: str) -> None:
        try:
            self.store.delete(key)
        except ImageFSError as e:
            log.warning("cannot remove the lease %s: %s", key, e)

"""Host-wide bookkeeping for one shared mount per key, counted by live holders across processes.

Layout under `root`, per key (an image ID, or for coldstart's store the image ID with the store and
cache folded in, made safe for a file name):

    <key>/lock           flock'd around every change; kept forever (removing it would race)
    <key>/key            the key itself (the image ID, for coldstart's store with the store and
                         cache folded in: runner.imagefs_lower.mount_key), for collect()
    <key>/mnt            the mount point
    <key>/started        present from start() until stop(): stop() is owed even if the mount vanished
    <key>/holders/<name> JSON list of [pid, start_time] of the processes that keep the holder alive

A holder whose processes are all dead is stale and dropped by the next acquire, release or collect; the
mount is stopped when the last live holder goes (with linger=True it stays up, warm for the next
container, until collect(lingering=True)). A mount that stopped answering is stopped and restarted on
acquire.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from runner.lower import Holder
from runner.mounts import is_mounted, mount_healthy
from runner.procs import ProcessRef, any_alive

MountAction = Callable[[str, Path], None]
"""start(key, mountpoint) mounts the image there; stop(key, mountpoint) unmounts it (lazily if busy)."""

_SAFE = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def key_dir_name(key: str) -> str:
    name = key.replace(":", "_")
    if _SAFE.fullmatch(name) and name not in (".", ".."):
        return name
    import hashlib
    return "h-" + hashlib.sha256(key.encode()).hexdigest()[:32]


class SharedMounts:
    """Reference-counted shared mounts; safe across threads and processes on one host."""

    def __init__(self, root: Path, start: MountAction, stop: MountAction,
                 healthy: Callable[[Path], bool] = mount_healthy, linger: bool = False) -> None:
        self.root = root
        self._start = start
        self._stop = stop
        self._healthy = healthy
        self.linger = linger

    def mountpoint(self, key: str) -> Path:
        return self.root / key_dir_name(key) / "mnt"

    def acquire(self, key: str, holder: Holder) -> tuple[Path, bool]:
        """Register holder and return (mountpoint, cold): cold when this call had to start the mount."""
        with self._locked(key) as base:
            self._prune(base)
            mnt = base / "mnt"
            cold = not self._healthy(mnt)
            if cold:
                self._stop_owed(key, base)
                mnt.mkdir(exist_ok=True)
                self._start(key, mnt)
                (base / "started").touch()
            _write_holder(base / "holders" / holder.name, holder)
            return mnt, cold

    def release(self, key: str, holder_name: str) -> None:
        """Drop a holder (idempotent); stop the mount if no live holder is left."""
        base = self.root / key_dir_name(key)
        if not base.is_dir():
            return
        with self._locked(key) as base:
            (base / "holders" / holder_name).unlink(missing_ok=True)
            if self.linger:
                self._prune(base)
            else:
                self._stop_if_unused(key, base)

    def collect(self, lingering: bool = False) -> list[str]:
        """Drop stale holders everywhere and stop mounts nobody holds; returns the keys stopped.

        Lingering mounts (linger=True) are stopped only when `lingering` is set.
        """
        if self.linger and not lingering:
            for lock in sorted(self.root.glob("*/lock")):
                self._prune(lock.parent)
            return []
        stopped = []
        for lock in sorted(self.root.glob("*/lock")):
            key_file = lock.parent / "key"
            key = key_file.read_text() if key_file.exists() else lock.parent.name
            with self._locked(key) as kdir:
                if self._stop_if_unused(key, kdir):
                    stopped.append(key)
        return stopped

    def key_holding(self, holder_name: str) -> str | None:
        """The key under which holder_name is registered, if any (found by looking, not computed:
        the holder may have been registered by another process under another key)."""
        if not self.root.is_dir() or holder_name.startswith(".") or "/" in holder_name:
            return None
        for base in sorted(self.root.iterdir()):
            if (base / "holders" / holder_name).exists():
                key_file = base / "key"
                return key_file.read_text() if key_file.exists() else base.name
        return None

    def holders(self, key: str) -> list[str]:
        hdir = self.root / key_dir_name(key) / "holders"
        return sorted(p.name for p in hdir.iterdir()) if hdir.is_dir() else []

    def _stop_if_unused(self, key: str, base: Path) -> bool:
        return not self._prune(base) and self._stop_owed(key, base)

    def _stop_owed(self, key: str, base: Path) -> bool:
        """Call stop if start ran since the last stop, or something is mounted there; True if called."""
        started = base / "started"
        if not started.exists() and not is_mounted(base / "mnt"):
            return False
        self._stop(key, base / "mnt")
        started.unlink(missing_ok=True)
        return True

    def _prune(self, base: Path) -> int:
        """Remove stale holder files; return how many live ones remain."""
        live = 0
        for path in (base / "holders").iterdir():
            if _holder_alive(path):
                live += 1
            else:
                path.unlink(missing_ok=True)
        return live

    @contextmanager
    def _locked(self, key: str) -> Iterator[Path]:
        base = self.root / key_dir_name(key)
        if not (base / "holders").is_dir():
            (base / "holders").mkdir(parents=True, exist_ok=True)
            (base / "key").write_text(key)
        fd = os.open(base / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield base
        finally:
            os.close(fd)


def _write_holder(path: Path, holder: Holder) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps([ref.to_json() for ref in holder.pids]))
    os.replace(tmp, path)


def _holder_alive(path: Path) -> bool:
    if path.name.startswith("."):
        return False
    try:
        refs = [ProcessRef.from_json(v) for v in json.loads(path.read_text())]
    except (OSError, ValueError):
        return False
    return any_alive(refs)

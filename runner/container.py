"""A container's on-disk state (bundle, writable layer, owner record) and its guaranteed teardown.

    <state_dir>/containers/<id>/owner.json   who owns it: runner and guard processes, runtime, image
    <state_dir>/containers/<id>/bundle/      config.json, rootfs/ (the overlay mount), etc/ files
    <layers_dir>/<id>/upper, work            the overlay's writable layer

teardown() is idempotent and works from any process: the runner's finally block, its guard after the
runner died, or cleanup_stale() in a later run when both died.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runner.mounts import is_mounted, unmount
from runner.procs import ProcessRef, any_alive
from runner.runtime import Runtime

ID_PREFIX = "coldstart-"
_ORPHAN_GRACE_S = 60.0

Release = Callable[[str, str], None]
"""release(image_id, holder_name): give the image's lower back (LowerProvider.release)."""


def new_container_id() -> str:
    return ID_PREFIX + os.urandom(6).hex()


@dataclass
class ContainerPaths:
    id: str
    state: Path
    layer: Path

    @classmethod
    def create_for(cls, container_id: str, state_dir: Path, layers_dir: Path) -> ContainerPaths:
        return cls(container_id, state_dir / "containers" / container_id, layers_dir / container_id)

    @property
    def bundle(self) -> Path:
        return self.state / "bundle"

    @property
    def rootfs(self) -> Path:
        return self.bundle / "rootfs"

    @property
    def owner(self) -> Path:
        return self.state / "owner.json"

    @property
    def pid_file(self) -> Path:
        return self.state / "init.pid"

    @property
    def upper(self) -> Path:
        return self.layer / "upper"

    @property
    def work(self) -> Path:
        return self.layer / "work"


@dataclass
class OwnerRecord:
    owners: list[ProcessRef]
    runtime: Runtime
    image_id: str
    layer: str
    keep: bool = False

    def to_json(self) -> str:
        return json.dumps({"owners": [o.to_json() for o in self.owners], "runtime": self.runtime.to_json(),
                           "image_id": self.image_id, "layer": self.layer, "keep": self.keep})

    @classmethod
    def load(cls, path: Path) -> OwnerRecord:
        doc = json.loads(path.read_text())
        return cls([ProcessRef.from_json(o) for o in doc["owners"]], Runtime.from_json(doc["runtime"]),
                   str(doc["image_id"]), str(doc["layer"]), bool(doc["keep"]))


def prepare(paths: ContainerPaths, record: OwnerRecord) -> None:
    """Create the state and layer directories and write the owner record (atomically)."""
    paths.state.mkdir(parents=True, mode=0o700)
    tmp = paths.state / ".owner.json.tmp"
    tmp.write_text(record.to_json())
    os.replace(tmp, paths.owner)
    paths.rootfs.mkdir(parents=True)
    paths.layer.mkdir(parents=True, mode=0o700)
    paths.upper.mkdir(mode=0o755)
    paths.work.mkdir()


def teardown(paths: ContainerPaths, runtime: Runtime, keep: bool, release: Callable[[], None]) -> list[str]:
    """Delete the container, unmount its rootfs, remove its directories, release the lower.

    Returns the problems met (each step still runs); the owner record goes last, so a teardown cut
    short can be finished by cleanup_stale().
    """
    problems: list[str] = []

    def step(what: str, action: Callable[[], object]) -> None:
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - every step must run; the problem is reported
            problems.append(f"{what}: {exc}")

    step("delete container", lambda: runtime.delete(paths.id))
    step("unmount rootfs", lambda: unmount(paths.rootfs))
    if is_mounted(paths.rootfs):
        return problems + [f"{paths.rootfs} is still mounted; leaving {paths.state}"]
    step("remove writable layer", lambda: _remove_layer(paths, keep))
    step("release image", release)
    step("remove state", lambda: shutil.rmtree(paths.state, ignore_errors=False) if paths.state.exists() else None)
    return problems


def _remove_layer(paths: ContainerPaths, keep: bool) -> None:
    if keep:
        shutil.rmtree(paths.work, ignore_errors=True)
    elif paths.layer.exists():
        shutil.rmtree(paths.layer)


def cleanup_stale(state_dir: Path, release: Release, layers_dir: Path | None = None) -> list[str]:
    """Tear down every container whose owners (runner and guard) are all dead; returns their IDs."""
    root = state_dir / "containers"
    if not root.is_dir():
        return []
    cleaned = []
    for entry in root.iterdir():
        if entry.name.startswith(ID_PREFIX) and _cleanup_one(entry, release, layers_dir):
            cleaned.append(entry.name)
    return cleaned


def _cleanup_one(entry: Path, release: Release, layers_dir: Path | None) -> bool:
    try:
        fd = os.open(entry / "owner.json", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return _cleanup_unowned(entry, layers_dir)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        record = OwnerRecord.load(entry / "owner.json")
    except (OSError, ValueError, KeyError):
        return False
    try:
        if any_alive(record.owners):
            return False
        paths = ContainerPaths(entry.name, entry, Path(record.layer))
        problems = teardown(paths, record.runtime, record.keep, lambda: release(record.image_id, entry.name))
        for problem in problems:
            print(f"coldstart: cleaning up {entry.name}: {problem}", file=sys.stderr)
        return True
    finally:
        os.close(fd)


def _cleanup_unowned(entry: Path, layers_dir: Path | None) -> bool:
    """A directory without an owner record: a runner died while creating it, or one is creating it now."""
    try:
        if time.time() - entry.stat().st_mtime < _ORPHAN_GRACE_S:
            return False
    except FileNotFoundError:
        return False
    rootfs = entry / "bundle" / "rootfs"
    unmount(rootfs)
    if is_mounted(rootfs):
        return False
    shutil.rmtree(entry, ignore_errors=True)
    if layers_dir is not None:
        shutil.rmtree(layers_dir / entry.name, ignore_errors=True)
    return True

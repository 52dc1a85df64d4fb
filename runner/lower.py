"""The seam between the runner and whatever supplies an image's read-only root (a directory, a FUSE mount)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from runner.config import ImageConfigLike
from runner.procs import ProcessRef


@dataclass
class StartCommand:
    """What a container of the image will run: a hint for prefetch when the image has no profile."""

    argv: list[str]
    path: str  # its PATH (no other variable: they may hold secrets, and the hint goes to a daemon)
    cwd: str = "/"


@dataclass
class ResolvedImage:
    """An image reference resolved to an image ID and its config; nothing is mounted yet."""

    ref: str
    image_id: str
    config: ImageConfigLike
    start: StartCommand | None = None  # set by the runner once it knows the container's command


@dataclass
class Holder:
    """Who uses a lower: a container ID and the processes whose life keeps the reference valid."""

    name: str
    pids: tuple[ProcessRef, ...]


@dataclass
class Lower:
    """A mounted, read-only image root ready to be an overlay's lowerdir."""

    path: Path
    config: ImageConfigLike
    cold: bool
    image_id: str


class LowerProvider(Protocol):
    """Resolves image references and hands out their read-only roots, counted per holder.

    release() must be idempotent and must work from another process than acquire() (the runner's guard
    or a later run's stale cleanup calls it after the runner died).
    """

    def resolve(self, image_ref: str) -> ResolvedImage: ...

    def acquire(self, image: ResolvedImage, holder: Holder) -> Lower: ...

    def release(self, image_id: str, holder_name: str) -> None: ...


def directory_image_id(path: Path) -> str:
    """A stable ID for a plain directory used as an image."""
    import hashlib
    return "dir-" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]


class DirectoryProvider:
    """Every reference names one plain directory; nothing is mounted or counted."""

    def __init__(self, root: Path, config: ImageConfigLike) -> None:
        self._root = root
        self._config = config

    def resolve(self, image_ref: str) -> ResolvedImage:
        return ResolvedImage(image_ref, directory_image_id(self._root), self._config)

    def acquire(self, image: ResolvedImage, holder: Holder) -> Lower:
        return Lower(self._root, image.config, False, image.image_id)

    def release(self, image_id: str, holder_name: str) -> None:
        return None


class SharedMountsLike(Protocol):
    def acquire(self, key: str, holder: Holder) -> tuple[Path, bool]: ...

    def release(self, key: str, holder_name: str) -> None: ...

    def mountpoint(self, key: str) -> Path: ...

    def holders(self, key: str) -> list[str]: ...

    def key_holding(self, holder_name: str) -> str | None: ...


class SharedMountProvider:
    """One host-wide mount per key, shared by its containers (see runner.shared_mount.SharedMounts).

    `resolver` maps a reference to a ResolvedImage (the image index); `mounts` starts and stops the
    mount of each key (the FUSE filesystem) and counts holders. `key_of` maps an image ID to its key:
    the image ID itself unless given (coldstart's store folds in the store and the host cache).
    """

    def __init__(self, resolver: Callable[[str], ResolvedImage], mounts: SharedMountsLike,
                 on_acquire: Callable[[ResolvedImage], None] | None = None,
                 key_of: Callable[[str], str] | None = None) -> None:
        self._resolve = resolver
        self._mounts = mounts
        self._on_acquire = on_acquire  # sees the image (and its start command) before a mount starts
        self._key_of = key_of or (lambda image_id: image_id)  # image ID -> shared-mount key

    def resolve(self, image_ref: str) -> ResolvedImage:
        return self._resolve(image_ref)

    def acquire(self, image: ResolvedImage, holder: Holder) -> Lower:
        if self._on_acquire is not None:
            self._on_acquire(image)
        path, cold = self._mounts.acquire(self._key_of(image.image_id), holder)
        return Lower(path, image.config, cold, image.image_id)

    def release(self, image_id: str, holder_name: str) -> None:
        """Release holder_name where it is registered: a stale container found by another run may
        have held a mount under another key (another store or cache, or an older key format)."""
        key = self._key_of(image_id)
        if holder_name not in self._mounts.holders(key):
            key = self._mounts.key_holding(holder_name) or key
        self._mounts.release(key, holder_name)

    def mountpoint(self, image_id: str) -> Path:
        """Where the shared mount of image_id is (or would be) mounted."""
        return self._mounts.mountpoint(self._key_of(image_id))

"""The runner's image source in production: the coldstart store, one shared FUSE mount per image
(and store and host cache).

Mounts are started on demand under STATE/mounts/<image id>.<store and cache>/mnt and shared by
every container of that image, store and host cache on the host (runner.shared_mount counts
holders). The store URL and the cache directory are part of the key so that a lingering mount
started against another store (perhaps one that is gone) or another cache is never handed out.
With linger=True (coldstart run's default) a mount stays up after its last container exits, so
the next container of that image finds the kernel's caches warm; `coldstart umount --all` takes
lingering mounts down.

The resolver reads a tag once and keeps the image's index in the host cache (imagefs.indexcache),
where the mount daemon, started for the image ID and not the tag, finds it without a request.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse

from imagefs.fs.cache import default_cache_dir
from imagefs.fs.mounts import mount_image, unmount
from imagefs.images import resolve_with_tag
from imagefs.indexcache import load_config
from imagefs.store.factory import default_store_url, open_store
from runner.lower import ResolvedImage, SharedMountProvider, StartCommand
from runner.mounts import is_mounted
from runner.shared_mount import SharedMounts


# Whether a mount of an image without a start-up profile prefetches a guessed working set
# (imagefs.guess); see the README's prefetch numbers for why this is the default.
GUESS_BY_DEFAULT = True


class StoreResolver:
    """NAME:TAG or ID -> image ID and config; remembers the tag's start-up profile for the mount."""

    def __init__(self, store_url: str | None, prefetch: bool = True, cache_dir: str | None = None) -> None:
        self.store_url = store_url
        self.prefetch = prefetch
        self.cache_dir = cache_dir or str(default_cache_dir())
        self.profiles: dict[str, str] = {}

    def __call__(self, ref: str) -> ResolvedImage:
        with open_store(self.store_url) as store:
            # An ID is not looked up first: loading its index says whether it exists.
            image_id, tag = resolve_with_tag(store, ref, check_id=False)
            config = load_config(store, image_id, self.cache_dir)
        if self.prefetch:
            self.profiles[image_id] = str(tag.get("profile") or "")
        return ResolvedImage(ref, image_id, config)


def mount_key(image_id: str, store_url: str | None, cache_dir: str | None) -> str:
    """The shared-mount key of an image served from store_url through cache_dir (defaults resolved):
    the image ID, a dot, and 12 hex digits naming the store and the cache."""
    where = f"{_store_identity(store_url or default_store_url())}\0{os.path.abspath(cache_dir or default_cache_dir())}"
    return f"{image_id}.{hashlib.sha256(where.encode()).hexdigest()[:12]}"


def _store_identity(url: str) -> str:
    """A local store's URL as file:// and an absolute path (a plain path, file:///s and file:///s/
    are one store, as imagefs.store.factory.open_store reads them); any other URL as given."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return "file://" + os.path.abspath(parsed.path if parsed.scheme else url)
    return url


def image_of_key(key: str) -> str:
    return key.rpartition(".")[0] or key


def imagefs_provider(state_dir: Path, store_url: str | None, cache_dir: str | None,
                     cache_size: int | None = None, *, linger: bool = True,
                     prefetch: bool = True, prefetch_workers: int | None = None,
                     guess: bool = GUESS_BY_DEFAULT) -> SharedMountProvider:
    """A LowerProvider serving images from the store through shared lazy mounts. With prefetch,
    a mount started for a tag that has a start-up profile streams the profile's chunks, with
    prefetch_workers parallel fetches (the fetcher's default when None); a mount of an image
    without a profile prefetches what the last mount of it on this host touched first, else (with
    guess) what the container's command is guessed to read first (imagefs.guess)."""
    resolver = StoreResolver(store_url, prefetch, cache_dir)
    tuning = {"limits": {"prefetch_workers": prefetch_workers}} if prefetch_workers else {}
    starts: dict[str, StartCommand] = {}

    def remember(image: ResolvedImage) -> None:
        if image.start is not None:
            starts[image.image_id] = image.start

    def start(key: str, mnt: Path) -> None:
        image_id = image_of_key(key)
        profile = resolver.profiles.get(image_id, "")
        hint: dict[str, object] = {}
        if prefetch and guess and not profile and image_id in starts:
            cmd = starts[image_id]
            hint = {"guess_argv": cmd.argv, "guess_path": cmd.path, "guess_cwd": cmd.cwd}
        mount_image(store_url, image_id, mnt, cache_dir=cache_dir, cache_size=cache_size,
                    profile=profile, learned=prefetch, **tuning, **hint)

    def stop(key: str, mnt: Path) -> None:
        if is_mounted(mnt):
            unmount(mnt)

    mounts = SharedMounts(state_dir / "mounts", start, stop, linger=linger)
    return SharedMountProvider(resolver, mounts, on_acquire=remember,
                               key_of=lambda image_id: mount_key(image_id, store_url, cache_dir))


def unmount_all(state_dir: Path) -> list[str]:
    """Unmount every shared image mount under state_dir (lingering or orphaned)."""
    done = []
    for mnt in sorted((state_dir / "mounts").glob("*/mnt")):
        if is_mounted(mnt):
            unmount(mnt)
            done.append(str(mnt))
    return done

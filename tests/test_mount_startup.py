"""Mount start-up: the host index cache, resolving once, and forked or exec'd daemons."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from imagefs import chunks as blobs
from imagefs import indexcache
from imagefs.errors import CorruptBlob, ImageNotFound
from imagefs.fs import mounts
from imagefs.images import Ref, load_index, set_tag
from imagefs.indexcache import IndexCache, config_of, load_config
from imagefs.store.base import BlobInfo, BlobStore
from imagefs.store.local import LocalStore
from runner.imagefs_lower import StoreResolver
from runner.procs import process_start_time
from tests.fixtures.mount import Mounter, needs_fuse, store_image
from tests.test_fs_ops import make_tree


class CountingStore(BlobStore):
    """Delegates to a store and records every call as (operation, key)."""

    def __init__(self, inner: BlobStore) -> None:
        self.inner = inner
        self.url = inner.url
        self.calls: list[tuple[str, str]] = []

    def get(self, key: str) -> bytes:
        self.calls.append(("get", key))
        return self.inner.get(key)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self.calls.append(("get_range", key))
        return self.inner.get_range(key, offset, length)

    def put(self, key: str, data: bytes) -> None:
        self.calls.append(("put", key))
        self.inner.put(key, data)

    def exists(self, key: str) -> bool:
        self.calls.append(("exists", key))
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self.calls.append(("delete", key))
        self.inner.delete(key)

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        self.calls.append(("list", prefix))
        return self.inner.list(prefix)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LocalStore, str]:
    base = tmp_path_factory.mktemp("startup")
    src = make_tree(base / "src")
    store = LocalStore(base / "store", fsync=False)
    image_id = store_image(store, src)
    set_tag(store, Ref("startup", "v1"), image_id)
    return src, store, image_id


# -- the index cache -------------------------------------------------------------------------------
def test_second_load_comes_from_the_host(image: tuple[Path, LocalStore, str], tmp_path: Path) -> None:
    _src, store, image_id = image
    counting = CountingStore(store)
    first = indexcache.load_index(counting, image_id, tmp_path)
    second = indexcache.load_index(counting, image_id, tmp_path)
    assert counting.calls == [("get", blobs.index_key(image_id))]
    assert second.chunks == first.chunks == load_index(store, image_id).chunks
    assert (tmp_path / "indexes" / image_id).read_bytes() == store.get(blobs.index_key(image_id))


def test_a_damaged_copy_is_dropped_and_fetched_again(image: tuple[Path, LocalStore, str],
                                                     tmp_path: Path) -> None:
    _src, store, image_id = image
    indexcache.load_index(store, image_id, tmp_path)
    path = IndexCache(tmp_path).path(image_id)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    counting = CountingStore(store)
    assert indexcache.load_index(counting, image_id, tmp_path).chunks == load_index(store, image_id).chunks
    assert counting.calls == [("get", blobs.index_key(image_id))]
    assert path.read_bytes() == store.get(blobs.index_key(image_id))


def test_missing_image_and_unusable_cache(image: tuple[Path, LocalStore, str], tmp_path: Path) -> None:
    _src, store, image_id = image
    with pytest.raises(ImageNotFound):
        indexcache.load_index(store, "0" * 64, tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert indexcache.load_index(store, image_id, blocker).chunks  # cannot keep it: still loads
    assert not IndexCache(blocker).has(image_id)


def test_the_cache_keeps_a_bounded_number(image: tuple[Path, LocalStore, str], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _src, store, image_id = image
    monkeypatch.setattr(indexcache, "MAX_ENTRIES", 3)
    cache = IndexCache(tmp_path)
    cache.dir.mkdir()
    for n in range(4):
        old = cache.dir / f"{n:064x}"
        old.write_bytes(b"x")
        os.utime(old, (1000 + n, 1000 + n))
    cache.save(image_id, store.get(blobs.index_key(image_id)))
    assert sorted(p.name for p in cache.dir.iterdir()) == sorted([f"{2:064x}", f"{3:064x}", image_id])


def test_config_without_decoding_the_tree(image: tuple[Path, LocalStore, str], tmp_path: Path) -> None:
    _src, store, image_id = image
    raw = blobs.decode(store.get(blobs.index_key(image_id)), image_id)
    assert config_of(raw, image_id) == load_index(store, image_id).config
    assert load_config(store, image_id, tmp_path) == load_index(store, image_id).config
    with pytest.raises(CorruptBlob):
        config_of(raw[:40], image_id)
    with pytest.raises(CorruptBlob):
        config_of(b"\x93\x01\x02\x03", image_id)


def test_resolver_reads_the_tag_once_and_keeps_the_index(image: tuple[Path, LocalStore, str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _src, store, image_id = image
    counting = CountingStore(store)
    monkeypatch.setattr("runner.imagefs_lower.open_store", lambda url: counting)
    resolver = StoreResolver(store.url, cache_dir=str(tmp_path))
    resolved = resolver("startup:v1")
    assert (resolved.image_id, resolver.profiles[image_id]) == (image_id, "")
    assert counting.calls == [("get", "tags/startup/v1"), ("get", blobs.index_key(image_id))]
    counting.calls.clear()
    assert resolver(image_id).config == resolved.config
    assert counting.calls == []  # an ID whose index the host holds needs no request at all


def test_light_imports_for_the_runner() -> None:
    code = ("import sys, runner.imagefs_lower, imagefs.fs.mounts, imagefs.store.s3\n"
            "print(sorted(m for m in ('trio', 'pyfuse3', 'boto3', 'botocore') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.replace("'", '"')) == []


# -- starting the daemon ---------------------------------------------------------------------------
def fds_of(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


@needs_fuse
@pytest.mark.root
@pytest.mark.parametrize("spawn", ["fork", "exec"])
def test_spawned_daemon_is_a_clean_process(mounter: Mounter, image: tuple[Path, LocalStore, str],
                                           tmp_path: Path, spawn: str) -> None:
    src, store, image_id = image
    lock_path = tmp_path / "held.lock"
    with open(lock_path, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # like SharedMounts' per-image lock during start
        info = mounter.mount(store.url, image_id, spawn=spawn)
    with open(lock_path, "w") as again:
        fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the daemon did not keep it locked
    assert (Path(info.mountpoint) / "etc/passwd").read_bytes() == (src / "etc/passwd").read_bytes()
    assert mounts.daemon_alive(info.pid) and os.getsid(info.pid) != os.getsid(0)  # its own session
    assert os.readlink(f"/proc/{info.pid}/cwd") == "/"
    assert str(lock_path) not in fds_of(info.pid)
    assert "start-up (ms)" in Path(info.log_path).read_text()
    if spawn == "fork":
        assert Path(f"/proc/{info.pid}/comm").read_text().strip() == mounts.PROCESS_NAME
    mounter.unmount(info)
    assert not mounts.daemon_alive(info.pid)


@needs_fuse
@pytest.mark.root
def test_forked_daemon_stops_on_sigterm(mounter: Mounter, image: tuple[Path, LocalStore, str]) -> None:
    _src, store, image_id = image
    old = signal.signal(signal.SIGTERM, lambda *_: None)  # a caller's handler must not be inherited
    try:
        info = mounter.mount(store.url, image_id, spawn="fork")
    finally:
        signal.signal(signal.SIGTERM, old)
    os.kill(info.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while mounts.daemon_alive(info.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not mounts.daemon_alive(info.pid) and not mounts.is_mounted(info.mountpoint)
    mounter.mounted.clear()


@needs_fuse
@pytest.mark.root
def test_mount_by_id_uses_the_cached_index(mounter: Mounter, image: tuple[Path, LocalStore, str],
                                           tmp_path: Path) -> None:
    """After the resolver kept the index, neither the caller nor the daemon fetches it again."""
    src, store, image_id = image
    private = LocalStore(tmp_path / "store", fsync=False)
    for blob in store.list():
        private.put(blob.key, store.get(blob.key))
    StoreResolver(private.url, cache_dir=str(mounter.cache_dir))(image_id)
    private.delete(blobs.index_key(image_id))
    info = mounter.mount(private.url, image_id)
    assert (Path(info.mountpoint) / "etc/passwd").read_bytes() == (src / "etc/passwd").read_bytes()
    with pytest.raises(ImageNotFound):
        mounter.mount(private.url, "1" * 64)


def test_bad_spawn_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="spawn"):
        mounts.mount_image("file:///nowhere", "x:y", tmp_path, spawn="thread")


# -- a daemon forked ahead of need (mounts.prefork, as `coldstart run` and `coldstart mount` do) ----
PREFORK_SCRIPT = """
import json, os, sys
from imagefs.fs import mounts
mounts.prefork()
zygote = mounts._zygote
assert zygote is not None, "no daemon was forked ahead"
what, store_url, ref, mountpoint, cache = sys.argv[1:]
if what == "killed":
    os.kill(zygote.pid, 9)
    os.waitpid(zygote.pid, 0)
if what != "unused":
    info = mounts.mount_image(store_url, ref, mountpoint, cache_dir=cache)
    print(json.dumps({"pid": info.pid, "zygote": zygote.pid, "stack": "trio" in sys.modules}))
else:
    print(json.dumps({"zygote": zygote.pid}))
"""


def run_prefork(what: str, store: LocalStore, ref: str, mountpoint: Path, cache: Path) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", PREFORK_SCRIPT, what, store.url, ref, str(mountpoint), str(cache)],
                         capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether pid exits (a zombie waiting for whoever adopted it counts) within timeout."""
    deadline = time.monotonic() + timeout
    while process_start_time(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@needs_fuse
@pytest.mark.root
def test_preforked_daemon_serves_the_mount(mounter: Mounter, image: tuple[Path, LocalStore, str]) -> None:
    """The caller hands its config to the copy it forked at start and never imports the FUSE
    stack itself; the daemon is as clean as a forked one, and the go-between is gone."""
    src, store, image_id = image
    mp = mounter.mountpoint()
    doc = run_prefork("used", store, image_id, mp, mounter.cache_dir)
    assert not doc["stack"], "the caller imported trio: the pre-forked daemon was not used"
    pid = doc["pid"]
    assert (mp / "etc/passwd").read_bytes() == (src / "etc/passwd").read_bytes()
    assert mounts.daemon_alive(pid) and os.getsid(pid) != os.getsid(0)
    assert Path(f"/proc/{pid}/comm").read_text().strip() == mounts.PROCESS_NAME
    assert os.readlink(f"/proc/{pid}/cwd") == "/" and "start-up (ms)" in Path(mounts.mount_paths(str(mp)).log).read_text()
    assert gone(doc["zygote"])
    mounts.unmount(mp)
    assert not mounts.daemon_alive(pid)


@needs_fuse
@pytest.mark.root
def test_a_dead_preforked_daemon_falls_back_to_forking(mounter: Mounter, image: tuple[Path, LocalStore, str]) -> None:
    src, store, image_id = image
    mp = mounter.mountpoint()
    doc = run_prefork("killed", store, image_id, mp, mounter.cache_dir)
    assert doc["stack"]  # the fallback forks from the caller, which imports the stack for it
    assert (mp / "etc/passwd").read_bytes() == (src / "etc/passwd").read_bytes()
    mounts.unmount(mp)
    assert not mounts.daemon_alive(doc["pid"])


def test_an_unused_preforked_daemon_exits_with_its_caller(image: tuple[Path, LocalStore, str], tmp_path: Path) -> None:
    _src, store, image_id = image
    doc = run_prefork("unused", store, image_id, tmp_path, tmp_path / "cache")
    assert gone(doc["zygote"])


def test_only_commands_that_mount_prefork() -> None:
    from tools.cli import _mounts_soon

    assert _mounts_soon(["run", "img:1", "--", "true"]) and _mounts_soon(["-v", "mount", "img:1", "/mnt"])
    assert not _mounts_soon(["mount", "--foreground", "img:1", "/mnt"]) and not _mounts_soon(["run", "--help"])
    assert not _mounts_soon(["images"]) and not _mounts_soon([])
    assert _mounts_soon(["run", "img:1", "--", "tool", "--help"])  # the container's argument


def test_the_daemon_can_tell_glibc_to_keep_freed_memory() -> None:
    """On glibc (this project's hosts), mallopt takes each setting; elsewhere it answers False."""
    from imagefs.fs.daemon import keep_freed_memory

    assert keep_freed_memory() is True

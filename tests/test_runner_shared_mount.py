"""Host-wide shared mounts: one mount per image, counted by live holders, restarted when broken."""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from imagefs.fs import mounts as fs_mounts
from imagefs.images import parse_ref, set_tag
from imagefs.importers.rootfs import import_rootfs
from imagefs.store.local import LocalStore
from imagefs.writer import write_image
from runner import DirectoryProvider, ImageConfig, ResolvedImage, SharedMountProvider, SharedMounts, run
from runner.lower import Holder, directory_image_id
from runner.mounts import bind_mount, is_mounted, unmount
from runner.procs import ProcessRef
from runner.shared_mount import key_dir_name
from tests.fixtures.cli import coldstart
from tests.fixtures.runner import RunnerEnv, busybox_root, make_busybox_root, needs_runc, runner_env  # noqa: F401

pytestmark = [pytest.mark.root, needs_runc]

KEY = "sha256:0123abcd"


class FakeFs:
    """Stands in for the FUSE filesystem: a read-only bind mount of a directory, with a call log."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.calls: list[str] = []
        self.lock = threading.Lock()

    def start(self, key: str, mnt: Path) -> None:
        with self.lock:
            self.calls.append(f"start {key}")
        bind_mount(self.source, mnt, readonly=True)

    def stop(self, key: str, mnt: Path) -> None:
        with self.lock:
            self.calls.append(f"stop {key}")
        unmount(mnt)


@pytest.fixture
def fs(tmp_path: Path) -> FakeFs:
    src = tmp_path / "image"
    src.mkdir()
    (src / "hello").write_text("hi\n")
    return FakeFs(src)


@pytest.fixture
def mounts(tmp_path: Path, fs: FakeFs) -> SharedMounts:
    shared = SharedMounts(tmp_path / "mounts", fs.start, fs.stop)
    yield shared
    for mnt in (tmp_path / "mounts").glob("*/mnt"):
        while is_mounted(mnt):
            unmount(mnt)


def _me() -> tuple[ProcessRef, ...]:
    return (ProcessRef.current(),)


def _dead() -> tuple[ProcessRef, ...]:
    proc = subprocess.Popen(["sleep", "30"])
    ref = ProcessRef.of(proc.pid)
    proc.kill()
    proc.wait()
    return (ref,)


def test_one_mount_for_all_holders(mounts: SharedMounts, fs: FakeFs) -> None:
    mnt, cold = mounts.acquire(KEY, Holder("a", _me()))
    assert cold and (mnt / "hello").read_text() == "hi\n"
    mnt2, cold2 = mounts.acquire(KEY, Holder("b", _me()))
    assert (mnt2, cold2) == (mnt, False)
    assert mounts.holders(KEY) == ["a", "b"]
    mounts.release(KEY, "a")
    assert is_mounted(mnt)
    mounts.release(KEY, "b")
    mounts.release(KEY, "b")  # idempotent
    assert not is_mounted(mnt)
    assert fs.calls == [f"start {KEY}", f"stop {KEY}"]


def test_dead_holders_are_dropped(mounts: SharedMounts, fs: FakeFs) -> None:
    mnt, _ = mounts.acquire(KEY, Holder("ghost", _dead()))
    assert mounts.collect() == [KEY]
    assert not is_mounted(mnt) and mounts.holders(KEY) == []
    mounts.acquire(KEY, Holder("ghost2", _dead()))
    mounts.acquire(KEY, Holder("live", _me()))
    assert mounts.holders(KEY) == ["live"]
    assert mounts.collect() == []
    mounts.release(KEY, "live")
    assert fs.calls == [f"start {KEY}", f"stop {KEY}", f"start {KEY}", f"stop {KEY}"]


def test_a_holder_lives_while_any_of_its_processes_does(mounts: SharedMounts) -> None:
    mounts.acquire(KEY, Holder("pair", _dead() + _me()))
    assert mounts.collect() == [] and mounts.holders(KEY) == ["pair"]
    mounts.release(KEY, "pair")


def test_broken_mount_is_restarted(mounts: SharedMounts, fs: FakeFs) -> None:
    mnt, _ = mounts.acquire(KEY, Holder("a", _me()))
    unmount(mnt)  # the filesystem died under us
    mnt2, cold = mounts.acquire(KEY, Holder("b", _me()))
    assert cold and mnt2 == mnt and (mnt / "hello").exists()
    assert fs.calls == [f"start {KEY}", f"stop {KEY}", f"start {KEY}"]  # the dead one is stopped first
    mounts.release(KEY, "a")
    mounts.release(KEY, "b")


def test_unhealthy_mount_is_stopped_then_started(tmp_path: Path, fs: FakeFs) -> None:
    healthy = {"ok": True}
    shared = SharedMounts(tmp_path / "m", fs.start, fs.stop, healthy=lambda p: healthy["ok"] and is_mounted(p))
    shared.acquire(KEY, Holder("a", _me()))
    healthy["ok"] = False  # mounted but answering ENOTCONN, say
    shared.acquire(KEY, Holder("b", _me()))
    assert fs.calls == [f"start {KEY}", f"stop {KEY}", f"start {KEY}"]
    healthy["ok"] = True
    shared.release(KEY, "a")
    shared.release(KEY, "b")
    assert not is_mounted(shared.mountpoint(KEY))


def test_concurrent_acquires_start_once(mounts: SharedMounts, fs: FakeFs) -> None:
    barrier = threading.Barrier(12)

    def take(i: int) -> None:
        barrier.wait()
        mounts.acquire(KEY, Holder(f"h{i}", _me()))
    threads = [threading.Thread(target=take, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fs.calls == [f"start {KEY}"] and len(mounts.holders(KEY)) == 12
    for i in range(12):
        mounts.release(KEY, f"h{i}")
    assert fs.calls == [f"start {KEY}", f"stop {KEY}"]


def test_lingering_mount_stays_warm_until_collected(tmp_path: Path, fs: FakeFs) -> None:
    shared = SharedMounts(tmp_path / "m", fs.start, fs.stop, linger=True)
    mnt, cold = shared.acquire(KEY, Holder("a", _me()))
    shared.release(KEY, "a")
    assert cold and is_mounted(mnt)
    assert shared.acquire(KEY, Holder("b", _me())) == (mnt, False)
    shared.release(KEY, "b")
    assert shared.collect() == [] and is_mounted(mnt)
    assert shared.collect(lingering=True) == [KEY] and not is_mounted(mnt)
    assert fs.calls == [f"start {KEY}", f"stop {KEY}"]


def test_key_dir_names() -> None:
    assert key_dir_name("sha256:abc") == "sha256_abc"
    assert key_dir_name("../x").startswith("h-") and key_dir_name("a/b").startswith("h-")
    assert key_dir_name("..").startswith("h-")


def test_run_survives_a_broken_mount_and_cleans_up(runner_env: RunnerEnv) -> None:
    calls: list[str] = []

    def start(key: str, mnt: Path) -> None:
        calls.append("start")
        bind_mount(runner_env.root, mnt, readonly=True)

    def stop(key: str, mnt: Path) -> None:
        calls.append("stop")
        unmount(mnt)
    shared = SharedMounts(runner_env.state_dir / "mounts", start, stop)
    image = ResolvedImage("x:1", directory_image_id(runner_env.root), ImageConfig())
    provider = SharedMountProvider(lambda ref: image, shared)
    out = bytearray()

    def sink(data: bytes) -> None:
        out.extend(data)
        if b"up" in data:
            unmount(shared.mountpoint(image.image_id))  # the image mount breaks mid-run
    result = run(runner_env.options("sh", "-c", "echo up; sleep 0.3; echo done"), provider,
                 stdout=sink, stderr=lambda b: None)
    assert result.exit_code == 0 and out == b"up\ndone\n"
    assert result.timings["mount_cold"] is True
    assert calls == ["start", "stop"]
    assert not is_mounted(shared.mountpoint(image.image_id))


def test_directory_provider_is_never_cold(runner_env: RunnerEnv) -> None:
    result = run(runner_env.options("true"), DirectoryProvider(runner_env.root, ImageConfig()),
                 stdout=lambda b: None, stderr=lambda b: None)
    assert result.timings["mount_cold"] is False


def test_release_finds_a_holder_registered_under_another_key(tmp_path: Path, fs: FakeFs) -> None:
    """A later run's stale-container cleanup releases by image ID with its own store and cache; a
    holder the dead container registered under another key (another store, an older key format) is
    found where it is, and its mount stopped."""
    shared = SharedMounts(tmp_path / "m", fs.start, fs.stop)
    image = ResolvedImage("x:1", "img", ImageConfig())
    first = SharedMountProvider(lambda ref: image, shared, key_of=lambda i: i + ".aaaa")
    other = SharedMountProvider(lambda ref: image, shared, key_of=lambda i: i + ".bbbb")
    first.acquire(image, Holder("c1", (ProcessRef.current(),)))
    mnt = shared.mountpoint("img.aaaa")
    try:
        assert shared.key_holding("c1") == "img.aaaa" and shared.key_holding("c2") is None
        other.release("img", "c1")
        assert shared.holders("img.aaaa") == [] and not is_mounted(mnt)
        assert fs.calls == ["start img.aaaa", "stop img.aaaa"]
        other.release("img", "c1")  # idempotent
    finally:
        if is_mounted(mnt):
            unmount(mnt)


def test_a_lingering_mount_of_another_store_is_not_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """coldstart run leaves the mount up; a run of the same image from another store (the first one
    gone) gets its own mount, not the lingering one whose reads would fail."""
    root = make_busybox_root(tmp_path / "root")
    (root / "data").write_bytes(os.urandom(3_000_000))
    first = LocalStore(tmp_path / "store1", fsync=False)
    image_id, _ = write_image(first, import_rootfs(root))
    set_tag(first, parse_ref("img:1"), image_id)
    shutil.copytree(tmp_path / "store1", tmp_path / "store2")
    monkeypatch.setenv("COLDSTART_RUN_DIR", str(tmp_path / "run"))  # here and in the CLI

    def cs(store: str, *args: str) -> subprocess.CompletedProcess[str]:
        return coldstart(*args, store=f"file://{tmp_path / store}", cache=tmp_path / "cache")

    try:
        r = cs("store1", "run", "img:1", "--", "/bin/true")
        assert r.returncode == 0, r.stderr
        shutil.rmtree(tmp_path / "store1")  # the first store goes away; its mount lingers
        r = cs("store2", "run", "img:1", "--", "/bin/sh", "-c", "md5sum /data")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[0] == subprocess.run(["md5sum", str(root / "data")], capture_output=True,
                                                     text=True).stdout.split()[0]
        mine = [m for m in fs_mounts.list_mounts() if m.get("image") == image_id]
        assert len(mine) == 2
        r = cs("store2", "run", "img:1", "--", "/bin/true")  # the same store again: its mount is reused
        assert r.returncode == 0, r.stderr
        assert len([m for m in fs_mounts.list_mounts() if m.get("image") == image_id]) == 2
    finally:
        cs("store2", "umount", "--all")


def test_daemon_killed_under_a_running_container(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real thing: `coldstart run` on a lazy mount whose daemon is killed (SIGKILL) while the
    container runs. The container's next read fails (no hang, no wrong bytes), the run ends and
    cleans up, and the next run of the image mounts it afresh and reads it right."""
    root = make_busybox_root(tmp_path / "root")
    (root / "big").write_bytes(random.Random(5).randbytes(8 << 20))  # unread until after the kill
    want = hashlib.md5((root / "big").read_bytes()).hexdigest()
    store = LocalStore(tmp_path / "store", fsync=False)
    image_id, _ = write_image(store, import_rootfs(str(root)))
    set_tag(store, parse_ref("x:1"), image_id)
    monkeypatch.setenv("COLDSTART_STORE", f"file://{tmp_path}/store")
    monkeypatch.setenv("COLDSTART_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("COLDSTART_CACHE", str(tmp_path / "cache"))

    def cs(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                              timeout=120)
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "run", "--no-prefetch", "x:1", "--",
                             "sh", "-c", "echo up; sleep 1; md5sum /big; echo after"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "up\n"
            (state,) = fs_mounts.list_mounts()
            os.kill(int(state["pid"]), signal.SIGKILL)
            start = time.monotonic()
            out, err = proc.communicate(timeout=60)
            assert time.monotonic() - start < 30
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        # md5sum failed on the dead mount (the shell carried on): no checksum, right or wrong
        assert out == "after\n", (out, err)
        assert "md5sum" in err and ("not connected" in err or "I/O error" in err), err
        again = cs("run", "--no-prefetch", "x:1", "--", "md5sum", "/big")
        assert again.returncode == 0, again.stderr
        assert again.stdout.split()[0] == want
    finally:
        assert cs("umount", "--all").returncode == 0
    assert not [line for line in Path("/proc/mounts").read_text().splitlines() if str(tmp_path) in line]

"""Stopping mounts that do not cooperate: a daemon signalled while a read waits for a store that
never answers, a daemon that answers nothing (stopped), and mounts that are not coldstart's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

from imagefs import chunks as blobs
from imagefs import profile as profiles
from imagefs.fs import mounts
from imagefs.fs.errors import MountError
from imagefs.images import load_index
from imagefs.store.local import LocalStore
from tests.fixtures.mount import Mounter, store_image

pytestmark = pytest.mark.root


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, LocalStore, str]:
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (src / "big.bin").write_bytes(os.urandom(3 << 20))
    store = LocalStore(tmp_path / "store", fsync=False)
    return src, store, store_image(store, src)


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> float:
    """Seconds until cond() held; fails the test if it did not within timeout."""
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.02)
    return time.monotonic() - start


def hang_chunks_of(store: LocalStore, image_id: str, path: str) -> None:
    """Make the store hang on the chunks of a file: each becomes a FIFO no one writes, so a read
    of it blocks in open() (a store thread that cancellation cannot stop)."""
    index = load_index(store, image_id)
    node = index.inode(index.resolve(path))  # type: ignore[arg-type]
    for c in (node.extents or [])[::3]:
        blob = store._path(blobs.chunk_key(index.chunks[c]))
        blob.unlink()
        os.mkfifo(blob)


def coldstart(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          timeout=60)


def test_sigterm_with_a_read_stuck_in_the_store_unmounts_at_once(
        mounter: Mounter, image: tuple[Path, LocalStore, str]) -> None:
    _src, store, image_id = image
    hang_chunks_of(store, image_id, "/big.bin")
    info = mounter.mount(store.url, image_id, limits={"drain_timeout": 1.0})
    mp = Path(info.mountpoint)
    reader = subprocess.Popen(["cat", str(mp / "big.bin")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: mounts.read_stats(mp)["fetch"]["inflight"] > 0)
        time.sleep(0.2)
        assert reader.poll() is None  # waiting for the store
        os.kill(info.pid, signal.SIGTERM)
        assert wait_for(lambda: not mounts.is_mounted(str(mp))) < 2.0
        assert os.listdir(mp) == []  # the directory below, at once
        assert reader.wait(timeout=2.0) != 0  # its read failed instead of waiting on
        # the store thread never returns: the daemon abandons it (the fetcher's load is cancelled
        # without waiting for it), or at the latest its exit timer leaves it behind (drain_timeout + 1 s)
        assert wait_for(lambda: not mounts.daemon_alive(info.pid)) < 5.0
        assert not os.path.exists(info.state_path) and not os.path.exists(info.socket_path)
    finally:
        if reader.poll() is None:  # a read the daemon took holds the reader until the session ends
            mounts.abort_connection(str(mp))
            reader.kill()
        reader.wait(timeout=10)
        reader.stderr.close()  # type: ignore[union-attr]
    mounter.mounted.clear()


def test_sigterm_unmounts_and_exits_at_once_when_nothing_is_stuck(
        mounter: Mounter, image: tuple[Path, LocalStore, str]) -> None:
    src, store, image_id = image
    info = mounter.mount(store.url, image_id)
    mp = Path(info.mountpoint)
    assert (mp / "big.bin").read_bytes() == (src / "big.bin").read_bytes()
    os.kill(info.pid, signal.SIGTERM)
    assert wait_for(lambda: not mounts.daemon_alive(info.pid)) < 3.0
    assert not mounts.is_mounted(str(mp)) and not os.path.exists(info.state_path)
    assert "exiting without waiting" not in Path(info.log_path).read_text()
    assert os.path.exists(profiles.learned_path(info.cache_dir, image_id))  # it stopped in order
    mounter.mounted.clear()


@pytest.fixture
def stopped(mounter: Mounter, image: tuple[Path, LocalStore, str]) -> Iterator[mounts.MountInfo]:
    """A mount whose daemon is alive but answers nothing (SIGSTOP), continued at the end."""
    _src, store, image_id = image
    info = mounter.mount(store.url, image_id)
    os.kill(info.pid, signal.SIGSTOP)
    try:
        yield info
    finally:
        if mounts.daemon_alive(info.pid):
            os.kill(info.pid, signal.SIGCONT)


def test_umount_of_a_daemon_that_does_not_answer_aborts_and_kills_it(
        mounter: Mounter, stopped: mounts.MountInfo) -> None:
    start = time.monotonic()
    mounts.unmount(stopped.mountpoint, umount_timeout=1.0)
    assert time.monotonic() - start < 1.0 + mounts.KILL_WAIT + 3.0
    assert not mounts.is_mounted(stopped.mountpoint)
    assert not mounts.daemon_alive(stopped.pid)  # killed: it did not stop
    assert not os.path.exists(stopped.state_path)
    mounter.mounted.clear()


def test_cli_umount_of_a_daemon_that_does_not_answer(mounter: Mounter,
                                                     stopped: mounts.MountInfo) -> None:
    res = coldstart("umount", stopped.mountpoint)
    assert res.returncode == 0, res.stderr
    assert "aborting its FUSE connection" in res.stderr
    assert not mounts.is_mounted(stopped.mountpoint) and not mounts.daemon_alive(stopped.pid)
    mounter.mounted.clear()


@pytest.fixture
def foreign(mounter: Mounter) -> Iterator[Path]:
    """A busy tmpfs mount (a file held open in it), unmounted at the end."""
    mp = mounter.mountpoint()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mp)], check=True)
    try:
        (mp / "f").write_text("data")
        with open(mp / "f") as held:
            yield mp
            assert held.read() == "data"
    finally:
        subprocess.run(["umount", "-l", str(mp)], check=True)


def test_umount_refuses_what_is_not_a_coldstart_mount(foreign: Path) -> None:
    with pytest.raises(MountError, match="not a coldstart mount"):
        mounts.unmount(foreign)
    res = coldstart("umount", str(foreign))
    assert res.returncode == MountError.exit_code
    assert "not a coldstart mount (it is tmpfs)" in res.stderr
    assert mounts.mount_type(str(foreign)) == "tmpfs"


def test_umount_all_touches_only_coldstart_mounts(mounter: Mounter, foreign: Path,
                                                  image: tuple[Path, LocalStore, str]) -> None:
    _src, store, image_id = image
    info = mounter.mount(store.url, image_id)
    # a state file left by a dead daemon whose mountpoint now holds someone else's mount
    stale = mounts.mount_paths(str(foreign)).state
    Path(stale).write_text(json.dumps({"pid": 0, "mountpoint": str(foreign)}))
    res = coldstart("umount", "--all")
    assert res.returncode == MountError.exit_code
    assert f"{foreign} is not a coldstart mount" in res.stderr
    assert mounts.mount_type(str(foreign)) == "tmpfs"
    assert not mounts.is_mounted(info.mountpoint) and not mounts.daemon_alive(info.pid)
    os.unlink(stale)
    mounter.mounted.clear()

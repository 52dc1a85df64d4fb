"""Real mounts through the kernel: the whole tree, Python in a chroot, caching, the CLI."""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from imagefs.errors import ImageNotFound
from imagefs.fs import mounts
from imagefs.fs.errors import MountError
from imagefs.fs.fuse_ops import POLL_US, PYFUSE3_FEATURES
from imagefs.gc import gc
from imagefs.images import Ref, load_index, parse_ref, remove_tag, set_tag
from imagefs.store.local import LocalStore
from tests.fixtures.mount import Mounter, make_python_root, store_image, takes_o_direct
from tests.test_fs_ops import make_tree
from tests.treecmp import diff, snapshot

pytestmark = pytest.mark.root
SYSTEM_PYTHON = "/usr/bin/python3.11"  # other users cannot run the venv under /root


@pytest.fixture(scope="module")
def rich_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LocalStore, str]:
    base = tmp_path_factory.mktemp("mount-rich")
    src = make_tree(base / "src")
    store = LocalStore(base / "store", fsync=False)
    return src, store, store_image(store, src)


@pytest.fixture(scope="module")
def python_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LocalStore, str]:
    base = tmp_path_factory.mktemp("mount-python")
    src = make_python_root(base / "src")
    store = LocalStore(base / "store", fsync=False)
    return src, store, store_image(store, src)


def fuse_ops(mp: str) -> dict[str, int]:
    return {name: o["count"] for name, o in mounts.read_stats(mp)["fuse"]["ops"].items()}


def test_mounted_tree_matches_source(mounter: Mounter, rich_image: tuple[Path, LocalStore, str]) -> None:
    src, store, image_id = rich_image
    info = mounter.mount(store.url, image_id)
    assert info.cache_cold and info.total_chunks > 0
    assert mounts.mount_type(info.mountpoint) == "fuse.coldstart"
    want, got = snapshot(src), snapshot(info.mountpoint)
    assert not diff(want, got)
    assert len(got) == len(want) > 300
    st = os.lstat(Path(info.mountpoint, "bin/busybox"))
    assert st.st_ino == os.lstat(Path(info.mountpoint, "bin/sh")).st_ino and st.st_nlink == 2
    assert Path(info.mountpoint, "tmp/sock").is_socket() and Path(info.mountpoint, "dev/fifo").is_fifo()


def test_python_imports_in_a_chroot(mounter: Mounter,
                                    python_image: tuple[Path, LocalStore, str]) -> None:
    _src, store, image_id = python_image
    info = mounter.mount(store.url, image_id)
    code = "import json, sqlite3, decimal, asyncio, ssl, email.parser, ctypes; print(json.dumps([1]))"
    res = subprocess.run(["chroot", info.mountpoint, "/usr/bin/python3.11", "-c", code],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[1]"
    stats = mounts.read_stats(info.mountpoint)
    assert stats["fetch"]["errors"] == 0 and stats["fetch"]["chunks_fetched"] > 0
    trace = mounts.read_trace(info.mountpoint)
    paths = [e["path"] for e in trace if e["kind"] == "file"]
    assert "/usr/bin/python3.11" in paths and any(p.endswith("/json/__init__.py") or
                                                  "json/__pycache__" in p for p in paths)


def test_kernel_caches_entries_attributes_and_pages(mounter: Mounter,
                                                    rich_image: tuple[Path, LocalStore, str]) -> None:
    src, store, image_id = rich_image
    mp = mounter.mount(store.url, image_id).mountpoint
    target = Path(mp, "big.bin")
    assert target.read_bytes() == (src / "big.bin").read_bytes()
    assert not Path(mp, "etc/missing").exists()
    before = fuse_ops(mp)
    for _ in range(3):
        assert target.read_bytes() == (src / "big.bin").read_bytes()
        assert not Path(mp, "etc/missing").exists()
        os.stat(Path(mp, "etc/passwd"))
    after = fuse_ops(mp)
    assert after.get("read") == before.get("read")
    assert after.get("lookup") == before.get("lookup") + 1  # etc/passwd: first time
    assert after.get("getattr", 0) == before.get("getattr", 0)


def test_writes_fail_with_erofs(mounter: Mounter, rich_image: tuple[Path, LocalStore, str]) -> None:
    _src, store, image_id = rich_image
    mp = Path(mounter.mount(store.url, image_id).mountpoint)
    for action in (lambda: open(mp / "etc/passwd", "a"), lambda: (mp / "new").mkdir(),
                   lambda: (mp / "empty").unlink(), lambda: os.chmod(mp / "empty", 0o777),
                   lambda: os.setxattr(mp / "empty", "user.x", b"1")):
        with pytest.raises(OSError) as exc:
            action()
        assert exc.value.errno == errno.EROFS


def test_other_users_read_with_kernel_permission_checks(
        mounter: Mounter, rich_image: tuple[Path, LocalStore, str]) -> None:
    src, store, image_id = rich_image
    mp = mounter.mount(store.url, image_id).mountpoint
    script = ("import sys\nprint(open(sys.argv[1]).read().splitlines()[0])\n"
              "try:\n    open(sys.argv[2], 'rb')\nexcept PermissionError:\n    print('denied')\n")
    res = subprocess.run([SYSTEM_PYTHON, "-c", script, f"{mp}/etc/passwd", f"{mp}/home/data.txt"],
                         user=2000, group=2000, extra_groups=[], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [(src / "etc/passwd").read_text().split()[0], "denied"]
    owner = subprocess.run([SYSTEM_PYTHON, "-c", f"open('{mp}/home/data.txt', 'rb').read()"],
                           user=1000, group=1000, extra_groups=[], capture_output=True)
    assert owner.returncode == 0


def test_mount_by_tag_and_errors(mounter: Mounter, rich_image: tuple[Path, LocalStore, str]) -> None:
    _src, store, image_id = rich_image
    set_tag(store, Ref("rich", "v1"), image_id)  # type: ignore[arg-type]
    info = mounter.mount(store.url, "rich:v1")
    assert info.image_id == image_id
    with pytest.raises(MountError, match="already mounted"):
        mounts.mount_image(store.url, "rich:v1", info.mountpoint)
    with pytest.raises(ImageNotFound):
        mounter.mount(store.url, "rich:nope")
    with pytest.raises(MountError, match="not mounted"):
        mounts.unmount(mounter.mountpoint())


def test_unmount_removes_state_and_stops_the_daemon(
        mounter: Mounter, rich_image: tuple[Path, LocalStore, str]) -> None:
    _src, store, image_id = rich_image
    info = mounter.mount(store.url, image_id)
    assert mounts.daemon_alive(info.pid) and os.path.exists(info.state_path)
    assert [m["mountpoint"] for m in mounts.list_mounts()] == [info.mountpoint]
    mounter.unmount(info)
    assert not mounts.is_mounted(info.mountpoint)
    assert not mounts.daemon_alive(info.pid)
    assert not os.path.exists(info.state_path) and not os.path.exists(info.socket_path)


def test_a_mounted_image_is_kept_by_gc_until_unmounted(mounter: Mounter, tmp_path: Path) -> None:
    """The mount's lease: its image survives `rm` of its tag and a gc while mounted (a container
    still reads it), and goes at the first gc after the unmount, which removes the lease."""
    store = LocalStore(tmp_path / "store", fsync=False)
    image_id = store_image(store, make_tree(tmp_path / "src"))
    set_tag(store, parse_ref("app:1"), image_id)
    info = mounter.mount(store.url, "app:1", lease_delay_s=0.0)
    deadline = time.monotonic() + 20
    while not list(store.list("leases/mount-")):
        assert time.monotonic() < deadline, "no mount lease written"
        time.sleep(0.05)
    remove_tag(store, parse_ref("app:1"))
    assert gc(store, grace=0).deleted_indexes == []
    assert (Path(info.mountpoint) / "etc" / "passwd").read_bytes()  # chunks still in the store
    mounter.unmount(info)
    assert list(store.list("leases/")) == []
    assert gc(store, grace=0).deleted_indexes == [image_id]


def test_busy_mount_is_detached_lazily(mounter: Mounter,
                                       rich_image: tuple[Path, LocalStore, str]) -> None:
    src, store, image_id = rich_image
    info = mounter.mount(store.url, image_id)
    with open(Path(info.mountpoint, "etc/passwd"), "rb") as busy:
        mounts.unmount(info.mountpoint, timeout=0.5)
        assert not mounts.is_mounted(info.mountpoint)
        assert busy.read() == (src / "etc/passwd").read_bytes()  # still served to its holder
    mounter.mounted.clear()
    deadline_ok = mounts._wait_exit(info.pid, 10.0)
    assert deadline_ok, "daemon did not exit after the last file was closed"


def test_prefetch_requests_name_only_chunks_of_the_image(
        mounter: Mounter, rich_image: tuple[Path, LocalStore, str]) -> None:
    """A prefetch digest names a host-cache file: anything but a chunk of this image (with its
    size) is refused before it reaches the cache, so no path outside it is ever touched."""
    _src, store, image_id = rich_image
    info = mounter.mount(store.url, image_id)
    victim = mounter.base / "victim.txt"
    victim.write_text("hello")
    index = load_index(store, image_id)
    digest, size = index.chunks[0], index.chunk_sizes[0]
    for bad in ([("../victim.txt", 5)], [("../../victim.txt", 5)], [(str(victim), 5)],
                [("f" * 64, 5)], [(digest, size + 1)], [(digest.upper(), size)], [[digest]], "nope"):
        with pytest.raises(MountError, match="not a chunk of image|must be a list"):
            mounts.prefetch(info.mountpoint, bad)  # type: ignore[arg-type]
    assert victim.read_text() == "hello"
    assert mounts.prefetch(info.mountpoint, [(digest, size)]) == 1
    assert mounts.read_stats(info.mountpoint)["fetch"]["errors"] == 0


def test_a_cache_size_of_zero_is_refused(local_store: LocalStore, tmp_path: Path) -> None:
    for size in (0, -1):
        with pytest.raises(MountError, match="more than 0 bytes"):
            mounts.mount_image(local_store.url, "any:tag", tmp_path, cache_size=size)
    res = coldstart("mount", "any:tag", str(tmp_path), "--store", local_store.url, "--cache-size", "0")
    assert res.returncode == MountError.exit_code
    assert "host cache size must be more than 0 bytes" in res.stderr


def coldstart(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_mount_stats_umount(mounter: Mounter, rich_image: tuple[Path, LocalStore, str]) -> None:
    src, store, image_id = rich_image
    mp = mounter.mountpoint()
    res = coldstart("mount", image_id, str(mp), "--store", store.url, "--cache",
                    str(mounter.base / "clicache"), "--cache-size", "100M", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["mountpoint"] == str(mp) and doc["cached_chunks"] == 0
    assert (mp / "etc/passwd").read_bytes() == (src / "etc/passwd").read_bytes()
    stats = coldstart("stats", str(mp), "--json")
    assert stats.returncode == 0, stats.stderr
    s = json.loads(stats.stdout)
    assert s["fetch"]["disk"]["max_bytes"] == 100 << 20 and s["fuse"]["ops"]["read"]["count"] >= 1
    demand = s["fetch"]["times"]["demand"]  # reading /etc/passwd had to wait for its chunk
    assert demand["load"]["count"] == s["fetch"]["by_kind"]["demand"]["chunks"] >= 1
    assert demand["store"]["count"] == demand["load"]["count"] and demand["load"]["total_ms"] > 0
    direct = s["fetch"]["disk"]["direct_writes"]
    assert direct or not takes_o_direct(mounter.base / "clicache")  # not given up where it works
    # CPU: the event-loop thread (which serves the requests) is part of the whole daemon; the
    # worker threads' share may round away on a small image, so no strict order between the two
    cpu = s["cpu"]
    assert 0 < cpu["loop_s"] <= cpu["process_s"]
    for path in sorted(src.rglob("*"))[:200]:
        os.lstat(mp / path.relative_to(src))
    later = json.loads(coldstart("stats", str(mp), "--json").stdout)["cpu"]
    assert later["loop_s"] > cpu["loop_s"] and later["process_s"] >= later["loop_s"]
    human = coldstart("stats", str(mp))
    assert "host" in human.stdout and "p99 us" in human.stdout
    assert re.search(r"^  demand +store +\d+ ", human.stdout, re.M), human.stdout  # the loads table
    assert "s serving FUSE requests)" in human.stdout
    assert ("(O_DIRECT writes)" if direct else "(buffered writes)") in human.stdout
    trace = json.loads(coldstart("stats", str(mp), "--trace").stdout)
    touched = [e for e in trace if e["kind"] == "file"]
    assert {"kind": "file", "path": "/etc/passwd"}.items() <= touched[0].items()
    assert {"kind": "lookup", "path": "/etc/passwd"}.items() <= trace[1].items()  # after /etc
    res = coldstart("umount", str(mp))
    assert res.returncode == 0, res.stderr
    assert not mounts.is_mounted(str(mp))
    res = coldstart("stats", str(mp))
    assert res.returncode != 0 and "no running coldstart mount" in res.stderr


def test_cli_mount_foreground(mounter: Mounter, rich_image: tuple[Path, LocalStore, str]) -> None:
    src, store, image_id = rich_image
    mp = mounter.mountpoint()
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "mount", image_id, str(mp),
                             "--store", store.url, "--foreground"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("mounted ")
        assert (mp / "etc/group").read_bytes() == (src / "etc/group").read_bytes()
        assert coldstart("umount", str(mp)).returncode == 0
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_polling_serves_bursts_and_cold_walks(mounter: Mounter,
                                              rich_image: tuple[Path, LocalStore, str]) -> None:
    """With the patched pyfuse3 the daemon polls the device after each reply and stops while
    chunk loads run: a burst of negative lookups and a cold walk of the whole tree (whose loads
    switch polling off and on again many times) are served right; poll_us=0 never polls."""
    if "polling" not in PYFUSE3_FEATURES:
        pytest.skip("this pyfuse3 cannot poll (scripts/setup.sh builds one that can)")
    src, store, image_id = rich_image
    want = snapshot(src)
    for poll in (POLL_US, 0):
        info = mounter.mount(store.url, image_id, cache_dir=mounter.base / f"poll-{poll}", poll_us=poll)
        assert mounts.read_stats(info.mountpoint)["fuse"]["polling_us"] == poll
        for i in range(2000):
            with pytest.raises(FileNotFoundError):
                os.stat(Path(info.mountpoint, f"etc/missing-{i}"))
        assert fuse_ops(info.mountpoint)["lookup"] >= 2000
        assert not diff(want, snapshot(info.mountpoint))
        stats = mounts.read_stats(info.mountpoint)
        assert stats["fetch"]["chunks_fetched"] > 1 and stats["fetch"]["errors"] == 0
        mounter.unmount(info)


def test_poll_time_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from imagefs.fs.daemon import DaemonConfig
    from imagefs.fs.fuse_ops import default_poll_us

    monkeypatch.delenv("COLDSTART_POLL_US", raising=False)
    assert default_poll_us() == POLL_US
    for text, want in (("0", 0), ("120", 120), ("-5", 0), ("soon", POLL_US)):
        monkeypatch.setenv("COLDSTART_POLL_US", text)
        assert default_poll_us() == want
    monkeypatch.setenv("COLDSTART_POLL_US", "7")
    config = DaemonConfig(store_url="file:///s", image_id="x", mountpoint="/m", cache_dir="/c",
                          state_path="/s.json", socket_path="/s.sock")
    assert config.poll_us == 7

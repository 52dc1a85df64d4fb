"""Faults on real mounts: store outage, corrupt chunks, corrupt cache files, a tiny cache budget,
a killed daemon, and many readers at once. Never a hang, never a dead mount, never wrong bytes."""
from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote

import pytest

from imagefs import chunks as blobs
from imagefs.errors import StoreError
from imagefs.fs import mounts
from imagefs.images import load_index
from imagefs.index import ImageIndex
from imagefs.store.factory import open_store
from imagefs.store.local import LocalStore
from tests.fixtures.mount import Mounter, make_python_root, store_image
from tests.fixtures.seaweed import SeaweedServer
from tests.test_fs_ops import make_tree
from tests.test_s3fast import Reply, Script, serve

pytestmark = pytest.mark.root
STORE_DEADLINE = 3.0


def files_of(root: Path) -> list[Path]:
    """Regular files below root, relative, sorted."""
    out = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            full = Path(dirpath, name)
            if full.is_file() and not full.is_symlink():
                out.append(full.relative_to(root))
    return sorted(out)


def uncached_read(path: Path) -> bytes:
    """Read through the daemon: drop the kernel's pages of this file first."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        out = bytearray()
        while data := os.read(fd, 1 << 20):
            out += data
        return bytes(out)
    finally:
        os.close(fd)


def chunks_of(index: ImageIndex, path: str) -> set[str]:
    node = index.inode(index.resolve(os.fsencode(path)))  # type: ignore[arg-type]
    return {index.chunks[c] for c in (node.extents or [])[::3]}


@pytest.fixture(scope="module")
def rich_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("faults") / "src")


@pytest.fixture(scope="module")
def python_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LocalStore, str]:
    base = tmp_path_factory.mktemp("faults-python")
    src = make_python_root(base / "src")
    store = LocalStore(base / "store", fsync=False)
    return src, store, store_image(store, src)


def test_store_outage_fails_reads_within_the_deadline_and_recovers(
        mounter: Mounter, rich_src: Path, s3_server: SeaweedServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    url = s3_server.url_for(s3_server.new_bucket_name(), "img")
    with open_store(url) as store:
        image_id = store_image(store, rich_src)
    monkeypatch.setenv("COLDSTART_STORE_DEADLINE", str(STORE_DEADLINE))
    mp = Path(mounter.mount(url, image_id).mountpoint)
    passwd = (rich_src / "etc/passwd").read_bytes()
    assert uncached_read(mp / "etc/passwd") == passwd
    s3_server.stop()
    try:
        start = time.monotonic()
        with pytest.raises(OSError) as exc:
            uncached_read(mp / "big.bin")
        assert exc.value.errno == errno.EIO
        # Once: the kernel's retry of the failed read (a smaller one) does not wait again.
        assert time.monotonic() - start < STORE_DEADLINE + 1.5
        assert uncached_read(mp / "etc/passwd") == passwd  # cached data is still served
        assert sorted(os.listdir(mp / "many"))[:2] == ["f000", "f001"]  # metadata is local
    finally:
        s3_server.start()
    assert uncached_read(mp / "big.bin") == (rich_src / "big.bin").read_bytes()
    stats = mounts.read_stats(mp)
    assert stats["fetch"]["errors"] >= 1


def s3_answers(store: LocalStore, root: str) -> Callable[[str, str, dict[str, str]], Reply]:
    """A fake S3 endpoint's answers for the blobs of store, as if under /<root>/."""

    def answer(_method: str, path: str, headers: dict[str, str]) -> Reply:
        key = unquote(path.partition("?")[0]).removeprefix(f"/{root}/")
        try:
            data = store.get(key)
        except StoreError:
            return 404, {}, b""
        if m := re.fullmatch(r"bytes=(\d+)-(\d+)", headers.get("range", "")):
            first, last = int(m[1]), min(int(m[2]), len(data) - 1)
            return 206, {"Content-Range": f"bytes {first}-{last}/{len(data)}"}, data[first:last + 1]
        return 200, {}, data

    return answer


def test_a_store_sending_slowly_fails_reads_within_the_deadline(
        mounter: Mounter, rich_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunk bodies sent a byte at a time, each well within the read timeout: reads fail with
    EIO by the store deadline instead of hanging, and work again once the store sends normally."""
    store = LocalStore(tmp_path / "store", fsync=False)
    image_id = store_image(store, rich_src)
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "coldstart")
    monkeypatch.setenv("COLDSTART_STORE_DEADLINE", str(STORE_DEADLINE))
    script = Script(default=s3_answers(store, "bkt/img"))
    with serve(script) as endpoint:
        info = mounter.mount(f"s3://bkt/img?endpoint={endpoint}", image_id)
        mp = Path(info.mountpoint)
        script.trickle = 0.5
        start = time.monotonic()
        with pytest.raises(OSError) as exc:
            uncached_read(mp / "big.bin")
        assert exc.value.errno == errno.EIO
        assert time.monotonic() - start < STORE_DEADLINE + 1.5
        script.trickle = 0
        # Loads still in flight (readahead) end by their deadline; failures are held briefly.
        until = time.monotonic() + STORE_DEADLINE + 5
        while mounts.read_stats(mp)["fetch"]["inflight"] and time.monotonic() < until:
            time.sleep(0.1)
        time.sleep(2)
        assert uncached_read(mp / "big.bin") == (rich_src / "big.bin").read_bytes()
        assert uncached_read(mp / "etc/passwd") == (rich_src / "etc/passwd").read_bytes()
        mounter.unmount(info)


def test_corrupt_chunk_in_store_is_eio_never_wrong_bytes(mounter: Mounter, rich_src: Path,
                                                         tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store", fsync=False)
    image_id = store_image(store, rich_src)
    index = load_index(store, image_id)
    victim = next(iter(chunks_of(index, "/home/data.txt")))
    data = blobs.decode(store.get(blobs.chunk_key(victim)), victim)
    store.put(blobs.chunk_key(victim), blobs.encode(bytes([data[0] ^ 0xFF]) + data[1:]))
    mp = Path(mounter.mount(store.url, image_id).mountpoint)
    failed = []
    for rel in files_of(rich_src):
        try:
            got = uncached_read(mp / rel)
        except OSError as e:
            assert e.errno == errno.EIO
            failed.append(rel)
            continue
        assert got == (rich_src / rel).read_bytes(), rel
    assert Path("home/data.txt") in failed
    assert all(victim in chunks_of(index, f"/{rel}") for rel in failed)
    stats = mounts.read_stats(mp)
    assert stats["fetch"]["corrupt"] >= 1 and mounts.daemon_alive(stats["pid"])


def test_corrupt_host_cache_files_are_refetched(mounter: Mounter,
                                                python_image: tuple[Path, LocalStore, str]) -> None:
    src, store, image_id = python_image
    wanted = [Path("usr/bin/python3.11"), Path("usr/lib/python3.11/os.py")]
    info = mounter.mount(store.url, image_id)
    for rel in wanted:
        assert uncached_read(Path(info.mountpoint, rel)) == (src / rel).read_bytes()
    mounter.unmount(info)  # drains the host-cache writes
    cached = [p for p in (mounter.cache_dir / "chunks").rglob("*") if p.is_file()]
    assert cached
    for p in cached:
        raw = bytearray(p.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        p.write_bytes(bytes(raw))
    info = mounter.mount(store.url, image_id)
    assert info.cached_chunks == len(cached)
    for rel in wanted:
        assert uncached_read(Path(info.mountpoint, rel)) == (src / rel).read_bytes()
    disk = mounts.read_stats(info.mountpoint)["fetch"]["disk"]
    assert disk["corrupt_dropped"] >= 1 and disk["hits"] == 0


def test_cache_smaller_than_the_image(mounter: Mounter,
                                      python_image: tuple[Path, LocalStore, str]) -> None:
    src, store, image_id = python_image
    budget = 8 << 20
    info = mounter.mount(store.url, image_id, cache_size=budget, memory_size=2 << 20)
    for rel in files_of(src):
        assert uncached_read(Path(info.mountpoint, rel)) == (src / rel).read_bytes(), rel
    stats = mounts.read_stats(info.mountpoint)
    disk = stats["fetch"]["disk"]
    assert disk["evictions"] > 0 and disk["bytes"] <= budget + (4 << 20)
    on_disk = sum(p.stat().st_size for p in (mounter.cache_dir / "chunks").rglob("*") if p.is_file())
    assert on_disk <= budget + (4 << 20)


def test_kill_9_then_umount_and_mount_again(mounter: Mounter, rich_src: Path, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store", fsync=False)
    image_id = store_image(store, rich_src)
    info = mounter.mount(store.url, image_id)
    mp = Path(info.mountpoint)
    assert (mp / "etc/passwd").read_bytes() == (rich_src / "etc/passwd").read_bytes()
    os.kill(info.pid, signal.SIGKILL)
    assert mounts._wait_exit(info.pid, 10.0)
    with pytest.raises(OSError) as exc:
        os.stat(mp / "etc/group")
    assert exc.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    mounts.unmount(mp)
    assert not mounts.is_mounted(str(mp))
    again = mounter.mount(store.url, image_id, mountpoint=mp)
    assert (mp / "big.bin").read_bytes() == (rich_src / "big.bin").read_bytes()
    os.kill(again.pid, signal.SIGKILL)  # and mounting over a dead mount cleans up by itself
    assert mounts._wait_exit(again.pid, 10.0)
    third = mounter.mount(store.url, image_id, mountpoint=mp)
    assert third.pid != again.pid
    assert (mp / "etc/group").read_bytes() == (rich_src / "etc/group").read_bytes()
    os.kill(third.pid, signal.SIGKILL)  # even when its state file is gone too
    assert mounts._wait_exit(third.pid, 10.0)
    os.unlink(third.state_path)
    fourth = mounter.mount(store.url, image_id, mountpoint=mp)
    assert (mp / "etc/passwd").read_bytes() == (rich_src / "etc/passwd").read_bytes()
    assert mounts.daemon_alive(fourth.pid)


HASH_ALL = """
import hashlib, os, sys
h = hashlib.sha256()
for dirpath, dirs, files in sorted(os.walk(sys.argv[1])):
    dirs.sort()
    for name in sorted(files):
        p = os.path.join(dirpath, name)
        if os.path.isfile(p) and not os.path.islink(p):
            with open(p, 'rb') as f:
                h.update(name.encode() + f.read())
print(h.hexdigest())
"""


def test_eight_readers_at_once(mounter: Mounter, python_image: tuple[Path, LocalStore, str]) -> None:
    src, store, image_id = python_image
    info = mounter.mount(store.url, image_id)
    tree = "usr/lib/python3.11"
    procs = [subprocess.Popen(["/usr/bin/python3.11", "-c", HASH_ALL, f"{info.mountpoint}/{tree}"],
                              stdout=subprocess.PIPE, text=True) for _ in range(8)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    expected = subprocess.run(["/usr/bin/python3.11", "-c", HASH_ALL, str(src / tree)],
                              capture_output=True, text=True, check=True).stdout.strip()
    assert outs == [expected] * 8
    fetch = mounts.read_stats(info.mountpoint)["fetch"]
    assert fetch["errors"] == 0
    assert fetch["chunks_fetched"] <= info.total_chunks  # each chunk fetched at most once

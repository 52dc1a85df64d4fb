"""The hot path of reads: parts of verified host-cache files, in-place checks, gathered reads,
small files handed to the kernel on open, neighbour readahead, and what a real mount asks for."""
from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio

from imagefs.chunks import Digest, digest_of
from imagefs.fs import mounts
from imagefs.fs.cache import HostCache, MemoryCache
from imagefs.fs.errors import ChunkUnavailable
from imagefs.fs.fetcher import ChunkFetcher, FetchLimits
from imagefs.fs.fuse_ops import PYFUSE3_FEATURES, FuseOps
from imagefs.fs.model import ImageFS, ReadaheadPolicy
from imagefs.fs.trace import AccessTrace
from imagefs.images import load_index
from imagefs.importers.rootfs import import_rootfs
from imagefs.index import ImageIndex
from imagefs.store.local import LocalStore
from imagefs.writer import write_image
from tests.fixtures.mount import Mounter
from tests.test_fs_fetcher import ProbeStore, put_chunks
from tests.test_fs_ops import SMALL_CHUNKS, make_tree, read_all, resolve

Image = tuple[Path, LocalStore, ImageIndex, str]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    base = tmp_path_factory.mktemp("perf")
    src = make_tree(base / "src")
    store = LocalStore(base / "store", fsync=False)
    image_id, _ = write_image(store, import_rootfs(src), params=SMALL_CHUNKS)
    return src, store, load_index(store, image_id), image_id


def chunk(i: int, size: int = 300_000) -> tuple[Digest, bytes]:
    data = bytes(range(256)) * (size // 256) + i.to_bytes(4, "little")
    return digest_of(data), data


# -- host cache: in-place checks and parts of verified files ----------------------------------------
def test_parts_are_served_only_from_files_verified_here(tmp_path: Path) -> None:
    d, data = chunk(1)
    HostCache(tmp_path).put(d, data)  # another process (daemon) wrote it
    cache = HostCache(tmp_path)
    assert cache.read_part(d, 10, 100) is None  # there, but not verified by this one yet
    assert cache.verify(d, len(data))
    assert cache.read_part(d, 10, 100) == data[10:110]
    assert cache.read_part(d, 1000, 5000, wait=True) == data[1000:6000]
    assert cache.counters.hits == 1 and cache.counters.part_reads == 2
    cache.close_files()


def test_a_file_replaced_after_verification_is_not_trusted(tmp_path: Path) -> None:
    cache = HostCache(tmp_path)
    d, data = chunk(2)
    cache.put(d, data)
    assert cache.get(d, len(data)) == data
    path = cache.path(d)
    mtime = path.stat().st_mtime_ns
    os.unlink(path)
    path.write_bytes(b"x" * len(data))  # another file under the verified name (maybe same inode)
    os.utime(path, ns=(mtime + 1, mtime + 1))  # written in another clock tick
    assert cache.read_part(d, 0, 10) is None
    assert cache.get(d, len(data)) is None and cache.counters.corrupt_dropped == 1


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_in_place_check_drops_a_bad_file(tmp_path: Path, damage: str) -> None:
    cache = HostCache(tmp_path)
    d, data = chunk(3)
    cache.put(d, data)
    raw = bytearray(cache.path(d).read_bytes())
    if damage == "flip":
        raw[-7] ^= 1
    else:
        del raw[-100:]
    cache.path(d).write_bytes(bytes(raw))
    assert not cache.verify(d, len(data))
    assert not cache.path(d).exists() and cache.counters.corrupt_dropped == 1
    assert not cache.verify(d, len(data)) and cache.counters.misses == 2


# -- fetcher: background loads of cached chunks are checks in place --------------------------------
def run_fetcher(fetcher: ChunkFetcher, fn: Any) -> Any:
    async def main() -> Any:
        async with fetcher.running():
            return await fn(fetcher)

    return trio.run(main)


def test_prefetch_of_a_cached_chunk_checks_it_in_place(tmp_path: Path) -> None:
    store = ProbeStore(LocalStore(tmp_path / "store", fsync=False))
    (d, data), = put_chunks(store, 1, size=200_000)
    HostCache(tmp_path / "cache").put(d, data)  # written by an earlier daemon
    disk = HostCache(tmp_path / "cache")

    async def go(f: ChunkFetcher) -> tuple[bytes, bytes]:
        f.prefetch([(d, len(data))])
        while f.pending("prefetch") or f.stats()["inflight"]:
            await trio.sleep(0.01)
        part = bytes(await f.get_range(d, len(data), 500, 1000))
        return part, await f.get(d, len(data))

    f = ChunkFetcher(store, disk, MemoryCache())
    part, whole = run_fetcher(f, go)
    assert part == data[500:1500] and whole == data
    assert not store.gets and disk.counters.part_reads == 1
    assert disk.counters.hits == 2  # the check in place, then the whole load get() asked for
    assert f.memory.counters.evicted_chunks == 0 and len(f.memory) == 1


def test_get_range_waits_for_a_load_in_flight(tmp_path: Path) -> None:
    store = ProbeStore(LocalStore(tmp_path / "store", fsync=False), delay=0.05)
    (d, data), = put_chunks(store, 1)

    async def go(f: ChunkFetcher) -> list[bytes]:
        out: list[bytes] = []

        async def one(off: int) -> None:
            out.append(bytes(await f.get_range(d, len(data), off, 10)))

        async with trio.open_nursery() as n:
            n.start_soon(f.get, d, len(data))
            await trio.sleep(0.01)
            for off in (0, 100, 200):
                n.start_soon(one, off)
        return sorted(out)

    f = ChunkFetcher(store, None, MemoryCache())
    assert run_fetcher(f, go) == sorted(data[o:o + 10] for o in (0, 100, 200))
    assert len(store.gets) == 1 and f.counters.joined == 3


# -- model: gathered reads, pushes, neighbours ------------------------------------------------------
def with_fs(index: ImageIndex, store: Any, fn: Any, **fs_kw: Any) -> Any:
    async def main() -> Any:
        fetcher = ChunkFetcher(store, None, MemoryCache(), FetchLimits())
        async with fetcher.running():
            return await fn(ImageFS(index, fetcher, trace=AccessTrace(), **fs_kw), fetcher)

    return trio.run(main)


def test_reads_across_chunks_are_one_buffer(image: Image) -> None:
    src, store, index, _id = image
    ino = index.resolve("/big.bin")
    want = (src / "big.bin").read_bytes()

    async def go(fs: ImageFS, _f: ChunkFetcher) -> list[bool]:
        fh = fs.open(ino, os.O_RDONLY)
        results = []
        for off, size in ((0, 1 << 20), (100_000, 500_000), (len(want) - 10, 100)):
            first = await fs.read(fh, off, size)  # loads
            again = await fs.read(fh, off, size)  # at hand: gathered without waiting
            results.append(bytes(first) == bytes(again) == want[off:off + size])
        return results

    assert with_fs(index, store, go) == [True, True, True]


def test_a_failed_chunk_of_a_gathered_read_is_its_own_error(image: Image) -> None:
    _src, store, index, _id = image
    down = ProbeStore(store)
    down.down = True
    ino = index.resolve("/big.bin")

    async def go(fs: ImageFS, _f: ChunkFetcher) -> None:
        with pytest.raises(ChunkUnavailable):
            await fs.read(fs.open(ino, os.O_RDONLY), 0, 1 << 20)  # several chunks, all failing

    with_fs(index, down, go)


def test_small_files_are_pushed_once_on_first_open(image: Image) -> None:
    src, store, index, _id = image
    ino = index.resolve("/etc/passwd")

    async def go(fs: ImageFS, _f: ChunkFetcher) -> list[Any]:
        fh = fs.open(ino, os.O_RDONLY)
        nothing_at_hand = fs.contents_to_push(fh)
        await fs.read(fh, 0, 10)  # loads the chunk
        fs.release(fh)
        first, second = fs.open(ino, os.O_RDONLY), fs.open(ino, os.O_RDONLY)
        while_another_is_open = fs.contents_to_push(second)
        fs.release(second)
        pushed = fs.contents_to_push(first)
        fs.release(first)
        again = fs.contents_to_push(fs.open(ino, os.O_RDONLY))
        return [nothing_at_hand, while_another_is_open, pushed and bytes(pushed), again]

    assert with_fs(index, store, go) == [None, None, (src / "etc/passwd").read_bytes(), None]
    big = index.resolve("/big.bin")

    async def too_big(fs: ImageFS, _f: ChunkFetcher) -> Any:
        fh = fs.open(big, os.O_RDONLY)
        await fs.read(fh, 0, 1 << 20)
        return fs.contents_to_push(fh)

    assert with_fs(index, store, too_big, push_max=1000) is None


def test_a_read_that_waits_loads_the_next_chunk(image: Image) -> None:
    _src, store, index, _id = image
    ino = index.resolve("/etc/passwd")
    node = index.inode(ino)
    c = (node.extents or [])[0]

    async def go(fs: ImageFS, f: ChunkFetcher) -> bool:
        await fs.read(fs.open(ino, os.O_RDONLY), 0, 10)
        while f.pending("readahead") or f.stats()["inflight"]:
            await trio.sleep(0.01)
        return index.chunks[c + 1] in f.memory

    assert c + 1 < len(index.chunks)
    assert with_fs(index, store, go)
    assert not with_fs(index, store, go, readahead=ReadaheadPolicy(neighbors=0))


# -- adapter ----------------------------------------------------------------------------------------
def test_flush_and_fsync_are_enosys(image: Image) -> None:
    _src, store, index, _id = image

    async def go() -> list[int]:
        ops = FuseOps(ImageFS(index, ChunkFetcher(store, None, MemoryCache())), skip_open=False)
        codes = []
        for call in (ops.flush(1), ops.fsync(1, False)):
            with pytest.raises(pyfuse3.FUSEError) as exc:
                await call
            codes.append(exc.value.errno)
        return codes

    assert trio.run(go) == [errno.ENOSYS, errno.ENOSYS]


def test_open_pushes_only_with_a_kernel_session(image: Image,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _src, store, index, _id = image
    stored: list[tuple[int, int, bytes]] = []
    monkeypatch.setattr(pyfuse3, "notify_store",
                        lambda ino, off, data: stored.append((ino, off, bytes(data))))

    async def go() -> None:
        fetcher = ChunkFetcher(store, None, MemoryCache())
        async with fetcher.running():
            ops = FuseOps(ImageFS(index, fetcher), skip_open=False)
            passwd = await resolve(ops, "etc/passwd")
            await read_all(ops, passwd)
            await read_all(ops, passwd)  # no session: nothing pushed
            assert not stored
            ops.init()
            group = await resolve(ops, "etc/group")
            await read_all(ops, group)  # its chunk is at hand, as etc/passwd was read
            assert ops.metrics.as_dict()["pushed_files"] == len(stored)

    trio.run(go)
    assert [s[:2] for s in stored] == [(index.resolve("/etc/group"), 0)]


# -- a real mount -----------------------------------------------------------------------------------
@pytest.mark.root
def test_mount_serves_small_files_without_reads(mounter: Mounter,
                                                image: Image) -> None:
    """Where open is answered (a stock pyfuse3, or skip_open=False as here): small files go to
    the page cache on open."""
    src, store, _index, image_id = image
    info = mounter.mount(store.url, image_id, skip_open=False)
    mp = Path(info.mountpoint)
    many = sorted((src / "many").iterdir())
    assert (mp / "many" / many[0].name).read_bytes() == many[0].read_bytes()  # loads the chunk
    before = mounts.read_stats(info.mountpoint)["fuse"]
    for f in many[1:]:
        assert (mp / "many" / f.name).read_bytes() == f.read_bytes()
    after = mounts.read_stats(info.mountpoint)["fuse"]
    assert after["ops"]["open"]["count"] - before["ops"]["open"]["count"] == len(many) - 1  # opens served
    assert after["pushed_files"] - before["pushed_files"] == len(many) - 1
    assert after["ops"]["read"]["count"] == before["ops"]["read"]["count"]
    assert "flush" not in after["ops"]


@pytest.mark.root
def test_second_pass_over_the_mount_never_reaches_the_daemon(mounter: Mounter, image: Image) -> None:
    """With the patched pyfuse3 the kernel sends no open, opendir or release at all, and keeps
    what it got: pages, listings, symlink targets. A second pass (the second container of an
    image) costs the daemon nothing."""
    if "ino_without_open" not in PYFUSE3_FEATURES:
        pytest.skip("needs the patched pyfuse3 of third_party/pyfuse3 (scripts/setup.sh)")
    src, store, _index, image_id = image
    info = mounter.mount(store.url, image_id)
    mp = Path(info.mountpoint)

    def one_pass() -> None:
        for dirpath, dirnames, filenames in os.walk(mp):
            rel = Path(dirpath).relative_to(mp)
            assert sorted(dirnames + filenames) == sorted(os.listdir(src / rel))
            for name in filenames:
                path, orig = Path(dirpath, name), src / rel / name
                if path.is_symlink():
                    assert os.readlink(path) == os.readlink(orig)
                elif path.is_file() and os.access(orig, os.R_OK):
                    assert path.read_bytes() == orig.read_bytes(), path

    one_pass()
    first = mounts.read_stats(info.mountpoint)["fuse"]["ops"]
    assert first["read"]["count"] > 0 and first["readdir"]["count"] > 0
    assert first["readlink"]["count"] > 0
    assert not {"open", "opendir", "release", "flush"} & set(first), first
    one_pass()
    second = mounts.read_stats(info.mountpoint)["fuse"]["ops"]
    assert second == first

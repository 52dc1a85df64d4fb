"""The host chunk cache (on disk, shared, bounded, verified) and the memory tier."""
from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from imagefs.chunks import Digest, digest_of
from imagefs.errors import ImageFSError
from imagefs.fs.cache import DIRECT_MIN, STALE_TEMP_AGE, TOUCH_INTERVAL, HostCache, MemoryCache, parse_size
from tests.fixtures.mount import takes_o_direct


def chunk(i: int, size: int = 100_000) -> tuple[Digest, bytes]:
    data = i.to_bytes(4, "little") * (size // 4)
    return digest_of(data), data


def cache_files(root: Path) -> list[Path]:
    return [p for p in (root / "chunks").rglob("*") if p.is_file()]


def test_parse_size() -> None:
    assert parse_size("123") == 123
    assert parse_size("512M") == 512 << 20
    assert parse_size("10G") == 10 << 30
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("64k") == 64 << 10
    with pytest.raises(ImageFSError):
        parse_size("lots")


def test_put_get_round_trip_survives_reopen(tmp_path: Path) -> None:
    cache = HostCache(tmp_path, 10 << 20)
    d, data = chunk(1)
    assert cache.get(d, len(data)) is None
    cache.put(d, data)
    assert cache.get(d, len(data)) == data
    again = HostCache(tmp_path, 10 << 20)  # a restarted daemon
    assert again.get(d, len(data)) == data
    assert again.used_bytes == len(data)
    assert (cache.counters.hits, cache.counters.misses, cache.counters.writes) == (1, 1, 1)
    assert cache.path(d) == tmp_path / "chunks" / d[:2] / d


@pytest.mark.parametrize("size", [5, (64 << 10) - 1, 64 << 10, 1 << 20, (3 << 20) + 4097])
def test_direct_writes_store_exact_content(tmp_path: Path, size: int) -> None:
    """Chunk files are written with O_DIRECT where possible: aligned head, buffered tail."""
    cache = HostCache(tmp_path, 10 << 20)
    data = os.urandom(size)
    d = digest_of(data)
    cache.put(d, data)
    # Small chunks never try O_DIRECT; bigger ones give it up only where the filesystem refuses it.
    assert cache.direct_writes == (size < DIRECT_MIN or takes_o_direct(tmp_path))
    assert cache.path(d).read_bytes() == data
    assert HostCache(tmp_path, 10 << 20).get(d, size) == data
    assert cache.counters.write_bytes == size and not cache.counters.write_errors


def test_direct_writes_fall_back_when_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem (or buffer) O_DIRECT does not take: the chunk is written through the page
    cache, and O_DIRECT is not tried again."""
    import mmap

    from imagefs.fs import cache as cache_mod

    misaligned = memoryview(mmap.mmap(-1, cache_mod.DIRECT_BUFFER + 1))[1:]
    monkeypatch.setattr(cache_mod, "_direct_buffer", lambda: misaligned)  # the kernel says EINVAL
    cache = HostCache(tmp_path, 10 << 20)
    data = os.urandom((1 << 20) + 100)
    d = digest_of(data)
    cache.put(d, data)
    assert not cache.direct_writes
    assert cache.get(d, len(data)) == data
    monkeypatch.undo()
    real_fcntl = cache_mod.fcntl.fcntl

    def no_direct(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == cache_mod.fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(cache_mod.fcntl, "fcntl", no_direct)
    other = HostCache(tmp_path / "other", 10 << 20)
    other.put(d, data)
    assert not other.direct_writes and other.get(d, len(data)) == data


def test_direct_write_errors_leave_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failing direct write (here: no memory for the buffer) is a counted write error, with no
    temp file or chunk file left behind; the chunk is simply not cached."""
    from imagefs.fs import cache as cache_mod

    def no_memory() -> memoryview:
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(cache_mod, "_direct_buffer", no_memory)
    cache = HostCache(tmp_path, 10 << 20)
    data = os.urandom(1 << 20)
    d = digest_of(data)
    cache.put(d, data)
    assert cache.counters.write_errors == 1 and cache.direct_writes
    assert cache.get(d, len(data)) is None
    assert not cache_files(tmp_path) and not list((tmp_path / "tmp").iterdir())


@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
def test_corrupt_file_is_dropped_not_served(tmp_path: Path, damage: str) -> None:
    cache = HostCache(tmp_path, 10 << 20)
    d, data = chunk(2)
    cache.put(d, data)
    path = cache.path(d)
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[5000] ^= 1
    elif damage == "truncate":
        del raw[len(raw) // 2:]
    else:
        raw += b"x"
    path.write_bytes(bytes(raw))
    assert cache.get(d, len(data)) is None
    assert not path.exists()
    assert cache.counters.corrupt_dropped == 1
    cache.put(d, data)  # refetched content replaces it
    assert cache.get(d, len(data)) == data


def test_torn_write_of_a_crash_is_never_served(tmp_path: Path) -> None:
    """A writer killed mid-write leaves a temp file, never a partial chunk under its name."""
    cache = HostCache(tmp_path, 10 << 20)
    d, data = chunk(3)
    stale = tmp_path / "tmp" / f"{d}.dead"
    stale.write_bytes(data[:1000])
    old = time.time() - STALE_TEMP_AGE - 10
    os.utime(stale, (old, old))
    fresh = tmp_path / "tmp" / f"{d}.live"
    fresh.write_bytes(data[:10])
    assert cache.get(d, len(data)) is None
    HostCache(tmp_path, 10 << 20)  # start-up removes only old temp files
    assert not stale.exists() and fresh.exists()


def test_eviction_keeps_the_budget_and_recent_chunks(tmp_path: Path) -> None:
    cache = HostCache(tmp_path, 1_000_000)
    chunks = [chunk(i) for i in range(20)]
    now = time.time()
    for i, (d, data) in enumerate(chunks):
        cache.put(d, data)
        os.utime(cache.path(d), (now - 1000 + i, now - 1000 + i))  # i-th put is i-th most recent
    total = sum(p.stat().st_size for p in cache_files(tmp_path))
    assert total <= 1_000_000 and cache.used_bytes == total
    assert cache.counters.evicted_files >= 10
    kept = [i for i, (d, _) in enumerate(chunks) if cache.path(d).exists()]
    assert kept == list(range(20 - len(kept), 20))


def test_hit_refreshes_recency(tmp_path: Path) -> None:
    cache = HostCache(tmp_path, 10 << 20)
    d, data = chunk(4)
    cache.put(d, data)
    old = time.time() - TOUCH_INTERVAL - 100
    os.utime(cache.path(d), (old, old))
    assert cache.get(d, len(data)) == data
    assert cache.path(d).stat().st_mtime > time.time() - 10


def test_two_processes_share_one_budget(tmp_path: Path) -> None:
    a, b = HostCache(tmp_path, 2_000_000), HostCache(tmp_path, 2_000_000)

    def fill(cache: HostCache, start: int) -> None:
        for i in range(start, start + 40):
            cache.put(*chunk(i))

    threads = [threading.Thread(target=fill, args=(c, n)) for c, n in ((a, 0), (b, 100))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a.evict()
    assert sum(p.stat().st_size for p in cache_files(tmp_path)) <= 2_000_000
    for d, data in (chunk(i) for i in (*range(40), *range(100, 140))):
        got = a.get(d, len(data))
        assert got is None or got == data


def test_unwritable_cache_is_not_an_error(tmp_path: Path) -> None:
    cache = HostCache(tmp_path, 10 << 20)
    d, data = chunk(5)
    os.chmod(tmp_path / "tmp", 0o500)
    try:
        if os.geteuid() == 0:  # root ignores modes: put a file where the temp dir was instead
            os.rename(tmp_path / "tmp", tmp_path / "gone")
            (tmp_path / "tmp").write_bytes(b"")
        cache.put(d, data)
    finally:
        if (tmp_path / "gone").exists():
            os.unlink(tmp_path / "tmp")
            os.rename(tmp_path / "gone", tmp_path / "tmp")
        os.chmod(tmp_path / "tmp", 0o755)
    assert cache.counters.write_errors == 1
    assert cache.get(d, len(data)) is None


def test_a_write_leaves_no_temp_file_behind(tmp_path: Path) -> None:
    """Folders removed under a running cache are made again; a write that fails after its temp
    file was written removes it (temp files are not counted in the budget)."""
    cache = HostCache(tmp_path, 10 << 20)
    shutil.rmtree(tmp_path / "chunks")
    shutil.rmtree(tmp_path / "tmp")
    d, data = chunk(6)
    cache.put(d, data)
    assert cache.counters.write_errors == 0 and cache.get(d, len(data)) == data
    (tmp_path / "chunks").rename(tmp_path / "chunks-gone")
    (tmp_path / "chunks").write_bytes(b"")  # the rename into chunks/ cannot succeed now
    d2, data2 = chunk(7)
    cache.put(d2, data2)
    assert cache.counters.write_errors == 1
    assert list((tmp_path / "tmp").iterdir()) == []


def test_only_digests_name_cache_files(tmp_path: Path) -> None:
    cache = HostCache(tmp_path, 10 << 20)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for bad in ("../victim.txt", "../../etc/passwd", "ab", "A" * 64):
        with pytest.raises(ValueError, match="not a chunk digest"):
            cache.verify(bad, 7)  # type: ignore[arg-type]
    assert victim.read_text() == "keep me"


def test_memory_tier_is_a_bounded_lru() -> None:
    mem = MemoryCache(250_000)
    chunks = [chunk(i) for i in range(3)]
    for d, data in chunks[:2]:
        mem.put(d, data)
    assert mem.get(chunks[0][0]) == chunks[0][1]  # 0 is now the most recent
    mem.put(*chunks[2])
    assert chunks[1][0] not in mem and chunks[0][0] in mem and chunks[2][0] in mem
    assert mem.used_bytes == 200_000 and mem.counters.evicted_chunks == 1
    mem.put(*chunk(9, 300_000))  # larger than the whole tier: not kept
    assert len(mem) == 2


def test_a_chunk_this_process_wrote_is_read_in_part_without_verifying_again(tmp_path: Path) -> None:
    """What put() wrote was verified content: parts are read without a whole load (from the
    page cache once there: put() wrote past it, with O_DIRECT), and a file put in its place
    afterwards is not trusted."""
    cache = HostCache(tmp_path, 10 << 20)
    d, data = chunk(5)
    cache.put(d, data)
    assert cache.is_verified(d)
    assert bytes(cache.read_part(d, 1000, 64, wait=True) or b"") == data[1000:1064]
    assert bytes(cache.read_part(d, 1000, 64) or b"") == data[1000:1064]  # page cache, no wait
    assert cache.counters.hits == 0 and cache.counters.part_reads == 2
    path = cache.path(d)
    os.unlink(path)
    path.write_bytes(b"y" * len(data))
    assert cache.read_part(d, 0, 10, wait=True) is None and not cache.is_verified(d)


def test_a_file_kept_open_and_changed_in_place_is_not_served(tmp_path: Path) -> None:
    """A verified file held open (read in parts without a check each time) that something then
    rewrites in place: the rewrite moved its mtime, so the part is refused and the chunk is
    verified again, and found corrupt, before any of it is used."""
    cache = HostCache(tmp_path, 10 << 20)
    d, data = chunk(8)
    cache.put(d, data)
    assert bytes(cache.read_part(d, 0, 64, wait=True) or b"") == data[:64]  # now in the page cache
    assert bytes(cache.read_part(d, 0, 64) or b"") == data[:64]  # and held open
    time.sleep(0.01)  # a clock tick, so the rewrite's mtime differs
    with open(cache.path(d), "r+b") as f:
        f.write(bytes([data[0] ^ 0xFF]))
    assert cache.read_part(d, 0, 64) is None and not cache.is_verified(d)
    assert cache.get(d, len(data)) is None and cache.counters.corrupt_dropped == 1


@pytest.mark.timeout(30)  # the bug this guards against is an open() that never returns
def test_a_fifo_in_the_cache_is_dropped_not_waited_on(tmp_path: Path) -> None:
    cache = HostCache(tmp_path, 10 << 20)
    d, data = chunk(9)
    cache.path(d).parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(cache.path(d))
    assert cache.get(d, len(data)) is None and not cache.path(d).exists()
    os.mkfifo(cache.path(d))
    assert not cache.verify(d, len(data)) and not cache.path(d).exists()
    assert cache.counters.corrupt_dropped == 2
    cache.put(d, data)
    assert cache.get(d, len(data)) == data


def test_files_already_there_are_counted_once_and_found(tmp_path: Path) -> None:
    """Opening a cache counts the bytes of the files it holds once (a write after it adds its
    own), and count_present answers from the chunks found then."""
    first = HostCache(tmp_path, 100 << 20)
    old = [chunk(i) for i in range(30)]
    for d, data in old:
        first.put(d, data)
    again = HostCache(tmp_path, 100 << 20)
    d, data = chunk(99)
    again.put(d, data)  # after the count: added to it, not found by it
    assert again.used_bytes == sum(p.stat().st_size for p in cache_files(tmp_path))
    assert again.count_present([x for x, _ in old] + [d, "0" * 64]) == len(old)  # d came later

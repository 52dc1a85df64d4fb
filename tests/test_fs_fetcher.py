"""The chunk fetcher: tiers, single flight, bounded concurrency, errors, readahead and prefetch."""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Awaitable, Callable, Iterator, TypeVar

import pytest
import trio

from imagefs import chunks as blobs
from imagefs.chunks import Digest
from imagefs.errors import StoreUnavailable
from imagefs.fs.cache import HostCache, MemoryCache
from imagefs.fs.errors import ChunkUnavailable
from imagefs.fs.fetcher import PREFETCH, ChunkFetcher, FetchLimits
from imagefs.store.base import BlobInfo, BlobStore
from imagefs.store.local import LocalStore

T = TypeVar("T")


class ProbeStore(BlobStore):
    """Wraps a store: counts gets, measures concurrency, can be slowed down or switched off."""

    def __init__(self, inner: BlobStore, delay: float = 0.0) -> None:
        self.inner = inner
        self.delay = delay
        self.down = False
        self.gets: list[str] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes:
        with self._lock:
            self.gets.append(key)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            if self.delay:
                time.sleep(self.delay)
            if self.down:
                raise StoreUnavailable(f"store down while getting {key}")
            return self.inner.get(key)
        finally:
            with self._lock:
                self.active -= 1

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.get(key)[offset:offset + length]

    def put(self, key: str, data: bytes) -> None:
        self.inner.put(key, data)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        return self.inner.list(prefix)


def put_chunks(store: BlobStore, count: int, size: int = 50_000) -> list[tuple[Digest, bytes]]:
    out = []
    for i in range(count):
        data = bytes([i % 256]) * (size // 2) + i.to_bytes(4, "little") * (size // 8)
        d = blobs.digest_of(data)
        store.put(blobs.chunk_key(d), blobs.encode(data))
        out.append((d, data))
    return out


@pytest.fixture
def store(tmp_path: Path) -> ProbeStore:
    return ProbeStore(LocalStore(tmp_path / "store", fsync=False))


def run(fetcher: ChunkFetcher, fn: Callable[[ChunkFetcher], Awaitable[T]]) -> T:
    async def main() -> T:
        async with fetcher.running():
            return await fn(fetcher)

    return trio.run(main)


def test_tiers_memory_disk_store(store: ProbeStore, tmp_path: Path) -> None:
    (d, data), = put_chunks(store, 1)
    disk = HostCache(tmp_path / "cache")

    async def twice(f: ChunkFetcher) -> None:
        assert await f.get(d, len(data)) == data
        assert await f.get(d, len(data)) == data

    first = ChunkFetcher(store, disk, MemoryCache())
    run(first, twice)
    assert len(store.gets) == 1 and first.memory.counters.hits == 1
    assert first.stats()["by_kind"]["demand"]["chunks"] == 1  # type: ignore[index]
    second = ChunkFetcher(store, HostCache(tmp_path / "cache"), MemoryCache())  # a fresh mount
    run(second, twice)
    assert len(store.gets) == 1
    assert second.disk is not None and second.disk.counters.hits == 1


def test_load_times_say_where_a_wait_went(store: ProbeStore, tmp_path: Path) -> None:
    """Each load from the store is timed whole and in its parts (the store request, decoding);
    a load the host cache serves is timed apart; failed loads are not timed."""
    store.delay = 0.05
    (d, data), (d2, data2) = put_chunks(store, 2)

    async def loads(f: ChunkFetcher) -> None:
        assert await f.get(d, len(data)) == data
        f.readahead([(d2, len(data2))])
        while len(f.memory) < 2:
            await trio.sleep(0.01)
        store.down = True
        with pytest.raises(ChunkUnavailable):
            await f.get(Digest("0" * 64), 10)

    f = ChunkFetcher(store, HostCache(tmp_path / "cache"), MemoryCache())
    run(f, loads)
    times = f.stats()["times"]
    demand, ahead = times["demand"], times["readahead"]  # type: ignore[index]
    assert demand["load"]["count"] == 1 and demand["store"]["count"] == 1 and demand["decode"]["count"] == 1
    assert ahead["load"]["count"] == 1 and times["prefetch"]["load"]["count"] == 0  # type: ignore[index]
    assert 50 <= demand["store"]["p50_us"] / 1000 <= demand["load"]["max_us"] / 1000 < 5_000
    assert demand["decode"]["max_us"] < demand["load"]["max_us"] - demand["store"]["max_us"] + 1
    assert demand["load"]["total_ms"] >= 50 and demand["disk"]["count"] == 0

    again = ChunkFetcher(store, HostCache(tmp_path / "cache"), MemoryCache())  # a fresh mount
    store.down = False
    run(again, lambda g: g.get(d, len(data)))
    times = again.stats()["times"]
    assert times["demand"]["disk"]["count"] == 1 and times["demand"]["load"]["count"] == 0  # type: ignore[index]


def test_one_fetch_for_many_readers(store: ProbeStore) -> None:
    store.delay = 0.05
    (d, data), = put_chunks(store, 1)

    async def readers(f: ChunkFetcher) -> list[bytes]:
        out: list[bytes] = []

        async def one() -> None:
            out.append(await f.get(d, len(data)))

        async with trio.open_nursery() as n:
            for _ in range(20):
                n.start_soon(one)
        return out

    f = ChunkFetcher(store, None, MemoryCache())
    assert run(f, readers) == [data] * 20
    assert len(store.gets) == 1 and f.counters.joined == 19


def test_store_concurrency_is_bounded(store: ProbeStore) -> None:
    store.delay = 0.02
    chunks = put_chunks(store, 24)

    async def all_at_once(f: ChunkFetcher) -> None:
        async with trio.open_nursery() as n:
            for d, data in chunks:
                n.start_soon(f.get, d, len(data))

    run(ChunkFetcher(store, None, MemoryCache(), FetchLimits(store=3)), all_at_once)
    assert store.max_active == 3 and len(store.gets) == 24


def test_corrupt_chunk_fails_and_is_not_kept(store: ProbeStore, tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    (d, data), = put_chunks(store, 1)
    good = store.inner.get(blobs.chunk_key(d))
    store.inner.put(blobs.chunk_key(d), blobs.encode(data[:-1] + bytes([data[-1] ^ 1])))  # valid blob, wrong content
    disk = HostCache(tmp_path / "cache")

    async def attempt(f: ChunkFetcher) -> None:
        with pytest.raises(ChunkUnavailable) as exc:
            await f.get(d, len(data))
        assert exc.value.digest == d
        store.inner.put(blobs.chunk_key(d), good)  # repaired: the next read succeeds
        assert await f.get(d, len(data)) == data

    f = ChunkFetcher(store, disk, MemoryCache())
    with caplog.at_level(logging.ERROR):
        run(f, attempt)
    assert f.counters.corrupt == 1 and f.counters.errors == 1
    assert any(d in r.getMessage() for r in caplog.records)


def test_store_down_fails_fast_then_recovers(store: ProbeStore,
                                             caplog: pytest.LogCaptureFixture) -> None:
    chunks = put_chunks(store, 2)
    (d0, data0), (d1, data1) = chunks

    async def outage(f: ChunkFetcher) -> None:
        assert await f.get(d0, len(data0)) == data0
        store.down = True
        with pytest.raises(ChunkUnavailable):
            await f.get(d1, len(data1))
        assert await f.get(d0, len(data0)) == data0  # cached data still served
        store.down = False
        assert await f.get(d1, len(data1)) == data1

    with caplog.at_level(logging.ERROR):
        run(ChunkFetcher(store, None, MemoryCache()), outage)
    assert any(d1 in r.getMessage() and "store down" in r.getMessage() for r in caplog.records)


def test_a_slow_failure_is_held_briefly(store: ProbeStore) -> None:
    """A load that failed after failure_hold_s or more (the store did not answer) is not made
    again for failure_hold_s: reads of the chunk (the kernel retries a failed read at once)
    fail at once with the same error, and background loads skip it. After that, it loads."""
    (d, data), = put_chunks(store, 1)
    store.delay, store.down = 0.3, True

    async def outage(f: ChunkFetcher) -> None:
        with pytest.raises(ChunkUnavailable) as first:
            await f.get(d, len(data))
        start = trio.current_time()
        with pytest.raises(ChunkUnavailable) as again:
            await f.get_range(d, len(data), 10, 20)
        assert again.value is first.value and trio.current_time() - start < 0.1
        f.readahead([(d, len(data))])
        await trio.sleep(0.05)
        assert len(store.gets) == 1 and f.counters.failed_at_once == 2
        store.down = False
        await trio.sleep(0.3)  # the hold is over
        assert await f.get(d, len(data)) == data

    f = ChunkFetcher(store, None, MemoryCache(), FetchLimits(failure_hold_s=0.25))
    run(f, outage)
    assert len(store.gets) == 2 and f.stats()["failed_at_once"] == 2


def test_a_store_that_answers_again_ends_the_holds(store: ProbeStore) -> None:
    """Any load from the store that succeeds shows the store is back: held failures are dropped."""
    (d0, data0), (d1, data1) = put_chunks(store, 2)
    store.delay, store.down = 0.3, True

    async def outage(f: ChunkFetcher) -> None:
        with pytest.raises(ChunkUnavailable):
            await f.get(d0, len(data0))
        failed = trio.current_time()
        store.delay, store.down = 0.0, False
        with pytest.raises(ChunkUnavailable):
            await f.get(d0, len(data0))  # held
        assert await f.get(d1, len(data1)) == data1
        assert trio.current_time() - failed < 0.2
        assert await f.get(d0, len(data0)) == data0  # within the hold, yet loaded

    run(ChunkFetcher(store, None, MemoryCache(), FetchLimits(failure_hold_s=0.25)), outage)
    assert len(store.gets) == 3


def test_size_mismatch_with_the_index_is_an_error(store: ProbeStore) -> None:
    (d, data), = put_chunks(store, 1)

    async def wrong_size(f: ChunkFetcher) -> None:
        with pytest.raises(ChunkUnavailable):
            await f.get(d, len(data) + 1)

    run(ChunkFetcher(store, None, MemoryCache()), wrong_size)


def test_readahead_loads_in_the_background(store: ProbeStore) -> None:
    chunks = put_chunks(store, 4)

    async def ahead(f: ChunkFetcher) -> None:
        f.readahead([(d, len(data)) for d, data in chunks])
        f.readahead([(d, len(data)) for d, data in chunks])  # queued once only
        while len(f.memory) < 4:
            await trio.sleep(0.01)
        for d, data in chunks:
            assert await f.get(d, len(data)) == data

    f = ChunkFetcher(store, None, MemoryCache())
    run(f, ahead)
    assert len(store.gets) == 4
    assert f.counters.by_kind["readahead"].chunks == 4 and f.counters.by_kind["demand"].chunks == 0


def test_prefetch_goes_in_order_behind_demand(store: ProbeStore) -> None:
    store.delay = 0.02
    chunks = put_chunks(store, 30)
    urgent_d, urgent = chunks[-1]

    async def scenario(f: ChunkFetcher) -> float:
        f.prefetch([(d, len(data)) for d, data in chunks[:-1]])
        await trio.sleep(0.05)
        start = trio.current_time()
        assert await f.get(urgent_d, len(urgent)) == urgent
        return trio.current_time() - start

    f = ChunkFetcher(store, None, MemoryCache(), FetchLimits(store=4, prefetch_workers=1))
    waited = run(f, scenario)
    assert waited < 0.2  # not queued behind 29 prefetches
    prefetched = [k for k in store.gets if k != blobs.chunk_key(urgent_d)]
    assert prefetched == [blobs.chunk_key(d) for d, _ in chunks[:len(prefetched)]]
    assert store.max_active <= 2


def test_use_outside_running_is_refused(store: ProbeStore) -> None:
    (d, data), = put_chunks(store, 1)
    f = ChunkFetcher(store, None, MemoryCache())
    with pytest.raises(RuntimeError):
        trio.run(f.get, d, len(data))


def test_on_busy_brackets_loads(store: ProbeStore) -> None:
    """The daemon stops polling the FUSE device while loads a reader waits for run: on_busy(True)
    when the first of several overlapping loads starts, on_busy(False) when the last one ends,
    also on errors; prefetch loads do not count."""
    store.delay = 0.02
    chunks = put_chunks(store, 3)
    calls: list[tuple[bool, int]] = []
    f = ChunkFetcher(store, None, MemoryCache())
    f.on_busy = lambda busy: calls.append((busy, len(store.gets)))

    async def loads(f: ChunkFetcher) -> None:
        async with trio.open_nursery() as n:
            for d, data in chunks:
                n.start_soon(f.get, d, len(data))
        assert calls == [(True, 0), (False, 3)]
        await f.get(chunks[0][0], len(chunks[0][1]))  # in memory: no load, no call
        assert len(calls) == 2
        store.down = True
        (d, data), = put_chunks(store.inner, 1, size=1000)
        with pytest.raises(ChunkUnavailable):
            await f.get(d, len(data))
        store.down = False
        more = put_chunks(store.inner, 6, size=2000)[3:]
        f.prefetch([(d, len(data)) for d, data in more])
        while f.pending(PREFETCH) or f.stats()["inflight"]:
            await trio.sleep(0.01)
        assert f.counters.by_kind[PREFETCH].chunks == 3
        assert len(calls) == 4  # the prefetch loaded them without a call

    run(f, loads)
    assert [busy for busy, _gets in calls] == [True, False, True, False]


def test_prefetched_chunks_reach_the_host_cache_once_reads_pause(store: ProbeStore, tmp_path: Path) -> None:
    """Prefetch write-backs wait while reads go on, at most as many bytes as the memory tier may
    hold (meanwhile the chunks are served from the held copy, even once the memory tier has let
    them go); a pause in reads, a full hold, or the end of the mount writes them. Demand loads
    are written at once."""
    chunks = put_chunks(store, 7)
    disk = HostCache(tmp_path / "cache")
    fetcher = ChunkFetcher(store, disk, MemoryCache(max_bytes=3 * 50_000), FetchLimits(write_quiet_s=0.3))
    on_disk = lambda: {d for d, _ in chunks if disk.path(d).exists()}  # noqa: E731

    async def prefetched(f: ChunkFetcher, some: list[tuple[Digest, bytes]]) -> None:
        f.prefetch([(d, len(c)) for d, c in some])
        while f.pending(PREFETCH) or f._inflight:
            f.peek(chunks[0][0])  # a reader keeps reading
            await trio.sleep(0.02)

    async def go(f: ChunkFetcher) -> None:
        held = [chunks[0], chunks[1], chunks[3]]
        await prefetched(f, chunks[:2])
        assert await f.get(chunks[2][0], len(chunks[2][1])) == chunks[2][1]  # demand: at once
        await prefetched(f, chunks[3:4])
        for _ in range(10):  # still reading: no prefetched chunk written yet
            f.peek(chunks[0][0])
            await trio.sleep(0.02)
        assert on_disk() == {chunks[2][0]} and f.stats()["deferred_writes"] == 3
        await prefetched(f, chunks[4:5])  # the hold is full: written at once
        await trio.sleep(0.1)
        assert on_disk() == {chunks[2][0], chunks[4][0]} and f.stats()["deferred_writes"] == 3
        assert any(d not in f.memory for d, _ in held)  # the memory tier let one go...
        gets = len(store.gets)
        for d, c in held:
            assert await f.get(d, len(c)) == c
        assert len(store.gets) == gets  # ...and it was served from the held copy
        await trio.sleep(0.8)  # reads pause
        assert on_disk() == {d for d, _ in chunks[:5]} and f.stats()["deferred_writes"] == 0
        await prefetched(f, chunks[5:])

    run(fetcher, go)
    assert on_disk() == {d for d, _ in chunks}  # the last ones written at unmount

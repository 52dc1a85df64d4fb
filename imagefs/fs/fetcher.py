"""Fetch chunks on demand: memory tier, then host cache, then the store. Verified, single-flight.

Every chunk goes through one "flight" at a time: readers that want a chunk already being loaded
wait for that load instead of starting another. Store calls run in worker threads bounded by a
CapacityLimiter; blake3 verification and zstd decompression happen in the same thread, off the
event loop. Readahead and prefetch are queues served by a few background workers, so they never
hold more than a few of the store slots that demand reads need. Errors of one load reach all its
waiters as ChunkUnavailable (EIO). A load that failed slowly (the store did not answer in time;
not a missing or corrupt chunk) is remembered for failure_hold_s, or until a load from the store
succeeds: reads of that chunk meanwhile fail at once with the same error. The kernel follows a
failed read with a smaller one of the same bytes, which would otherwise wait out the store
deadline a second time. Other errors are forgotten: the next read tries again.

Parts of chunks (peek_range, peek_into, get_range) also come from host-cache files this process
has verified, read straight from the page cache on the event loop when they are resident there
(no thread hop), else in a worker thread; and from the segments of a profile's read-set pack
(imagefs.profile), which hold the ranges a recorded start-up read: a part inside one of those
ranges is served from its segment (loaded like a chunk, once) instead of loading the whole chunk.
"""
from __future__ import annotations

import functools
import logging
import time
from bisect import bisect_right
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterable, Sequence

import trio

from imagefs import chunks as blobs
from imagefs.chunks import Content, Digest
from imagefs.errors import BlobNotFound, CorruptBlob, ImageFSError, StoreError
from imagefs.fs.cache import HostCache, MemoryCache
from imagefs.fs.errors import ChunkUnavailable
from imagefs.fs.metrics import OpStats
from imagefs.fs.model import Data
from imagefs.store.base import BlobStore

log = logging.getLogger(__name__)

DEMAND, READAHEAD, PREFETCH = "demand", "readahead", "prefetch"
KINDS = (DEMAND, READAHEAD, PREFETCH)


@dataclass(frozen=True)
class FetchLimits:
    store: int = 16  # concurrent store requests (all kinds together)
    readahead_workers: int = 8
    prefetch_workers: int = 4  # measured (torch, regional): 1: 7.0 s, 2: 5.0, 4: 4.6, 8: 4.9, 16: 4.0; 4 leaves demand slots
    disk: int = 8  # concurrent host-cache reads
    writers: int = 2  # concurrent host-cache writes
    drain_timeout: float = 10.0  # seconds pending host-cache writes may take at shutdown
    # Prefetched chunks go to the host cache once reads have paused for write_quiet_s (or after
    # write_delay_max_s, at unmount, or past deferred_max bytes held, never more than the memory
    # tier's size): written while the start-up streams, they slowed it. Torch with a profile on
    # loopback, eight interleaved rounds against writing at once: 2.04 s against 2.23 s, median of
    # the per-round ratios 1.16x against 1.29x native. Demand and readahead loads are written at
    # once: deferring them too made cold imports faster (3.50 against 3.99 s) but moved the
    # writes into the next start on the same mount, which reaches the daemon too rarely to look
    # busy (the second import on a mount: 1.61x native warm against 1.04x).
    write_quiet_s: float = 1.0
    write_delay_max_s: float = 30.0
    deferred_max: int = 256 * 1024 * 1024
    # A chunk whose load failed after at least this long (the store did not answer) fails at
    # once for this long, unless a load from the store succeeds meanwhile: long enough for the
    # kernel's retry of a failed read, which follows at once; short enough that a store that
    # is back is soon used again. A load that failed sooner costs little to repeat.
    failure_hold_s: float = 1.5


@dataclass
class KindCounters:
    chunks: int = 0  # chunks fetched from the store
    bytes: int = 0  # stored (compressed) bytes fetched
    raw_bytes: int = 0  # their decompressed size


class LoadTimes:
    """How long loads of one kind took: where a reader's wait for a chunk goes."""

    __slots__ = ("load", "store", "decode", "disk")

    def __init__(self) -> None:
        self.load = OpStats()  # a load from the store, start to content ready (a waiting reader's wait)
        self.store = OpStats()  # its request to the store, in the worker thread
        self.decode = OpStats()  # its decompression and blake3 check
        self.disk = OpStats()  # a load the host cache served (read and checked)

    def as_dict(self) -> dict[str, object]:
        return {"load": self.load.as_dict(), "store": self.store.as_dict(),
                "decode": self.decode.as_dict(), "disk": self.disk.as_dict()}


@dataclass
class FetchCounters:
    by_kind: dict[str, KindCounters] = field(default_factory=lambda: {k: KindCounters() for k in KINDS})
    times: dict[str, LoadTimes] = field(default_factory=lambda: {k: LoadTimes() for k in KINDS})
    joined: int = 0  # requests that waited for a load already in flight
    errors: int = 0  # loads that failed (store down, missing, corrupt)
    failed_at_once: int = 0  # loads not made as their chunk's had just failed (its readers got that error)
    corrupt: int = 0  # chunks the store returned corrupt
    background_skipped: int = 0  # readahead/prefetch entries already present when their turn came
    pack_reads: int = 0  # parts of chunks served from a read-set pack segment
    pack_dropped: int = 0  # pack segments given up on (could not be loaded): their chunks load whole

    def as_dict(self) -> dict[str, object]:
        total = KindCounters()
        for c in self.by_kind.values():
            total.chunks += c.chunks
            total.bytes += c.bytes
            total.raw_bytes += c.raw_bytes
        return {"chunks_fetched": total.chunks, "bytes_fetched": total.bytes,
                "raw_bytes_fetched": total.raw_bytes, "joined": self.joined, "errors": self.errors,
                "failed_at_once": self.failed_at_once,
                "corrupt": self.corrupt, "background_skipped": self.background_skipped,
                "pack_reads": self.pack_reads, "pack_dropped": self.pack_dropped,
                "by_kind": {k: dict(vars(c)) for k, c in self.by_kind.items()},
                "times": {k: t.as_dict() for k, t in self.times.items()}}


PackPart = tuple[Digest, int, int, int]  # (chunk, offset in the chunk, length, offset in the segment)


class PackMap:
    """Which ranges of which chunks the segments of a read-set pack hold, and where."""

    def __init__(self) -> None:
        # chunk -> (range starts, sorted; (range end, segment, segment size, offset in the segment))
        self._by_chunk: dict[str, tuple[list[int], list[tuple[int, Digest, int, int]]]] = {}
        self._segments: dict[str, list[PackPart]] = {}
        self._sizes: dict[str, int] = {}
        self._whole: set[str] = set()  # segments that are one whole chunk: that chunk itself

    def add(self, segments: Iterable[tuple[Digest, int, Sequence[PackPart]]]) -> None:
        touched: set[str] = set()
        for seg, size, parts in segments:
            # A segment that is one whole chunk has that chunk's digest: it is the chunk itself,
            # found as such, and mapping the chunk onto itself would send its reads in a circle.
            self._segments[seg] = [p for p in parts if p[0] != seg]
            self._sizes[seg] = size
            if len(self._segments[seg]) < len(parts):
                self._whole.add(seg)
            touched.update(p[0] for p in parts)
        self._rebuild(touched)

    def drop(self, seg: str) -> bool:
        """Forget a segment; False if it was not (or no longer) in the pack."""
        parts = self._segments.pop(seg, None)
        if parts is None:
            return False
        del self._sizes[seg]
        self._whole.discard(seg)
        self._rebuild({p[0] for p in parts})
        return True

    def _rebuild(self, chunks: set[str]) -> None:
        ranges: dict[str, list[tuple[int, int, Digest, int, int]]] = {c: [] for c in chunks}
        for seg, parts in self._segments.items():
            for chunk, off, n, at in parts:
                if chunk in ranges:
                    ranges[chunk].append((off, off + n, Digest(seg), self._sizes[seg], at))
        for chunk, rows in ranges.items():
            rows.sort()
            if rows:
                self._by_chunk[chunk] = ([r[0] for r in rows], [r[1:] for r in rows])
            else:
                self._by_chunk.pop(chunk, None)

    def find(self, chunk: str, offset: int, length: int) -> tuple[Digest, int, int] | None:
        """(segment, its size, offset in it) of a range that holds these bytes of chunk, if any."""
        found = self._by_chunk.get(chunk)
        if found is None:
            return None
        starts, rows = found
        i = bisect_right(starts, offset) - 1
        if i < 0:
            return None
        end, seg, size, at = rows[i]
        if offset + length > end:
            return None
        return seg, size, at + offset - starts[i]

    def planned(self, chunk: str, offset: int, length: int) -> bool:
        """Whether the pack brings these bytes: a segment holds them, or the chunk is a segment."""
        return chunk in self._whole or self.find(chunk, offset, length) is not None

    def __len__(self) -> int:
        return len(self._segments)


class _Flight:
    __slots__ = ("done", "data", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: Content | None = None
        self.error: ChunkUnavailable | None = None

    @classmethod
    def failed(cls, error: ChunkUnavailable) -> "_Flight":
        """A flight over before it began: its chunk's load failed a moment ago."""
        flight = cls()
        flight.error = error
        flight.done.set()
        return flight


class ChunkFetcher:
    """The ChunkSource of a mount. Call get() and readahead() only while running() is active."""

    def __init__(self, store: BlobStore, disk: HostCache | None, memory: MemoryCache,
                 limits: FetchLimits = FetchLimits()) -> None:
        self.store = store
        self.disk = disk
        self.memory = memory
        self.limits = limits
        self.counters = FetchCounters()
        self._inflight: dict[str, _Flight] = {}
        # chunk -> (time.monotonic() until which, why): loads that failed slowly, a moment ago
        self._failed: dict[str, tuple[float, ChunkUnavailable]] = {}
        self._store_slots = trio.CapacityLimiter(limits.store)
        self._disk_slots = trio.CapacityLimiter(limits.disk)
        self._write_slots = trio.CapacityLimiter(limits.writers)
        self._queues: dict[str, deque[tuple[Digest, int]]] = {READAHEAD: deque(), PREFETCH: deque()}
        self._queued: set[str] = set()
        self._wakeups: dict[str, trio.Event] = {READAHEAD: trio.Event(), PREFETCH: trio.Event()}
        self._nursery: trio.Nursery | None = None
        self._writes: trio.Nursery | None = None
        # Told True when a demand or readahead load starts while none ran, False when the last
        # one ends: the daemon stops polling the FUSE device meanwhile, leaving the CPU to the
        # fetching and decoding a reader waits for. Prefetch loads do not count: the workload
        # keeps sending requests while they run (measured, torch prefetch on loopback, five
        # paired runs: median 1.60x native with this rule, 1.72x when every load counted).
        self.on_busy: Callable[[bool], None] | None = None
        self._urgent_loads = 0
        self.pack = PackMap()
        self._deferred: dict[Digest, Content] = {}  # loaded from the store, not yet in the host cache
        self._deferred_bytes = 0
        self._deferred_max = min(limits.deferred_max, memory.max_bytes)  # no more than memory may hold
        self._deferred_since = 0.0
        self._deferring = trio.Event()  # set while something is held, so an idle mount sleeps
        self._last_read = 0.0  # time.monotonic() of the last read asked of this fetcher

    @asynccontextmanager
    async def running(self) -> AsyncIterator["ChunkFetcher"]:
        """Run the background workers; on exit they are cancelled and host-cache writes drained."""
        async with trio.open_nursery() as writes:
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery, self._writes = nursery, writes
                    for kind, count in ((READAHEAD, self.limits.readahead_workers),
                                        (PREFETCH, self.limits.prefetch_workers)):
                        for i in range(count):
                            nursery.start_soon(self._worker, kind, name=f"fetch-{kind}-{i}")
                    nursery.start_soon(self._deferred_writer, name="deferred-writes")
                    try:
                        yield self
                    finally:
                        nursery.cancel_scope.cancel()
            finally:
                self._write_deferred()  # drained below like any pending write
                self._nursery = self._writes = None
                writes.cancel_scope.deadline = trio.current_time() + self.limits.drain_timeout
                if self.disk is not None:
                    self.disk.close_files()

    # -- demand --------------------------------------------------------------------------------
    def peek(self, digest: Digest) -> Content | None:
        """The content if the memory tier has it (a miss here is counted by the get that follows)."""
        self._last_read = time.monotonic()
        return self._held(digest)

    def _held(self, digest: Digest, count_miss: bool = False) -> Content | None:
        """The content if this process holds it: the memory tier, or a write-back not yet done."""
        data = self.memory.get(digest, count_miss=count_miss)
        return self._deferred.get(digest) if data is None else data

    def peek_range(self, digest: Digest, offset: int, length: int) -> Data | None:
        """Part of a chunk if it is at hand: in memory, or in the page cache as a verified file
        (the chunk's own, or a pack segment's that holds the part)."""
        self._last_read = time.monotonic()
        part = self._peek_blob(digest, offset, length)
        if part is None and (loc := self.pack.find(digest, offset, length)) is not None:
            part = self._peek_blob(loc[0], loc[2], length)
            self.counters.pack_reads += part is not None
        return part

    def _peek_blob(self, digest: Digest, offset: int, length: int) -> Data | None:
        data = self._held(digest)
        if data is not None:
            return memoryview(data)[offset:offset + length]
        if self.disk is not None:
            return self.disk.read_part(digest, offset, length)
        return None

    async def get(self, digest: Digest, size: int) -> Content:
        """The verified content of a chunk; ChunkUnavailable if it cannot be had."""
        self._last_read = time.monotonic()
        data = self._held(digest, count_miss=True)
        if data is not None:
            return data
        flight = self._inflight.get(digest)
        if flight is None:
            flight = self._launch(digest, size, DEMAND)
        else:
            self.counters.joined += 1
        await flight.done.wait()
        if flight.error is not None:
            raise flight.error
        if flight.data is None:  # a background check of the host-cache file: now load it whole
            return await self.get(digest, size)
        return flight.data

    def peek_into(self, digest: Digest, offset: int, dst: memoryview) -> bool:
        """Copy part of a chunk into dst if it is at hand (see peek_range)."""
        self._last_read = time.monotonic()
        if self._peek_blob_into(digest, offset, dst):
            return True
        loc = self.pack.find(digest, offset, len(dst))
        if loc is not None and self._peek_blob_into(loc[0], loc[2], dst):
            self.counters.pack_reads += 1
            return True
        return False

    def _peek_blob_into(self, digest: Digest, offset: int, dst: memoryview) -> bool:
        data = self._held(digest)
        if data is not None:
            dst[:] = memoryview(data)[offset:offset + len(dst)]
            return True
        return self.disk is not None and self.disk.read_into(digest, offset, dst)

    def planned(self, digest: Digest, offset: int, length: int) -> bool:
        """Whether the read-set pack holds this part of the chunk."""
        return self.pack.planned(digest, offset, length)

    async def get_range(self, digest: Digest, size: int, offset: int, length: int) -> Data:
        """Part of a chunk, waiting if need be; a verified host-cache file is read only in part."""
        flight = self._inflight.get(digest)
        if flight is not None:
            self.counters.joined += 1
            await flight.done.wait()
            if flight.error is not None:
                raise flight.error
            if flight.data is not None:
                return memoryview(flight.data)[offset:offset + length]
        part = self.peek_range(digest, offset, length)
        if part is None and self.disk is not None and self.disk.is_verified(digest):
            part = await self._part_from_disk(digest, offset, length)
        if part is None and (loc := self.pack.find(digest, offset, length)) is not None:
            part = await self._part_from_segment(*loc, length)
        if part is not None:
            return part
        return memoryview(await self.get(digest, size))[offset:offset + length]

    async def _part_from_segment(self, seg: Digest, size: int, offset: int, length: int) -> Data | None:
        """Part of a pack segment, loading the segment (once) if need be. A segment the store
        lacks or has corrupt is dropped from the pack (None: the caller loads the chunk itself);
        a store that does not answer fails the read as a chunk load would (no second wait)."""
        try:
            part = await self.get_range(seg, size, offset, length)  # a segment loads as a chunk
        except ChunkUnavailable as e:
            if not e.lasting:
                raise
            if self.pack.drop(seg):  # once, though several reads may have waited for it
                log.warning("read-set pack segment %s unavailable (%s): its chunks load whole", seg, e.reason)
                self.counters.pack_dropped += 1
            return None
        self.counters.pack_reads += 1
        return part

    async def _part_from_disk(self, digest: Digest, offset: int, length: int) -> Data | None:
        assert self.disk is not None
        read = functools.partial(self.disk.read_part, digest, offset, length, wait=True)
        try:
            return await trio.to_thread.run_sync(read, limiter=self._disk_slots)
        except OSError as e:
            log.warning("host cache: cannot read chunk %s: %s", digest, e)
            return None

    def _launch(self, digest: Digest, size: int, kind: str) -> _Flight:
        if self._nursery is None:
            raise RuntimeError("ChunkFetcher used outside running()")
        if self._failed and (error := self._recent_failure(digest)) is not None:
            return _Flight.failed(error)
        if kind != PREFETCH:
            if not self._urgent_loads and self.on_busy is not None:
                self.on_busy(True)
            self._urgent_loads += 1
        flight = self._inflight[digest] = _Flight()
        self._nursery.start_soon(self._load, digest, size, kind, flight, name=f"load-{digest[:12]}")
        return flight

    async def _load(self, digest: Digest, size: int, kind: str, flight: _Flight) -> None:
        from_store = False  # only chunks from the store are written to the host cache
        start = time.perf_counter_ns()
        try:
            data, from_store = await self._obtain(digest, size, kind)
            if from_store and self._failed:
                self._failed.clear()  # the store answers again: no reason to fail reads at once
            if data is not None:
                self.memory.put(digest, data)
                times = self.counters.times[kind]
                (times.load if from_store else times.disk).add(time.perf_counter_ns() - start, False)
            flight.data = data
        except ChunkUnavailable as e:
            self.counters.errors += 1
            flight.error = e
            if not e.lasting:
                self._remember_failure(digest, e, (time.perf_counter_ns() - start) / 1e9)
        except Exception as e:  # a bug must fail this read, not the daemon
            log.exception("unexpected error loading chunk %s (%s read)", digest, kind)
            self.counters.errors += 1
            flight.error = ChunkUnavailable(digest, f"unexpected {type(e).__name__}: {e}")
        finally:
            del self._inflight[digest]
            flight.done.set()
            if kind != PREFETCH:
                self._urgent_loads -= 1
                if not self._urgent_loads and self.on_busy is not None:
                    self.on_busy(False)
        if from_store and flight.data is not None and self._writes is not None:
            if kind == PREFETCH and self._deferred_bytes + len(flight.data) <= self._deferred_max:
                if not self._deferred:
                    self._deferred_since = time.monotonic()
                    self._deferring.set()
                self._deferred[digest] = flight.data
                self._deferred_bytes += len(flight.data)
            else:
                self._writes.start_soon(self._write_back, digest, flight.data, name=f"cache-{digest[:12]}")

    def _remember_failure(self, digest: Digest, error: ChunkUnavailable, took_s: float) -> None:
        if took_s < self.limits.failure_hold_s:
            return
        now = time.monotonic()
        if len(self._failed) >= 4096:  # a long outage: keep only the failures still held
            self._failed = {d: held for d, held in self._failed.items() if held[0] > now}
        self._failed[digest] = (now + self.limits.failure_hold_s, error)

    def _recent_failure(self, digest: Digest) -> ChunkUnavailable | None:
        """The error of this chunk's last load if that failed slowly a moment ago."""
        held = self._failed.get(digest)
        if held is None:
            return None
        if time.monotonic() >= held[0]:
            del self._failed[digest]
            return None
        self.counters.failed_at_once += 1
        return held[1]

    async def _deferred_writer(self) -> None:
        """Hand deferred prefetch write-backs to the writers once reads pause (or they waited long)."""
        while True:
            await self._deferring.wait()
            await trio.sleep(min(0.25, self.limits.write_quiet_s))
            now = time.monotonic()
            if self._deferred and (now - self._last_read >= self.limits.write_quiet_s
                                   or now - self._deferred_since >= self.limits.write_delay_max_s):
                self._write_deferred()

    def _write_deferred(self) -> None:
        if self._writes is not None:
            for digest, data in self._deferred.items():
                self._writes.start_soon(self._write_back, digest, data, name=f"cache-{digest[:12]}")
        self._deferred.clear()
        self._deferred_bytes = 0
        self._deferring = trio.Event()

    async def _obtain(self, digest: Digest, size: int, kind: str) -> tuple[Content | None, bool]:
        """(content, whether it came from the store). A prefetch of a chunk the host cache has only
        checks the file in place (content None): readers then take parts of it from the page
        cache, and a long profile does not flush the memory tier. Demand and readahead loads
        (wanted soon) copy the chunk into memory in the worker thread, off the event loop."""
        if self.disk is not None:
            if kind != PREFETCH:
                data = await self._from_disk(digest, size)
                if data is not None:
                    return data, False
            elif await self._verify_on_disk(digest, size):
                return None, False
        return await self._from_store(digest, size, kind), True

    async def _verify_on_disk(self, digest: Digest, size: int) -> bool:
        assert self.disk is not None
        try:
            return await trio.to_thread.run_sync(self.disk.verify, digest, size,
                                                 limiter=self._disk_slots)
        except OSError as e:  # an unreadable cache is a miss, not an error
            log.warning("host cache: cannot read chunk %s: %s", digest, e)
            return False

    def held_range(self, digest: Digest, offset: int, length: int) -> memoryview | None:
        """Part of a chunk if this process holds it in memory (the chunk's own content, or a
        pack segment's that holds the part); counts nothing, as it serves no read (see push)."""
        data = self._held_quietly(digest)
        if data is not None:
            return memoryview(data)[offset:offset + length]
        loc = self.pack.find(digest, offset, length)
        if loc is not None and (seg := self._held_quietly(loc[0])) is not None:
            return memoryview(seg)[loc[2]:loc[2] + length]
        return None

    def _held_quietly(self, digest: str) -> Content | None:
        data = self.memory.peek(digest)
        return self._deferred.get(digest) if data is None else data

    def expects(self, digest: Digest) -> bool:
        """Whether a load of it is queued or in flight."""
        return digest in self._queued or digest in self._inflight

    def holds(self, digest: Digest) -> bool:
        """In memory, or a host-cache file this process has verified."""
        return (digest in self.memory or digest in self._deferred
                or (self.disk is not None and self.disk.is_verified(digest)))

    async def _write_back(self, digest: Digest, data: Content) -> None:
        if self.disk is None:
            return
        try:
            await trio.to_thread.run_sync(self.disk.put, digest, data, limiter=self._write_slots)
        except Exception:
            log.exception("host cache: cannot store chunk %s", digest)

    async def _from_disk(self, digest: Digest, size: int) -> bytes | None:
        if self.disk is None:
            return None
        try:
            return await trio.to_thread.run_sync(self.disk.get, digest, size, limiter=self._disk_slots)
        except OSError as e:  # an unreadable cache is a miss, not an error
            log.warning("host cache: cannot read chunk %s: %s", digest, e)
            return None

    async def _from_store(self, digest: Digest, size: int, kind: str) -> Content:
        try:
            stored, data, store_ns, decode_ns = await trio.to_thread.run_sync(  # a stopping
                self._fetch_sync, digest, limiter=self._store_slots,  # daemon does not wait for it
                abandon_on_cancel=True)
        except CorruptBlob as e:
            self.counters.corrupt += 1
            log.error("chunk %s from the store is corrupt: %s", digest, e.reason)
            raise ChunkUnavailable(digest, f"corrupt in store: {e.reason}", lasting=True) from None
        except (StoreError, ImageFSError) as e:
            log.error("cannot fetch chunk %s: %s", digest, e)
            raise ChunkUnavailable(digest, str(e), lasting=isinstance(e, BlobNotFound)) from None
        if len(data) != size:
            self.counters.corrupt += 1
            log.error("chunk %s has %d bytes, the index says %d", digest, len(data), size)
            raise ChunkUnavailable(digest, "size differs from the index", lasting=True)
        times = self.counters.times[kind]
        times.store.add(store_ns, False)
        times.decode.add(decode_ns, False)
        c = self.counters.by_kind[kind]
        c.chunks += 1
        c.bytes += stored
        c.raw_bytes += len(data)
        return data

    def _fetch_sync(self, digest: Digest) -> tuple[int, Content, int, int]:
        """(stored size, content, nanoseconds the store took, nanoseconds decoding took)."""
        start = time.perf_counter_ns()
        blob = self.store.get(blobs.chunk_key(digest))
        got = time.perf_counter_ns()
        # A chunk stored raw is held as a view of the fetched blob: no copy of it.
        data = blobs.decode_view(blob, digest)
        return len(blob), data, got - start, time.perf_counter_ns() - got

    # -- background: readahead and prefetch ----------------------------------------------------
    def readahead(self, chunks: Sequence[tuple[Digest, int]]) -> None:
        """Queue chunks a sequential reader will want next (most urgent first)."""
        self._enqueue(READAHEAD, chunks)

    def prefetch(self, chunks: Sequence[tuple[Digest, int]]) -> None:
        """Queue chunks to load in order at low priority (e.g. from a recorded access trace)."""
        self._enqueue(PREFETCH, chunks)

    def _enqueue(self, kind: str, chunks: Sequence[tuple[Digest, int]]) -> None:
        queue, added = self._queues[kind], False
        for digest, size in chunks:
            if digest in self._queued or digest in self._inflight or self.holds(digest):
                continue
            self._queued.add(digest)
            queue.append((digest, size))
            added = True
        if added:
            self._wakeups[kind].set()

    def pending(self, kind: str) -> int:
        return len(self._queues[kind])

    async def _worker(self, kind: str) -> None:
        queue = self._queues[kind]
        while True:
            while not queue:
                if self._wakeups[kind].is_set():
                    self._wakeups[kind] = trio.Event()
                await self._wakeups[kind].wait()
            digest, size = queue.popleft()
            self._queued.discard(digest)
            if self.holds(digest):
                self.counters.background_skipped += 1
                continue
            flight = self._inflight.get(digest) or self._launch(digest, size, kind)
            await flight.done.wait()  # errors were logged by the load; a demand read will retry

    def stats(self) -> dict[str, object]:
        doc = self.counters.as_dict()
        doc["memory"] = {**vars(self.memory.counters), "chunks": len(self.memory),
                         "bytes": self.memory.used_bytes, "max_bytes": self.memory.max_bytes}
        if self.disk is not None:
            doc["disk"] = {**vars(self.disk.counters), "bytes": self.disk.used_bytes,
                           "max_bytes": self.disk.max_bytes, "path": str(self.disk.root),
                           "direct_writes": self.disk.direct_writes}
        doc["pack_segments"] = len(self.pack)
        doc["queued"] = {k: len(q) for k, q in self._queues.items()}
        doc["inflight"] = len(self._inflight)
        doc["deferred_writes"] = len(self._deferred)
        return doc

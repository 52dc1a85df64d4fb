"""Read-set packs of start-up profiles: the trace's read ranges, the pack's segments, reads served
from them (no kernel, then on a real mount), bad segments, gc and fsck."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from imagefs import chunks as blobs
from imagefs import profile as profiles
from imagefs.chunks import Digest
from imagefs.errors import CorruptBlob, StoreError, StoreUnavailable
from imagefs.fs.errors import ChunkUnavailable
from imagefs.fs.cache import HostCache, MemoryCache
from imagefs.fs.fetcher import ChunkFetcher, PackMap
from imagefs.fs.model import ImageFS
from imagefs.fs.trace import AccessTrace, merge_spans
from imagefs.gc import fsck, gc
from imagefs.images import load_index, parse_ref, read_tag, set_tag
from imagefs.importers.rootfs import import_rootfs
from imagefs.index import ImageIndex
from imagefs.store.local import LocalStore
from imagefs.writer import ChunkerParams, write_image

KB, MB = 1024, 1 << 20
SMALL_CHUNKS = ChunkerParams(avg_size=64 * KB, min_size=16 * KB, max_size=256 * KB)
# What the "start-up" reads: (path, offset, length); the rest of each file is left unread.
READS = [("lib/b.so", 100 * KB, 300 * KB), ("a.py", 0, 40 * KB), ("lib/b.so", 900 * KB, 8 * KB),
         ("c.bin", 0, 1 * MB)]


# -- pure --------------------------------------------------------------------------------------
def test_trace_keeps_the_ranges_read_of_each_chunk() -> None:
    t = AccessTrace()
    t.read(3, 0, 4096, ino=5, file_offset=0)
    t.read(3, 4096, 4096, ino=5, file_offset=4096)  # goes on: grows the range in place
    t.read(3, 200_000, 100, ino=5, file_offset=200_000)  # far on: a range of its own
    t.read(3, 9000, 1000, ino=6, file_offset=0)  # within the gap of the first range
    t.read(7, 50, 10, ino=6, file_offset=70)
    assert t.spans(3) == [(0, 10_000), (200_000, 100)]
    assert t.spans(7) == [(50, 10)]
    assert [(e[1], e[3]) for e in t.events] == [("chunk", 3), ("chunk", 7)]  # first touches only


def test_merge_spans_joins_overlaps_and_small_gaps() -> None:
    assert merge_spans([(100, 10), (0, 50), (40, 20)], gap=0) == [(0, 60), (100, 10)]
    assert merge_spans([(100, 10), (0, 50)], gap=50) == [(0, 110)]
    assert merge_spans([]) == []


def test_profile_with_pack_round_trip_and_version_1() -> None:
    a, b = "a" * 64, "b" * 64
    seg = profiles.Segment("c" * 64, 30, ((b, 5, 10), (a, 0, 20)))
    prof = profiles.Profile("i" * 64, [(a, 100), (b, 50)], files=2, pack=[seg])
    back = profiles.Profile.decode(prof.encode(), "x")
    assert back == prof and back.pack_bytes == 30
    v1 = json.dumps({"v": 1, "image": "i" * 64, "chunks": [[a, 100]], "files": 1, "ready_s": None,
                     "command": [], "created": 1.0}).encode()
    assert profiles.Profile.decode(v1, "x").pack == []
    doc = json.loads(prof.encode())
    for bad in ([["c" * 64, 31, [[1, 5, 10], [0, 0, 20]]]],  # sizes do not add up
                [["c" * 64, 30, [[9, 5, 10], [0, 0, 20]]]],  # no chunk number 9
                [["nope", 30, [[1, 5, 10], [0, 0, 20]]]]):  # not a digest
        with pytest.raises(CorruptBlob):
            profiles.Profile.decode(json.dumps({**doc, "pack": bad}).encode(), "x")


def test_big_ranges_are_widened_and_mostly_read_chunks_packed_whole() -> None:
    pad, big = profiles.PACK_PAD, profiles.PACK_PAD_MIN
    size = 4 * MB
    pack = profiles.ranges_to_pack
    assert pack([(100, 4096)], size) == [(100, 4096)]  # a small read: as it was
    assert pack([(MB, big)], size) == [(MB - pad, big + 2 * pad)]
    assert pack([(10, big), (size - big, big)], size) == [(0, big + 10 + pad), (size - big - pad, big + pad)]
    assert pack([(0, 2 * MB), (3 * MB, 64 * 1024)], size) == [(0, 2 * MB + pad), (3 * MB, 64 * 1024)]
    assert pack([(0, 2 * MB), (2 * MB + 300_000, 700_000)], size) == [(0, size)]  # >= 70 %: whole
    assert pack([], size) == []


def test_pack_map_finds_whole_ranges_only_and_forgets_dropped_segments() -> None:
    pm = PackMap()
    c = Digest("c" * 64)
    s1, s2 = Digest("1" * 64), Digest("2" * 64)
    pm.add([(s1, 300, [(c, 1000, 100, 0), (c, 5000, 200, 100)]), (s2, 50, [(c, 0, 50, 0)])])
    assert len(pm) == 2
    assert pm.find(c, 1000, 100) == (s1, 300, 0)
    assert pm.find(c, 5050, 100) == (s1, 300, 150)
    assert pm.find(c, 10, 40) == (s2, 50, 10)
    assert pm.find(c, 1050, 100) is None  # runs past the range
    assert pm.find(c, 500, 10) is None and pm.find(Digest("d" * 64), 0, 1) is None
    pm.drop(s1)
    assert pm.find(c, 1000, 100) is None and pm.find(c, 0, 50) == (s2, 50, 0)
    pm.drop(s2)
    assert pm.find(c, 0, 50) is None and len(pm) == 0
    assert pm.planned(c, 0, 1) is False
    pm.add([(c, 70, [(c, 0, 70, 0)])])  # a segment that is the whole chunk c
    assert pm.find(c, 0, 10) is None and pm.planned(c, 0, 70) and pm.planned(c, 60, 10)
    pm.drop(c)
    assert not pm.planned(c, 0, 70)


# -- on a store, no kernel ---------------------------------------------------------------------
@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, LocalStore, str]:
    src = tmp_path / "src"
    (src / "lib").mkdir(parents=True)
    rnd = __import__("random").Random(11).randbytes  # fixed content: the same chunk boundaries every run
    (src / "lib/b.so").write_bytes(rnd(1200 * KB))
    (src / "a.py").write_bytes(b"import os\n" * 8000)
    (src / "c.bin").write_bytes(rnd(3 * MB))
    (src / "d.txt").write_bytes(rnd(500 * KB))
    store = LocalStore(tmp_path / "store", fsync=False)
    image_id, _ = write_image(store, import_rootfs(src), params=SMALL_CHUNKS)
    set_tag(store, parse_ref("pk:1"), image_id)
    return src, store, image_id


def _run(store: LocalStore, index: ImageIndex, fn: Any, *, cache: HostCache | None = None,
         trace: AccessTrace | None = None, pack: list[Any] | None = None) -> Any:
    """fn(fs, fetcher) with a fetcher over the store; with pack, its segments prefetched first."""
    async def main() -> Any:
        fetcher = ChunkFetcher(store, cache, MemoryCache())
        async with fetcher.running():
            if pack is not None:
                fetcher.pack.add(pack)
                fetcher.prefetch([(d, n) for d, n, _ in pack])
                while fetcher.pending("prefetch") or fetcher._inflight:
                    await trio.sleep(0.01)
            return await fn(ImageFS(index, fetcher, trace=trace), fetcher)

    return trio.run(main)


async def _read(fs: ImageFS, path: str, offset: int, length: int, step: int = 128 * KB) -> bytes:
    ino = fs.index.resolve("/" + path)
    fh = fs.open(ino, os.O_RDONLY)
    out = bytearray()
    while len(out) < length:
        data = await fs.read(fh, offset + len(out), min(step, length - len(out)))
        if not data:
            break
        out += data
    fs.release(fh)
    return bytes(out)


def _traced(store: LocalStore, image_id: str) -> profiles.Profile:
    """The unsaved profile of a start-up that made READS (through the model, as the daemon would)."""
    index = load_index(store, image_id)
    trace = AccessTrace()

    async def startup(fs: ImageFS, _f: ChunkFetcher) -> None:
        for path, off, n in READS:
            await _read(fs, path, off, n)

    _run(store, index, startup, trace=trace)
    return profiles.from_trace(image_id, trace.dump(index))


def _record(store: LocalStore, image_id: str, **save_kw: Any) -> profiles.Profile:
    """As _traced, saved (with its pack unless pack=False) and linked from pk:1."""
    prof = _traced(store, image_id)
    profiles.save(store, prof, parse_ref("pk:1"), **save_kw)
    return prof


def test_pack_holds_the_bytes_read_in_first_touch_order(image: tuple[Path, LocalStore, str]) -> None:
    src, store, image_id = image
    prof = _record(store, image_id)
    assert prof.pack and read_tag(store, parse_ref("pk:1"))["profile"]
    stored = profiles.load(store, read_tag(store, parse_ref("pk:1"))["profile"])
    assert stored.pack == prof.pack
    index = load_index(store, image_id)
    sizes = dict(zip(index.chunks, index.chunk_sizes))
    content: dict[str, bytes] = {d: blobs.decode(store.get(blobs.chunk_key(d)), d) for d, _ in prof.chunks}
    order = [d for d, _ in prof.chunks]
    seen: list[str] = []
    for seg in prof.pack:
        blob = store.get(blobs.chunk_key(seg.digest))
        raw = blobs.decode(blob, seg.digest)  # verifies blake3
        assert raw == b"".join(content[d][off:off + n] for d, off, n in seg.parts) and len(raw) == seg.size
        if seg.parts != ((seg.digest, 0, seg.size),):  # a segment of its own, at the pack's zstd level
            assert blob == blobs.encode(raw, profiles.PACK_LEVEL)
        for d, _, _ in seg.parts:
            if d not in seen:
                seen.append(d)
    assert seen == order  # chunks in first-touch order
    read = sum(n for _, _, n in READS)
    # It holds what was read (reads are whole 128 KiB steps here, ranges join across 32 KiB gaps)
    # and less than the chunks touched: b.so's unread middle and c.bin's tail are left out.
    assert read <= prof.pack_bytes < read + 1 * MB
    assert prof.pack_bytes < sum(sizes[d] for d in order)


def test_reads_in_the_pack_come_from_its_segments(image: tuple[Path, LocalStore, str], tmp_path: Path) -> None:
    src, store, image_id = image
    prof = _record(store, image_id)
    index = load_index(store, image_id)
    segments = profiles.pack_to_prefetch(prof, index, image_id)

    async def replay(fs: ImageFS, f: ChunkFetcher) -> dict[str, Any]:
        for path, off, n in READS:
            assert await _read(fs, path, off, n) == (src / path).read_bytes()[off:off + n]
        await trio.sleep(0.2)  # time for any readahead those reads might have started
        # sequential reads inside the pack start no readahead: it holds what the start-up read
        assert f.counters.by_kind["readahead"].chunks == 0 == f.counters.by_kind["demand"].chunks
        before = f.counters.by_kind["demand"].chunks
        # a read outside the pack loads its chunk; the result is right either way
        assert await _read(fs, "d.txt", 0, 500 * KB) == (src / "d.txt").read_bytes()
        assert f.counters.by_kind["demand"].chunks > before
        return f.stats()

    doc = _run(store, index, replay, pack=segments)
    assert doc["by_kind"]["demand"]["chunks"] + doc["by_kind"]["readahead"]["chunks"] > 0
    assert doc["by_kind"]["prefetch"]["chunks"] == len(prof.pack)
    assert doc["pack_reads"] > 0 and doc["pack_dropped"] == 0
    # Again with a host cache: the first mount leaves the segments there, the second reads them
    # from the host cache (verified in place), nothing from the store.
    cache = HostCache(tmp_path / "cache", 1 << 30)

    async def first(fs: ImageFS, f: ChunkFetcher) -> None:
        for path, off, n in READS:
            await _read(fs, path, off, n)

    _run(store, index, first, cache=cache, pack=segments)
    cache = HostCache(tmp_path / "cache", 1 << 30)

    async def second(fs: ImageFS, f: ChunkFetcher) -> dict[str, Any]:
        for path, off, n in READS:
            assert await _read(fs, path, off, n) == (src / path).read_bytes()[off:off + n]
        return f.stats()

    doc = _run(store, index, second, cache=cache, pack=segments)
    assert doc["chunks_fetched"] == 0 and doc["pack_reads"] > 0


def test_a_bad_segment_is_dropped_and_its_chunks_load_whole(image: tuple[Path, LocalStore, str],
                                                            caplog: pytest.LogCaptureFixture) -> None:
    src, store, image_id = image
    prof = _record(store, image_id, pack=True)
    index = load_index(store, image_id)
    segments = profiles.pack_to_prefetch(prof, index, image_id)
    bad = next(seg for seg in prof.pack if seg.parts != ((seg.digest, 0, seg.size),))  # not a chunk itself
    assert len(prof.pack) > 1
    key = blobs.chunk_key(bad.digest)
    blob = bytearray(store.get(key))
    blob[-1] ^= 0x55
    store.put(key, bytes(blob))

    async def replay(fs: ImageFS, f: ChunkFetcher) -> dict[str, Any]:
        for path, off, n in READS:
            assert await _read(fs, path, off, n) == (src / path).read_bytes()[off:off + n]
        return f.stats()

    doc = _run(store, index, replay, pack=segments)
    # Only that segment is given up: the others still serve their parts.
    assert doc["pack_dropped"] == 1 and doc["pack_reads"] > 0
    assert doc["by_kind"]["demand"]["chunks"] > 0
    assert "its chunks load whole" in caplog.text
    store.delete(key)  # missing altogether: the same
    doc = _run(store, index, replay, pack=segments)
    assert doc["pack_dropped"] == 1 and doc["pack_reads"] > 0


def test_pack_parts_of_chunks_the_image_lacks_are_ignored(image: tuple[Path, LocalStore, str],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    _src, store, image_id = image
    prof = _record(store, image_id)
    seg = prof.pack[0]
    bogus = profiles.Segment(seg.digest, seg.size + 10, (("f" * 64, 0, 10),) + seg.parts)
    prof.pack = [bogus] + prof.pack[1:]
    prof.chunks = [("f" * 64, 10)] + prof.chunks
    out = profiles.pack_to_prefetch(prof, load_index(store, image_id), image_id)
    assert [p[3] for p in out[0][2]][:1] == [10]  # the real parts keep their place in the segment
    assert all(p[0] != "f" * 64 for p in out[0][2]) and "does not have" in caplog.text


def test_gc_keeps_the_segments_of_kept_profiles_and_fsck_checks_them(image: tuple[Path, LocalStore, str]) -> None:
    _src, store, image_id = image
    prof = _record(store, image_id)
    segs = {s.digest for s in prof.pack}
    rep = gc(store, grace=0)
    assert rep.deleted_chunks == 0
    assert segs <= {i.key[len("chunks/"):] for i in store.list("chunks/")}
    rep = fsck(store, verify_chunks=True)
    assert rep.errors == [] and rep.orphan_chunks == 0 and rep.verified_chunks >= len(segs)
    store.delete(blobs.chunk_key(sorted(segs)[0]))
    assert any("needs missing pack segment" in e for e in fsck(store).errors)
    set_tag(store, parse_ref("pk:1"), image_id)  # the tag no longer links the profile
    rep = gc(store, grace=0)
    assert rep.deleted_profiles == 1 and rep.deleted_chunks == len(segs) - 1
    assert fsck(store).errors == []


def test_profile_with_pack_off_has_no_pack_and_writes_no_segment(image: tuple[Path, LocalStore, str]) -> None:
    _src, store, image_id = image
    before = len(list(store.list("chunks/")))
    prof = _record(store, image_id, pack=False)
    assert prof.reads and prof.pack == []
    assert len(list(store.list("chunks/"))) == before


def test_hostile_profile_documents_are_corrupt_blobs() -> None:
    a = "a" * 64
    good = {"v": 1, "image": "i" * 64, "chunks": [[a, 10]], "files": 1, "ready_s": None, "command": [],
            "created": 1.0, "pack": [["c" * 64, 5, [[0, 0, 5]]]]}
    assert profiles.Profile.decode(json.dumps(good).encode(), "x").pack[0].parts == ((a, 0, 5),)
    bad = [b"[]", b"null", b"{}", b"not json", b"[" * 100_000 + b"]" * 100_000,
           json.dumps({**good, "v": 2}).encode(),
           json.dumps({**good, "files": float("inf")}).encode(),
           json.dumps({**good, "chunks": [[a, float("inf")]]}).encode(),
           json.dumps({**good, "pack": [["c" * 64, 5, [[-1, 0, 5]]]]}).encode(),  # no chunk -1
           json.dumps({**good, "pack": [["c" * 64, 5, [[0, float("inf"), 5]]]]}).encode(),
           json.dumps({**good, "pack": [["c" * 64, 5, [[0, -3, 5]]]]}).encode(),
           json.dumps({**good, "pack": [["c" * 64, 5]]}).encode(),
           json.dumps({**good, "pack": "x"}).encode()]
    for doc in bad:
        with pytest.raises(CorruptBlob):
            profiles.Profile.decode(doc, "x")


class _Flaky(LocalStore):
    """A local store whose reads of some keys fail as a store that does not answer would."""

    failing: set[str] = set()

    def get(self, key: str) -> bytes:
        if any(key.startswith(p) for p in self.failing):
            raise StoreUnavailable(f"{key}: the store does not answer")
        return super().get(key)


def test_a_store_that_does_not_answer_fails_the_read_and_keeps_the_segment(image: tuple[Path, LocalStore, str],
                                                                          tmp_path: Path) -> None:
    src, local, image_id = image
    prof = _record(local, image_id)
    store = _Flaky(tmp_path / "store", fsync=False)
    index = load_index(store, image_id)
    segments = profiles.pack_to_prefetch(prof, index, image_id)
    path, off, n = READS[0]

    async def replay(fs: ImageFS, f: ChunkFetcher) -> dict[str, Any]:
        store.failing = {"chunks/"}
        with pytest.raises(ChunkUnavailable):
            await _read(fs, path, off, n)
        store.failing = set()
        assert await _read(fs, path, off, n) == (src / path).read_bytes()[off:off + n]
        return f.stats()

    doc = _run(store, index, replay, pack=[])
    assert doc["pack_reads"] == 0  # no pack given: the plain path, for comparison below
    async def replay_pack(fs: ImageFS, f: ChunkFetcher) -> dict[str, Any]:
        f.pack.add(segments)  # not prefetched: the read loads the segment itself
        return await replay(fs, f)

    doc = _run(store, index, replay_pack)
    assert doc["pack_dropped"] == 0 and doc["pack_segments"] == len(segments) and doc["pack_reads"] > 0
    assert doc["by_kind"]["demand"]["chunks"] == 1  # the segment, once the store answered again


def test_gc_stops_rather_than_sweep_the_segments_of_a_profile_it_cannot_read(
        image: tuple[Path, LocalStore, str], tmp_path: Path) -> None:
    _src, local, image_id = image
    prof = _record(local, image_id)
    store = _Flaky(tmp_path / "store", fsync=False)
    store.failing = {"profiles/"}
    with pytest.raises(StoreError):
        gc(store, grace=0)
    assert any(f"profile {read_tag(store, parse_ref('pk:1'))['profile']}" in e for e in fsck(store).errors)
    store.failing = set()
    assert gc(store, grace=0).deleted_chunks == 0
    assert {s.digest for s in prof.pack} <= {i.key[len("chunks/"):] for i in store.list("chunks/")}


def test_sequential_reads_past_the_pack_read_ahead(image: tuple[Path, LocalStore, str]) -> None:
    """A reader that streams a file the start-up read only parts of leaves the pack: the chunks
    ahead of it are read ahead, also one the pack holds a small part of (b.so at 900 KiB)."""
    src, store, image_id = image
    prof = _record(store, image_id)
    index = load_index(store, image_id)
    segments = profiles.pack_to_prefetch(prof, index, image_id)
    number, offset, _n, _at = next(index.inode(index.resolve("/lib/b.so")).extents_for(900 * KB, 8 * KB))
    partial = index.chunks[number]
    asked: list[str] = []

    async def stream(fs: ImageFS, f: ChunkFetcher) -> dict[str, Any]:
        assert f.planned(partial, offset, 8 * KB) and not f.planned(partial, 0, index.chunk_sizes[number])
        enqueue = f._enqueue

        def spy(kind: str, chunks: Any) -> None:
            if kind == "readahead":
                asked.extend(d for d, _ in chunks)
            enqueue(kind, chunks)

        f._enqueue = spy  # type: ignore[method-assign]
        for path in ("lib/b.so", "c.bin"):
            assert await _read(fs, path, 0, 10 * MB) == (src / path).read_bytes()
        return f.stats()

    doc = _run(store, index, stream, pack=segments)
    assert doc["by_kind"]["readahead"]["chunks"] > 0
    assert partial in asked


def test_segments_start_small_and_double(image: tuple[Path, LocalStore, str]) -> None:
    """What a start reads first comes in a small segment; each next segment is twice as big (until
    the cap), and only by the last part it takes does one overshoot its size."""
    _src, store, image_id = image
    prof = _traced(store, image_id)
    pack = profiles.build_pack(store, prof, segment=256 * KB, first=32 * KB)
    assert len(pack) >= 4
    for i, seg in enumerate(pack[:-1]):
        want = min(256 * KB, (32 * KB) << i)
        assert seg.size >= want and seg.size - seg.parts[-1][2] < want, (i, seg.size)


def test_a_segment_that_is_one_whole_chunk_is_that_chunk(image: tuple[Path, LocalStore, str]) -> None:
    """Segments of one part each (segment size 1): a chunk read for the most part is packed
    whole, so its segment is the chunk itself (same digest, not stored again), and reads of it
    must not go round in a circle."""
    src, store, image_id = image
    index = load_index(store, image_id)
    prof = _traced(store, image_id)
    prof.pack = profiles.build_pack(store, prof, segment=1)
    selves = [s for s in prof.pack if s.parts == ((s.digest, 0, s.size),)]
    assert selves and all(s.digest in index.chunks for s in selves)
    segments = profiles.pack_to_prefetch(prof, index, image_id)

    async def replay(fs: ImageFS, f: ChunkFetcher) -> dict[str, Any]:
        f.pack.add(segments)  # not prefetched: every read loads what it needs
        for path, off, n in READS:
            assert await _read(fs, path, off, n) == (src / path).read_bytes()[off:off + n]
        return f.stats()

    doc = _run(store, index, replay)
    # Such a chunk is planned like any part of the pack: reading it reads nothing else ahead.
    assert doc["by_kind"]["readahead"]["chunks"] == 0, doc["by_kind"]

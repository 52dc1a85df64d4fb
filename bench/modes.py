"""One timed run of a workload in one mode. Every mode goes through the same runner and the same
timings; they differ only in where the container's root filesystem comes from:

native    the image exported to local disk beforehand (page cache dropped): the floor
pull      what docker/containerd do: fetch every chunk from the store (in parallel), decompress,
          write the rootfs to disk, then run; the pull is a phase of its own
cold      coldstart: fresh lazy mount, empty host cache, page cache dropped
warm      coldstart: fresh lazy mount, host cache already holding the image, page cache dropped;
          as `coldstart run` does by default, the mount replays the order in which the last mount
          of the image on this host first touched its chunks and names (learned, not a profile)
prefetch  cold, with the image's recorded start-up profile streamed ahead of demand
guess     cold, no profile: the working set guessed from the command (imagefs.guess) streamed instead
containerd  stock containerd: `ctr image pull` from a local registry (fetch + unpack), then `ctr run`
            (bench.containerd); not through our runner, but timed the same way to the ready line
"""
from __future__ import annotations

import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.util import Trash, drop_page_cache
from bench.workloads import READY, Workload
from imagefs import chunks as blobs
from imagefs.export import export_image
from imagefs.fs.mounts import read_stats
from imagefs.images import load_index
from imagefs.reader import ChunkReader
from imagefs.store.factory import open_store
from runner.imagefs_lower import imagefs_provider, unmount_all
from runner.lower import DirectoryProvider
from runner.options import RunOptions
from runner.run import run


@dataclass
class Context:
    """What every run of a suite shares."""

    store_url: str
    work: Path  # scratch: state dir, layers, pulled rootfs, caches
    native: dict[str, Path] = field(default_factory=dict)  # image ID -> exported rootfs
    gpus: str | None = None
    prefetch_workers: int | None = None
    containerd: Any = None  # bench.containerd.ContainerdBench when the containerd mode runs
    trash: Trash = field(init=False)  # used caches and pulled trees, deleted when the suite ends

    def __post_init__(self) -> None:
        self.trash = Trash(self.work / "trash")  # (leftovers of an interrupted suite go now)

    @property
    def state_dir(self) -> Path:
        return self.work / "state"

    @property
    def warm_cache(self) -> Path:
        return self.work / "warm-cache"


@dataclass
class Record:
    workload: str
    mode: str
    rep: int
    ok: bool
    ready_s: float
    phases: dict[str, float]
    bytes_fetched: int = 0
    fetches: int = 0
    bytes_read: int = 0
    prefetched: int = 0
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _options(ctx: Context, w: Workload, image: str) -> RunOptions:
    return RunOptions(image=image, command=list(w.command), entrypoint="", ready_regex=READY,
                      network="none", state_dir=ctx.state_dir, layers_dir=ctx.work / "layers",
                      store=ctx.store_url, gpus=ctx.gpus if w.gpu else None)


def _record(w: Workload, mode: str, rep: int, result: Any, extra_s: float = 0.0,
            phases: dict[str, float] | None = None) -> Record:
    t = {k: float(v) for k, v in result.timings.items()  # seconds since the run began (not started_at)
         if k != "started_at" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    shifted = {k: v + extra_s for k, v in t.items()}
    ready = shifted.get("ready", shifted.get("exit", float("nan")))
    return Record(w.name, mode, rep, result.exit_code == 0 and result.ready, ready, {**(phases or {}), **shifted})


def run_native(ctx: Context, w: Workload, image_id: str, config: Any, rep: int) -> Record:
    drop_page_cache()
    res = run(_options(ctx, w, image_id), DirectoryProvider(ctx.native[image_id], config),
              stdout=_discard, stderr=_discard)
    return _record(w, "native", rep, res)


def run_pull(ctx: Context, w: Workload, image_id: str, config: Any, rep: int) -> Record:
    drop_page_cache()
    t0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(dir=ctx.work, prefix="pull-"))
    try:
        fetched = pull(ctx.store_url, image_id, tmp / "rootfs")
        pulled = time.monotonic() - t0
        res = run(_options(ctx, w, image_id), DirectoryProvider(tmp / "rootfs", config),
                  stdout=_discard, stderr=_discard)
    finally:
        ctx.trash.discard(tmp)
    rec = _record(w, "pull", rep, res, pulled, {"pull": pulled})
    rec.bytes_fetched, rec.fetches = fetched
    return rec


def pull(store_url: str, image_id: str, dest: Path, workers: int = 8) -> tuple[int, int]:
    """Fetch every chunk in parallel, then write the whole tree: (stored bytes, chunk count)."""
    with open_store(store_url) as store:
        index = load_index(store, image_id)
        with ThreadPoolExecutor(workers, thread_name_prefix="pull") as pool:
            raw = list(pool.map(lambda d: store.get(blobs.chunk_key(d)), index.chunks))
        reader = _MemoryReader(store, {d: blobs.decode(b, d) for d, b in zip(index.chunks, raw)})
        export_image(index, reader, dest)
    return sum(map(len, raw)), len(raw)


class _MemoryReader(ChunkReader):
    def __init__(self, store: Any, data: dict[str, bytes]) -> None:
        super().__init__(store)
        self.data = data

    def get(self, digest: str) -> bytes:
        return self.data[digest]


def run_containerd(ctx: Context, w: Workload, image_id: str, rep: int) -> Record:
    """A cold `ctr image pull` of the image from the registry, then `ctr run --rm` to the ready line."""
    from bench.containerd import make_cold, pull_and_run

    if ctx.containerd is None:
        raise RuntimeError("the containerd mode was not set up (containerd or docker-registry missing?)")
    if w.gpu:
        raise RuntimeError("the containerd mode does not run GPU workloads")
    pushed = ctx.containerd.images[image_id]
    make_cold(ctx.containerd.containerd)
    drop_page_cache()
    res = pull_and_run(ctx.containerd.containerd, pushed.ref, list(w.command), READY)
    phases = {"pull": res.pull_s, "ready": res.ready_s, "exit": res.exit_s}
    return Record(w.name, "containerd", rep, res.ok, res.ready_s, phases, bytes_fetched=res.fetched_bytes,
                  fetches=res.fetched_blobs, error=res.error)


def run_lazy(ctx: Context, w: Workload, image_id: str, mode: str, rep: int, tag: str = "") -> Record:
    """cold / warm / prefetch / guess: a fresh mount each run; the host cache decides cold or warm.
    prefetch runs by tag, whose start-up profile the mount then streams; guess by image ID (no
    profile) with the guessed working set streamed; warm by image ID with what the last mount
    learned replayed (the default); cold by image ID with prefetch off (its cache is empty, so
    there is nothing learned either way)."""
    unmount_all(ctx.state_dir)
    cache = ctx.warm_cache if mode == "warm" else ctx.work / f"cache-{mode}-{rep}"
    if mode != "warm":
        ctx.trash.discard(cache)  # a leftover of an interrupted suite
    drop_page_cache()
    prefetch = mode == "prefetch"
    provider = imagefs_provider(ctx.state_dir, ctx.store_url, str(cache), linger=True,
                                prefetch=mode in ("prefetch", "guess", "warm"), guess=mode == "guess",
                                prefetch_workers=ctx.prefetch_workers)
    opts = _options(ctx, w, tag if prefetch else image_id)
    res = run(opts, provider, stdout=_discard, stderr=_discard)
    rec = _record(w, mode, rep, res)
    mnt = provider.mountpoint(image_id)
    try:
        stats = read_stats(mnt)
        rec.bytes_fetched = int(stats["fetch"]["bytes_fetched"])
        rec.fetches = int(stats["fetch"]["chunks_fetched"])
        rec.bytes_read = int(stats["fuse"]["read_bytes"])
        rec.prefetched = int(stats["fetch"]["by_kind"]["prefetch"]["bytes"])
    finally:
        unmount_all(ctx.state_dir)
        if mode != "warm":
            ctx.trash.discard(cache)
    return rec


def record_profile(ctx: Context, w: Workload, tag: str) -> None:
    """Record the workload's start-up profile (untimed) and link it from the tag."""
    from runner.profiling import record

    record(_options(ctx, w, tag), stop_at_ready=True, stdout=_discard, stderr=_discard)


def warm_up(ctx: Context, w: Workload, image_id: str) -> None:
    """Fill the warm host cache with everything the workload reads (an untimed run)."""
    run_lazy(ctx, w, image_id, "warm", -1)


def _discard(data: bytes) -> None:
    return None

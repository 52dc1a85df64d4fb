"""The mount daemon: serves one image at one mountpoint until it is unmounted or signalled.

Run as ``python -m imagefs.fs.daemon --config JSON --ready-fd N [--detach]``; mounts.mount_image()
does that and waits for the one-line JSON readiness message the daemon writes to the fd once the
filesystem answers. The daemon keeps a state file and a control socket (stats, trace, prefetch)
next to each other in the run directory, and removes both when it ends.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import pyfuse3
import trio

from imagefs import profile as profiles
from imagefs.chunks import Digest, is_digest
from imagefs.errors import ImageFSError
from imagefs.fs import control, push, warm
from imagefs.fs.cache import DEFAULT_MEMORY_SIZE, DEFAULT_SIZE, HostCache, MemoryCache
from imagefs.fs.fetcher import ChunkFetcher, FetchLimits
from imagefs.fs.fuse_ops import FuseOps, default_poll_us, mount_options, set_polling
from imagefs.fs.model import ImageFS, ReadaheadPolicy
from imagefs.fs.mounts import detach, mount_device
from imagefs.fs.trace import DEFAULT_LIMIT, NAME_KINDS, AccessTrace
from imagefs.leases import HEARTBEAT, MountLease
from imagefs.guess import DEFAULT_BUDGET as DEFAULT_GUESS_BUDGET, DEFAULT_PATH as DEFAULT_GUESS_PATH
from imagefs.guess import guess as guess_startup
from imagefs.indexcache import load_index
from imagefs.store.factory import open_store

log = logging.getLogger(__name__)

Ready = Callable[[dict[str, Any]], None]


# The mount's lease on its image (imagefs.leases.MountLease: gc keeps the image while the mount
# lives) is written this long after the mount is ready, so that the store request does not take
# a CPU from the container's start. A gc in that window can lose only an image whose tag was
# removed (or moved) and whose chunks are older than gc's grace period.
LEASE_DELAY_S = 5.0


@dataclass
class DaemonConfig:
    store_url: str
    image_id: str
    mountpoint: str
    cache_dir: str
    state_path: str
    socket_path: str
    log_path: str = ""
    ref: str = ""
    cache_size: int = DEFAULT_SIZE
    memory_size: int = DEFAULT_MEMORY_SIZE
    allow_other: bool = True
    kernel_readahead_kb: int = 1024  # 0 leaves the kernel's default (128 KiB)
    readahead_max: int = ReadaheadPolicy().max_bytes
    limits: dict[str, int] = field(default_factory=lambda: asdict(FetchLimits()))
    trace_limit: int = DEFAULT_LIMIT
    # How long a worker thread that finished a load may wait for the event loop to let go of
    # the GIL (Python's default of 5 ms stalls readahead behind a busy loop).
    switch_interval: float = 0.0005
    # Microseconds to keep polling the FUSE device after a reply ($COLDSTART_POLL_US, else
    # fuse_ops.POLL_US; 0: never). Off while loads a reader waits for are in flight, whose
    # decoding needs the CPU more.
    poll_us: int = field(default_factory=default_poll_us)
    profile: str = ""  # digest of a start-up profile to prefetch after the mount is ready
    # Replay the profile's lookups and listings through the mount once it is ready (imagefs.fs.warm).
    warm_names: bool = True
    # Hand the profile's read-set pack to the kernel's page cache as it arrives (imagefs.fs.push).
    push_pages: bool = True
    # Without a profile: the command a container will run (argv, PATH, cwd), from which the
    # start-up working set is guessed and prefetched (imagefs.guess); empty argv: no guess.
    guess_argv: list[str] = field(default_factory=list)
    guess_path: str = DEFAULT_GUESS_PATH
    guess_cwd: str = "/"
    guess_budget: int = DEFAULT_GUESS_BUDGET
    # Without a profile: prefetch what the last mount of the image on this host touched first
    # (kept in the host cache directory, imagefs.profile.learn); it goes before a guess.
    learned: bool = True
    # Answer open/opendir with ENOSYS so the kernel stops sending them (fuse_ops.FuseOps);
    # None: wherever the pyfuse3 build allows it. False serves opens (a stock pyfuse3's way).
    skip_open: bool | None = None
    lease_delay_s: float = LEASE_DELAY_S  # see LEASE_DELAY_S
    verbose: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "DaemonConfig":
        return cls(**json.loads(text))


PROFILE_WAIT_S = 0.5  # how long a mount may wait for its profile before it reports ready anyway
# How long a stopping daemon waits for its threads past the fetcher's drain_timeout (the time it
# gives host-cache writes) before it exits without them: a store request may never return.
STOP_GRACE_S = 1.0


class _Loading:
    """A call run in a thread of its own: its result, or the exception it raised."""

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), name="profile-load", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            self.result = fn(*args)
        except BaseException as e:  # handed to whoever waits
            self.error = e

    def wait(self, timeout: float | None) -> bool:
        """Whether it has finished, waiting up to timeout seconds (None: until it has)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


class Daemon:
    """One mounted image: the model, the fetcher, the FUSE adapter and the control socket."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.started = time.time()
        self._loop_thread: int | None = None  # set by run()
        self.startup = StartupClock()
        self.store = open_store(config.store_url)
        # The profile loads while the index does, so that its pack is known before the first read
        # (a runner reads /etc/passwd of the image a few ms after the mount is ready).
        self._profile = _Loading(profiles.load, self.store, config.profile) if config.profile else None
        self._profile_queued = False
        self.warm_stats = warm.WarmStats()
        self._names_done = trio.Event()  # set when the names are looked up (or will not be)
        self.push_stats = push.PushStats()
        self._push_gate = push.Gate()
        self.index = load_index(self.store, config.image_id, config.cache_dir)  # host copy first
        self.startup.mark("index")
        self.disk = HostCache(config.cache_dir, config.cache_size)
        self.startup.mark("host_cache")
        self.fetcher = ChunkFetcher(self.store, self.disk, MemoryCache(config.memory_size),
                                    FetchLimits(**config.limits))
        self.trace = AccessTrace(config.trace_limit)
        policy = ReadaheadPolicy(max_bytes=config.readahead_max)
        self.fs = ImageFS(self.index, self.fetcher, trace=self.trace, readahead=policy)
        self.ops = FuseOps(self.fs, skip_open=self.config.skip_open)
        self.signalled = False
        self._lease = MountLease(self.store, config.image_id)
        self._device: str | None = None  # 'major:minor' of the mount, once mounted
        self._session_open = False
        self._exit_timer: threading.Timer | None = None
        self.polling_us = 0  # what _start_polling turned on
        self.startup.mark("model")

    def cached_chunks(self) -> tuple[int, int]:
        """(chunks of this image already in the host cache, distinct chunks of the image)."""
        digests = set(self.index.chunks)
        return self.disk.count_present(digests), len(digests)

    def run(self, ready: Ready) -> None:
        self._loop_thread = threading.get_ident()  # the thread that serves FUSE requests
        sys.setswitchinterval(self.config.switch_interval)
        cached, total = self.cached_chunks()
        self.startup.mark("cached_count")
        pyfuse3.init(self.ops, self.config.mountpoint, mount_options(allow_other=self.config.allow_other))
        self._session_open = True
        self._device = mount_device(self.config.mountpoint)
        self._start_polling()
        self.startup.mark("fuse_init")
        try:
            trio.run(self._main, ready, {"cached_chunks": cached, "total_chunks": total})
        finally:
            self._close_session()
            self._remove_state()
            self._save_learned()  # on the host's disk: before the lease's store request
            self._lease.release()
            self.store.close()
            if self._exit_timer is not None:
                self._exit_timer.cancel()

    def _close_session(self) -> None:
        """Close the FUSE session (once): reads of files still open fail from then on. After a
        signal the mount is detached too, if the mount at the mountpoint is still this one (after
        an external umount the mountpoint may already hold a new mount that must not be touched)."""
        if not self._session_open:
            return
        self._session_open = False
        self.fetcher.on_busy = None  # polling is a setting of the session
        if not self._push_gate.close(timeout=1.0):
            log.warning("a push into the page cache is still waiting for a page; closing anyway")
        pyfuse3.close(unmount=self.signalled and self._still_mounted())

    def _still_mounted(self) -> bool:
        return self._device is not None and mount_device(self.config.mountpoint) == self._device

    def _arm_exit_timer(self) -> None:
        """Exit within the fetcher's drain_timeout plus STOP_GRACE_S from now, whatever the worker
        threads do: one stuck in a store request that does not return must not keep the daemon."""
        if self._exit_timer is None:
            grace = self.fetcher.limits.drain_timeout + STOP_GRACE_S
            self._exit_timer = threading.Timer(grace, self._exit_now, args=(grace,))
            self._exit_timer.daemon = True
            self._exit_timer.start()

    def _exit_now(self, grace: float) -> None:
        """The exit timer's end (in its own thread): leave the threads that still run behind."""
        log.warning("still stopping after %.1f s (a store request that does not return?): exiting "
                    "without waiting for the threads that run", grace)
        if self._session_open and self.signalled and self._still_mounted():
            detach(self.config.mountpoint)  # the session closes as the process exits
        self._remove_state()
        logging.shutdown()
        os._exit(0)

    def _start_polling(self) -> None:
        poll = self.config.poll_us
        if poll > 0 and set_polling(poll):
            self.polling_us = poll
            self.fetcher.on_busy = lambda busy: set_polling(0 if busy else poll)

    def _save_learned(self) -> None:
        """Remember this mount's first-touch order for the next mount of the image on this host
        (not when it touched nothing: a mount used only for stats must not erase what was learned)."""
        learned = profiles.learn(self.index, self.config.image_id, self.trace.events,
                                 names=self.trace.dump(self.index, NAME_KINDS))
        if learned.chunks:
            profiles.save_learned(self.config.cache_dir, learned)

    async def _main(self, ready: Ready, info: dict[str, Any]) -> None:
        async with self.fetcher.running():
            try:
                async with trio.open_nursery() as nursery:
                    await self._serve(nursery, ready, info)
            finally:
                # Unmounted or signalled: the session goes before the fetcher drains its loads,
                # which may wait for a store that does not answer.
                self._close_session()
                self._arm_exit_timer()

    async def _serve(self, nursery: trio.Nursery, ready: Ready, info: dict[str, Any]) -> None:
        await nursery.start(control.serve, self.config.socket_path, self._handle)
        nursery.start_soon(self._watch_signals, nursery.cancel_scope, name="signals")
        nursery.start_soon(self._fuse_main, nursery.cancel_scope, name="fuse-main")
        # The first request waits for the kernel's INIT handshake, which resets readahead.
        await trio.to_thread.run_sync(os.stat, self.config.mountpoint, abandon_on_cancel=True)
        set_kernel_readahead(self._device, self.config.kernel_readahead_kb)
        self._write_state()
        if self._profile is not None and (self._profile.wait(0) or await trio.to_thread.run_sync(
                self._profile.wait, PROFILE_WAIT_S)):  # no thread hop when it is there already
            self._queue_profile(self._profile)
        ready({"ok": True, "pid": os.getpid(), "image": self.config.image_id, **info})
        self.startup.mark("ready")
        log.info("start-up (ms): %s", self.startup)
        self._start_prefetch(nursery)
        nursery.start_soon(self._hold_lease, name="lease")
        log.info("serving image %s at %s", self.config.image_id, self.config.mountpoint)

    async def _hold_lease(self) -> None:
        """Take the mount's lease on its image lease_delay_s after ready, then keep it fresh; run()
        releases it at the end."""
        await trio.sleep(self.config.lease_delay_s)
        if await trio.to_thread.run_sync(self._lease.take, abandon_on_cancel=True):
            while True:
                await trio.sleep(HEARTBEAT)
                await trio.to_thread.run_sync(self._lease.refresh, abandon_on_cancel=True)

    def _start_prefetch(self, nursery: trio.Nursery) -> None:
        """The recorded profile, else what this host learned, else a guess from the command."""
        if self._profile is not None:
            if not self._profile_queued:
                nursery.start_soon(self._replay_profile, name="prefetch-profile")
            if self.config.warm_names:
                nursery.start_soon(self._warm_recorded, self._profile, name="warm-names")
            if self.config.push_pages:
                nursery.start_soon(self._push_recorded, self._profile, name="push-pages")
        elif self.config.learned and self._prefetch_learned(nursery):
            return
        elif self.config.guess_argv:
            nursery.start_soon(self._prefetch_guess, name="prefetch-guess")

    def _prefetch_learned(self, nursery: trio.Nursery) -> bool:
        """Queue what the last mount of this image on this host touched first, if it is known
        (and look up its names ahead)."""
        learned = profiles.load_learned(self.config.cache_dir, self.config.image_id)
        if learned is None or not learned.chunks:
            return False
        chunks = profiles.chunks_to_prefetch(learned, self.index, self.config.image_id)
        self.fetcher.prefetch(chunks)
        log.info("prefetching %d chunks learned by an earlier mount on this host", len(chunks))
        if learned.names and self.config.warm_names:
            nursery.start_soon(self._warm_names, learned, name="warm-names")
        return True

    async def _prefetch_guess(self) -> None:
        """Queue the guessed start-up chunks of the configured command for prefetch."""
        c = self.config
        try:
            found = await trio.to_thread.run_sync(
                lambda: guess_startup(self.index, c.guess_argv, c.guess_path, c.guess_cwd, c.guess_budget))
        except Exception:  # a guess is an optimisation: its bug must not take the mount down
            log.exception("no prefetch: guessing the working set of %s failed", c.guess_argv[:3])
            return
        self.fetcher.prefetch(found.chunks)
        log.info("prefetching %d chunks (%d bytes) guessed for %s from %d files", len(found.chunks),
                 sum(n for _, n in found.chunks), c.guess_argv[:3], len(found.files))

    async def _replay_profile(self) -> None:
        """Queue the profile once it has loaded (if that took longer than the mount did)."""
        assert self._profile is not None
        await trio.to_thread.run_sync(self._profile.wait, None, abandon_on_cancel=True)
        self._queue_profile(self._profile)

    async def _warm_recorded(self, loading: "_Loading") -> None:
        """The recorded profile's names, once it has loaded (its errors are _queue_profile's)."""
        try:
            await trio.to_thread.run_sync(loading.wait, None, abandon_on_cancel=True)
            if loading.error is None and loading.result.names:
                await self._warm_names(loading.result)
        finally:
            self._names_done.set()

    async def _warm_names(self, prof: profiles.Profile) -> None:
        """Look up and list what the profile's start-up did, so that the kernel has the answers
        before the container asks (imagefs.fs.warm); stops on unmount."""
        names = prof.names
        self.warm_stats.total = len(names)
        try:
            entries = await trio.to_thread.run_sync(warm.plan, self.index, names)  # off the loop
            self.warm_stats.planned = len(entries)
            if len(entries) < len(names):
                log.warning("profile names %d paths that image %s does not resolve safely; skipping them",
                            len(names) - len(entries), self.config.image_id)
            await warm.replay(self.config.mountpoint, entries, self.warm_stats)
        except (OSError, ValueError) as e:
            log.warning("could not look up the profile's names ahead: %s", e)
            return
        except Exception:  # an optimisation: its bug must not take the mount down
            log.exception("could not look up the profile's names ahead")
            return
        finally:
            self._names_done.set()
        log.info("looked up or listed %d of the profile's %d names in %.3f s", self.warm_stats.done,
                 len(names), self.warm_stats.seconds)

    async def _push_recorded(self, loading: "_Loading") -> None:
        """Push the recorded profile's pack into the page cache, segment by segment as each
        arrives, for the files its names hold (imagefs.fs.push); stops on unmount."""
        await trio.to_thread.run_sync(loading.wait, None, abandon_on_cancel=True)
        if loading.error is not None or not loading.result.pack or not loading.result.names:
            return
        prof, stats = loading.result, self.push_stats
        segments = profiles.pack_to_prefetch(prof, self.index, self.config.image_id)
        start = time.monotonic()
        stats.running = True
        try:
            later: list[tuple[push.Run, list[bytes]]] = []  # files the kernel did not know yet
            # Planning takes 10-25 ms for `import torch`: in a thread, so that the loop goes on
            # answering the runner, which reads the image's /etc/passwd right after the mount.
            planned = await trio.to_thread.run_sync(push.plan, self.index, prof.names, segments)
            for seg, runs in planned:
                if await self._segment_arrived(seg):
                    if later:  # the name worker may have looked them up meanwhile
                        later = await self._store(later)
                    fresh = await self._store(self._run_views(runs))
                    stats.not_known += len(fresh)
                    later += fresh
            if later:
                if self.config.warm_names:  # the kernel knows the files once the names are looked up
                    await self._names_done.wait()
                stats.dropped = len(await self._store(later))
        except OSError as e:  # e.g. a kernel without notify_store: the reads will simply come
            log.info("stopped pushing the pack into the page cache: %s", e)
        except Exception:  # an optimisation: its bug must not take the mount down
            log.exception("stopped pushing the pack into the page cache")
        finally:
            stats.seconds = time.monotonic() - start
            stats.running = False
        log.info("pushed %d runs (%d bytes) of the pack into the page cache in %.3f s", stats.runs,
                 stats.bytes, stats.seconds)

    async def _segment_arrived(self, seg: str) -> bool:
        while not self.fetcher.holds(seg):  # type: ignore[arg-type]
            if not self.fetcher.expects(seg):  # type: ignore[arg-type]
                return False  # its load failed (logged by the fetcher)
            await trio.sleep(0.002)
        return True

    def _run_views(self, runs: list[push.Run]) -> list[tuple[push.Run, list[Any]]]:
        """Each run with the buffers of its pieces (runs with a piece not at hand are left out)."""
        items = []
        for run in runs:
            views = [self.fetcher.held_range(c, o, n) for c, o, n in run.pieces]  # type: ignore[arg-type]
            if all(v is not None for v in views):
                items.append((run, views))
        return items

    async def _store(self, items: list[Any]) -> list[tuple[push.Run, list[bytes]]]:
        if not items:
            return []
        return await trio.to_thread.run_sync(push.store_runs, items, pyfuse3.notify_store,
                                             self.push_stats, self._push_gate, abandon_on_cancel=True)

    def _queue_profile(self, loading: "_Loading") -> None:
        """Queue the profile's read-set pack (else its chunks) for prefetch, in order; demand
        reads keep priority."""
        if self._profile_queued:
            return
        self._profile_queued = True
        if isinstance(loading.error, ImageFSError):
            log.warning("no prefetch: %s", loading.error)
            return
        if loading.error is not None:  # a bug must cost the prefetch, not the mount
            log.error("no prefetch: loading profile %s failed", self.config.profile[:12], exc_info=loading.error)
            return
        prof = loading.result
        if prof.pack:
            segments = profiles.pack_to_prefetch(prof, self.index, self.config.image_id)
            self.fetcher.pack.add(segments)
            self.fetcher.prefetch([(d, n) for d, n, _ in segments])
            log.info("prefetching the %d-segment read-set pack (%d bytes) of profile %s",
                     len(segments), prof.pack_bytes, self.config.profile[:12])
            return
        chunks = profiles.chunks_to_prefetch(prof, self.index, self.config.image_id)
        self.fetcher.prefetch(chunks)
        log.info("prefetching %d chunks from profile %s", len(chunks), self.config.profile[:12])

    async def _fuse_main(self, scope: trio.CancelScope) -> None:
        await pyfuse3.main()
        log.info("unmounted %s", self.config.mountpoint)
        scope.cancel()

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        """Stop on the first signal: FUSE requests are no longer read, those in flight (reads
        waiting for the store) are cancelled, and _main closes the session and detaches the mount
        at once; the process exits once the fetcher lets go (see _arm_exit_timer)."""
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("signal %d: unmounting %s", signum, self.config.mountpoint)
                self.signalled = True
                self._arm_exit_timer()
                pyfuse3.terminate()
                scope.cancel()
                return

    async def _handle(self, request: dict[str, Any]) -> Any:
        op = request.get("op")
        if op == "ping":
            return {"pid": os.getpid()}
        if op == "stats":
            return self.stats()
        if op == "trace":
            return self.trace.dump(self.index)
        if op == "prefetch":
            chunks = self._chunks_of_image(request.get("chunks", []))
            self.fetcher.prefetch(chunks)
            return {"queued": len(chunks)}
        raise ValueError(f"unknown request {op!r}")

    def _chunks_of_image(self, entries: Any) -> list[tuple[Digest, int]]:
        """The [digest, size] pairs of a prefetch request; ValueError unless each is a chunk of
        this image with its size in the index (a digest names a host-cache file)."""
        if not isinstance(entries, list):
            raise ValueError("chunks must be a list of [digest, size] pairs")
        sizes = self.index.size_of
        chunks = []
        for entry in entries:
            digest, size = entry if isinstance(entry, list) and len(entry) == 2 else (None, None)
            if not (isinstance(digest, str) and is_digest(digest) and sizes.get(digest) == size):
                raise ValueError(f"not a chunk of image {self.config.image_id[:12]}: {str(entry)[:100]}")
            chunks.append((Digest(digest), sizes[digest]))
        return chunks

    def stats(self) -> dict[str, Any]:
        return {"mountpoint": self.config.mountpoint, "image": self.config.image_id,
                "ref": self.config.ref, "store": self.config.store_url, "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 3), "fetch": self.fetcher.stats(),
                "fuse": {**self.ops.metrics.as_dict(), "polling_us": self.polling_us},
                "trace": {"events": len(self.trace), "truncated": self.trace.truncated},
                "names": self.warm_stats.as_dict(), "pushed": self.push_stats.as_dict(),
                "cpu": self.cpu_times()}

    def cpu_times(self) -> dict[str, float]:
        """CPU seconds used so far: by the whole daemon (every thread, ended ones too) and by the
        event-loop thread alone, which serves the FUSE requests (the rest fetched, decoded and
        wrote chunks)."""
        ru = resource.getrusage(resource.RUSAGE_SELF)
        doc = {"process_s": round(ru.ru_utime + ru.ru_stime, 3)}
        if self._loop_thread is not None:
            clock = time.pthread_getcpuclockid(self._loop_thread)
            doc["loop_s"] = round(time.clock_gettime(clock), 3)
        return doc

    def _write_state(self) -> None:
        c = self.config
        doc = {"pid": os.getpid(), "mountpoint": c.mountpoint, "image": c.image_id, "ref": c.ref,
               "store": c.store_url, "cache_dir": c.cache_dir, "cache_size": c.cache_size,
               "socket": c.socket_path, "log": c.log_path, "started": self.started}
        tmp = f"{c.state_path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f)
        os.replace(tmp, c.state_path)

    def _remove_state(self) -> None:
        """Remove the state file if it is still ours (a new mount may have replaced it)."""
        try:
            with open(self.config.state_path) as f:
                if json.load(f).get("pid") != os.getpid():
                    return
            os.unlink(self.config.state_path)
        except (OSError, ValueError):
            pass


class StartupClock:
    """Milliseconds each start-up step took, for the log."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.steps: dict[str, float] = {}

    def mark(self, step: str) -> None:
        now = time.monotonic()
        self.steps[step] = round((now - self._last) * 1000, 1)
        self._last = now

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.steps.items())


def set_kernel_readahead(device: str | None, kb: int) -> None:
    """Let the kernel read ahead kb KiB on the mount of this 'major:minor' (its FUSE default is
    128 KiB); root only."""
    if kb <= 0 or device is None:
        return
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError as e:
        log.info("cannot set kernel readahead of device %s: %s", device, e.strerror)


def _ready_writer(fd: int) -> Ready:
    """Write the readiness message once, then close the fd (a later failure is only logged)."""
    sent = False

    def ready(doc: dict[str, Any]) -> None:
        nonlocal sent
        if sent:
            return
        sent = True
        try:
            os.write(fd, json.dumps(doc).encode() + b"\n")
            os.close(fd)
        except OSError:
            pass

    return ready


def serve(config: DaemonConfig, ready: Ready) -> int:
    """Mount and serve until unmounted; report start-up failures through ready()."""
    try:
        daemon = Daemon(config)
        daemon.run(ready)
    except ImageFSError as e:
        log.error("mount of %s at %s failed: %s", config.image_id, config.mountpoint, e)
        ready({"ok": False, "error": str(e), "exit_code": e.exit_code})
        return e.exit_code
    except Exception as e:
        log.exception("mount daemon for %s failed", config.mountpoint)
        ready({"ok": False, "error": f"{type(e).__name__}: {e}", "exit_code": 1})
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imagefs.fs.daemon")
    parser.add_argument("--config", required=True, help="DaemonConfig as JSON")
    parser.add_argument("--ready-fd", type=int, default=-1)
    parser.add_argument("--detach", action="store_true", help="fork; the parent exits at once")
    args = parser.parse_args(argv)
    config = DaemonConfig.from_json(args.config)
    if args.detach and os.fork() != 0:
        os._exit(0)
    return run_daemon(config, args.ready_fd)


# glibc mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8


def keep_freed_memory() -> bool:
    """Make glibc reuse the memory the daemon frees instead of handing it back to the kernel.

    Each chunk fetched is read into a new buffer of about 1 MiB; by default glibc serves those
    from mmap or from per-thread arenas it trims as soon as their top is free, so the next
    buffer is fresh memory the kernel must fault in and zero (on this project's VM also fetch
    from the hypervisor): 150,000 page faults per GiB read cold. With one arena, buffers up to
    32 MiB from the heap and no trimming below 256 MiB free, the freed buffers are reused (75,000
    faults per GiB, about the memory tier's 256 MB). False where mallopt is missing (not glibc)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    settings = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 256 << 20))
    return all([mallopt(param, value) == 1 for param, value in settings])


def run_daemon(config: DaemonConfig, ready_fd: int) -> int:
    """The daemon process from logging set-up on (exec'd by main(), or forked by mounts)."""
    level = logging.DEBUG if config.verbose > 1 else logging.INFO
    logging.basicConfig(level=level, stream=sys.stderr, force=True,
                        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    if os.environ.get("COLDSTART_MALLOC_KEEP", "1") != "0" and not keep_freed_memory():
        log.info("mallopt unavailable: freed memory goes back to the kernel as glibc decides")
    if ready_fd >= 0:
        os.write(ready_fd, json.dumps({"pid": os.getpid()}).encode() + b"\n")
        ready = _ready_writer(ready_fd)
    else:
        ready = lambda doc: None  # noqa: E731
    return serve(config, ready)


if __name__ == "__main__":
    sys.exit(main())

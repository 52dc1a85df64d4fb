"""Record an image's start-up profile: run a container on a private, fresh mount of the image and
keep the chunks it touched, in first-touch order, until it was ready (or exited).

The mount is private (its own state dir) so that its access trace starts empty: a shared mount that
earlier containers used has already seen their first touches. With stop_at_ready the container is
stopped once ready (a server never exits by itself); otherwise it runs to the end.
"""
from __future__ import annotations

import os
import signal
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from imagefs import profile as profiles
from imagefs.fs.mounts import read_trace
from imagefs.images import parse_ref
from imagefs.store.factory import open_store
from runner.imagefs_lower import imagefs_provider, unmount_all
from runner.options import RunOptions
from runner.run import RunResult, run
from runner.stream import ReadyWatcher, Sink, fd_sink


@dataclass
class Recorded:
    result: RunResult
    profile: profiles.Profile
    digest: str


def record(options: RunOptions, *, stop_at_ready: bool, stdout: Sink | None = None,
           stderr: Sink | None = None) -> Recorded:
    state = Path(tempfile.mkdtemp(prefix="record-", dir=_run_root(options)))
    provider = imagefs_provider(state, options.store, options.cache, linger=True, prefetch=False)
    image = provider.resolve(options.image)
    mnt = provider.mountpoint(image.image_id)
    snap: dict[str, object] = {}
    watcher = ReadyWatcher(options.ready_regex)
    done = threading.Event()

    def tap(stream: int, sink: Sink) -> Sink:
        def write(data: bytes) -> None:
            sink(data)
            if watcher.feed(stream, data) and "trace" not in snap:
                snap["trace"] = read_trace(mnt)
                if stop_at_ready:
                    _stop_container(done)
        return write

    try:
        result = run(replace(options, keep=False), provider,
                     stdout=tap(1, stdout or fd_sink(1)), stderr=tap(2, stderr or fd_sink(2)))
        done.set()
        trace = snap.get("trace") or read_trace(mnt)
    finally:
        done.set()
        unmount_all(state)
        _rmdir_tree(state)
    prof = profiles.from_trace(image.image_id, trace, ready_s=result.timings.get("ready"),  # type: ignore[arg-type]
                               command=list(options.command or []))
    ref = None if image.image_id.startswith(options.image) else parse_ref(options.image)
    with open_store(options.store) as store:
        digest = profiles.save(store, prof, ref)
    return Recorded(result, prof, digest)


def _stop_container(done: threading.Event, grace: float = 3.0) -> None:
    """SIGTERM to ourselves, which the runner forwards to the container; a second one after a
    grace period (the runner turns it into SIGKILL: an init without handlers ignores SIGTERM)."""
    os.kill(os.getpid(), signal.SIGTERM)

    def again() -> None:
        if not done.wait(grace):
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=again, name="record-stop", daemon=True).start()


def _run_root(options: RunOptions) -> Path:
    options.state_dir.mkdir(parents=True, exist_ok=True)
    return options.state_dir


def _rmdir_tree(path: Path) -> None:
    for p in sorted(path.rglob("*"), key=lambda x: len(x.parts), reverse=True):
        try:
            p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
        except OSError:
            pass
    try:
        path.rmdir()
    except OSError:
        pass


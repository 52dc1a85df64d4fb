"""Runs the builder's command steps: a runc container on a lazy mount of the parent image, whose
overlay upper directory is kept and handed back as the step's diff."""
from __future__ import annotations

import os
import shutil
from collections import deque
from pathlib import Path
from typing import Callable

from imagefs.builder.build import StepRun
from imagefs.builder.diff import is_opaque
from runner.imagefs_lower import imagefs_provider
from runner.options import DEFAULT_STATE_DIR, MountSpec, RunOptions
from runner.run import run

# Files the runtime writes into every container's writable layer; like Docker, never part of an image.
RUNTIME_FILES = ("etc/hostname", "etc/hosts", "etc/resolv.conf")
BUILD_LAYERS = Path("/var/lib/coldstart/build-layers")
# The step's PID 1: a shell with signal traps (an init without handlers ignores SIGINT/SIGTERM), so a
# Ctrl-C or kill of the build, which the runner forwards, ends the step at once.
STEP_INIT = 'trap "exit 130" INT; trap "exit 143" TERM HUP; /bin/sh -c "$1" & wait $!'



class RunnerExecutor:
    def __init__(self, store_url: str | None, cache_dir: str | None, *,
                 state_dir: Path = DEFAULT_STATE_DIR, layers_root: Path = BUILD_LAYERS) -> None:
        self.store_url, self.cache_dir, self.state_dir = store_url, cache_dir, state_dir
        _remove_dead_owners(layers_root)
        self.layers_dir = layers_root / str(os.getpid())
        self.provider = imagefs_provider(state_dir, store_url, cache_dir, linger=False)

    def run_step(self, image_id: str, script: str, env: dict[str, str], mounts: list[tuple[str, str]],
                 log: Callable[[bytes], None]) -> StepRun:
        tail: deque[str] = deque(maxlen=40)

        def sink(data: bytes) -> None:
            log(data)
            tail.extend(data.decode(errors="replace").splitlines())

        options = RunOptions(
            image=image_id, command=["/bin/sh", "-c", STEP_INIT, "coldstart-step", script], entrypoint="",
            env=[f"{k}={v}" for k, v in env.items()], user="0:0",
            mounts=[MountSpec(Path(h), c, readonly=True) for h, c in mounts], network="host",
            keep=True, store=self.store_url, cache=self.cache_dir, state_dir=self.state_dir,
            layers_dir=self.layers_dir)
        result = run(options, self.provider, stdout=sink, stderr=sink)
        upper = result.upper_dir
        if upper is not None:
            _drop_runtime_files(upper)
        return StepRun(result.exit_code, upper, list(tail))

    def discard(self, upper: Path) -> None:
        shutil.rmtree(upper.parent, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.layers_dir, ignore_errors=True)


def _drop_runtime_files(upper: Path) -> None:
    for rel in RUNTIME_FILES:
        p = upper / rel
        if p.is_file() and not p.is_symlink():
            p.unlink()
    etc = upper / "etc"  # copied up only to hold those files: not a change of the step's
    if etc.is_dir() and not any(etc.iterdir()) and not is_opaque(etc):
        etc.rmdir()


def _remove_dead_owners(root: Path) -> None:
    """Layers left by builders that were killed: their owner pid is gone."""
    if not root.is_dir():
        return
    for entry in root.iterdir():
        if entry.name.isdigit() and not Path(f"/proc/{entry.name}").exists():
            shutil.rmtree(entry, ignore_errors=True)

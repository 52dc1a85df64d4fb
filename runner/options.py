"""Run options: the dataclass the runner consumes and the argparse wiring for `coldstart run`."""
from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from runner.errors import UsageError
from runner.users import parse_id

DEFAULT_STATE_DIR = Path(os.environ.get("COLDSTART_RUN_DIR") or "/run/coldstart")
DEFAULT_LAYERS_DIR = Path("/var/lib/coldstart/layers")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)([bkmgt]?)b?", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_HOSTNAME = re.compile(r"[A-Za-z0-9.-]{1,64}")  # RFC 1123 characters; the kernel takes 64 bytes
# Below this the CFS quota (cpus x 100 ms period) would be under the kernel's minimum of 1 ms.
MIN_CPUS = 0.01


@dataclass(frozen=True)
class MountSpec:
    """A bind mount from the host: --mount HOST:CTR[:ro]."""

    host: Path
    container: str
    readonly: bool = False

    @classmethod
    def parse(cls, text: str) -> MountSpec:
        parts = text.split(":")
        readonly = len(parts) == 3 and parts[2] == "ro"
        if len(parts) == 3 and parts[2] not in ("ro", "rw") or len(parts) not in (2, 3):
            raise UsageError(f"--mount expects HOST:CONTAINER[:ro], got {text!r}")
        host, container = parts[0], parts[1]
        if not host.startswith("/") or not container.startswith("/"):
            raise UsageError(f"--mount paths must be absolute: {text!r}")
        return cls(Path(host), container, readonly)


@dataclass(frozen=True)
class RunOptions:
    """Everything `coldstart run` accepts. `command` replaces the image's Cmd when given."""

    image: str
    command: list[str] | None = None
    env: list[str] = field(default_factory=list)
    workdir: str | None = None
    user: str | None = None
    entrypoint: str | None = None
    mounts: list[MountSpec] = field(default_factory=list)
    network: str = "none"
    memory: int | None = None
    cpus: float | None = None
    pids_limit: int | None = None
    gpus: str | None = None
    keep: bool = False
    ready_regex: str | None = None
    timings: bool = False
    timings_json: Path | None = None
    interactive: bool = False
    hostname: str | None = None
    runtime: str = "auto"
    store: str | None = None
    cache: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    layers_dir: Path = DEFAULT_LAYERS_DIR

    def __post_init__(self) -> None:
        if self.network not in ("none", "host"):
            raise UsageError(f"--network must be 'host' or 'none', not {self.network!r}")
        if self.workdir is not None and not self.workdir.startswith("/"):
            raise UsageError(f"--workdir must be absolute: {self.workdir!r}")
        if self.cpus is not None:
            _check_cpus(self.cpus)
        if self.user is not None:
            _check_user(self.user)
        if self.hostname is not None and _HOSTNAME.fullmatch(self.hostname) is None:
            raise UsageError(f"--hostname must be 1 to 64 of A-Z a-z 0-9 . -, got {self.hostname!r}")
        if self.pids_limit is not None and self.pids_limit == 0:
            raise UsageError("--pids-limit must be positive (or -1 for unlimited)")
        if self.ready_regex is not None:
            try:
                re.compile(self.ready_regex)
            except re.error as exc:
                raise UsageError(f"--ready-regex: {exc}") from None
        for item in self.env:
            if not item or item.startswith("="):
                raise UsageError(f"--env expects K=V or K, got {item!r}")


def _check_cpus(cpus: float) -> None:
    if not math.isfinite(cpus) or cpus < MIN_CPUS:
        raise UsageError(f"--cpus must be a number of CPUs, at least {MIN_CPUS}, got {cpus}")


def _check_user(spec: str) -> None:
    """A numeric user or group must be ASCII digits in the id range (str.isdigit() also takes '²')."""
    for part in spec.split(":", 1):
        if part.isdigit() and parse_id(part) is None:
            raise UsageError(f"--user: {part!r} is not a valid id (ASCII digits, 0 to 4294967294)")


def parse_size(text: str) -> int:
    """'512m', '1g', '1048576' -> bytes."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise UsageError(f"not a size: {text!r} (examples: 512m, 2g)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `coldstart run`'s options and positionals to parser (image, then the command)."""
    add = parser.add_argument
    add("-e", "--env", action="append", default=[], metavar="K=V", help="set a variable (K alone copies the host's)")
    add("-w", "--workdir", help="working directory inside the container")
    add("-u", "--user", help="user[:group], by name (from the image) or number")
    add("--entrypoint", help="replace the image's Entrypoint ('' clears it)")
    add("--mount", action="append", default=[], metavar="HOST:CTR[:ro]", help="bind-mount a host path")
    add("--network", choices=("none", "host"), default="none", help="network namespace (default: none)")
    add("-m", "--memory", type=parse_size, help="memory limit (e.g. 512m)")
    add("--cpus", type=float, help="CPU limit, in CPUs")
    add("--pids-limit", type=int, help="limit on the number of processes")
    add("--gpus", metavar="all|0,1|GPU-UUID|nvidia.com/gpu=NAME", help="give NVIDIA GPUs to the container")
    add("--keep", action="store_true", help="keep the writable layer after exit")
    add("--ready-regex", metavar="REGEX", help="the run is ready at the first output line matching REGEX (tried on each line's first 4 KiB)")
    add("--timings", action="store_true", help="print phase timings to stderr")
    add("--timings-json", type=Path, metavar="FILE", help="write phase timings as JSON")
    add("-i", "--interactive", action="store_true", help="pass stdin through")
    add("--hostname", help="container host name")
    add("--runtime", default="auto", help="auto, runc, crun, or a runtime binary's path")
    add("--store", help="image store URL")
    add("--cache", help="local chunk cache directory")
    add("--state-dir", type=Path, default=DEFAULT_STATE_DIR, help=argparse.SUPPRESS)
    add("--layers-dir", type=Path, default=DEFAULT_LAYERS_DIR, help=argparse.SUPPRESS)
    add("image", metavar="NAME:TAG", help="image to run")
    add("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="replaces the image's Cmd")


def options_from_args(args: argparse.Namespace) -> RunOptions:
    """Turn parsed add_run_arguments() arguments into RunOptions (raises UsageError)."""
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    return RunOptions(
        image=args.image, command=command or None, env=list(args.env), workdir=args.workdir,
        user=args.user, entrypoint=args.entrypoint, mounts=[MountSpec.parse(m) for m in args.mount],
        network=args.network, memory=args.memory, cpus=args.cpus, pids_limit=args.pids_limit,
        gpus=args.gpus, keep=args.keep, ready_regex=args.ready_regex, timings=args.timings,
        timings_json=args.timings_json, interactive=args.interactive, hostname=args.hostname,
        runtime=args.runtime, store=args.store, cache=args.cache, state_dir=args.state_dir,
        layers_dir=args.layers_dir,
    )

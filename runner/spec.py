"""Pure generation of the OCI runtime spec (config.json) from resolved inputs."""
from __future__ import annotations

import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from runner.edits import SpecEdits
from runner.errors import UsageError
from runner.options import MountSpec
from runner.users import ResolvedUser

OCI_VERSION = "1.0.2"
_CPU_PERIOD_US = 100_000
_MIN_CPU_QUOTA_US = 1_000
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Docker's default capability set.
DEFAULT_CAPS = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)
MASKED_PATHS = (
    "/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
    "/sys/firmware", "/sys/devices/virtual/powercap",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

# Device cgroup: deny everything, then allow creating nodes and the standard devices (as Docker does).
_DEFAULT_DEVICE_RULES: tuple[dict[str, object], ...] = (
    {"allow": False, "access": "rwm"},
    {"allow": True, "type": "c", "access": "m"},
    {"allow": True, "type": "b", "access": "m"},
    *({"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"}
      for major, minor in ((1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 1), (5, 2), (10, 200))),
    {"allow": True, "type": "c", "major": 136, "access": "rwm"},
)


@dataclass
class SpecInputs:
    """Everything build_spec needs, already resolved against the image and the host."""

    args: list[str]
    env: list[str]
    cwd: str
    user: ResolvedUser
    hostname: str
    network: str = "none"
    mounts: Sequence[MountSpec] = ()
    memory: int | None = None
    cpus: float | None = None
    pids_limit: int | None = None
    edits: SpecEdits = field(default_factory=SpecEdits)
    nofile: int = 1024
    rootfs: str = "rootfs"


def compose_args(entrypoint: list[str] | None, cmd: list[str] | None,
                 entrypoint_override: str | None, command: list[str] | None) -> list[str]:
    """Docker's rules: args = Entrypoint + Cmd; a command given replaces Cmd; --entrypoint resets Cmd."""
    if entrypoint_override is not None:
        entry = _split_entrypoint(entrypoint_override)
        rest = command or []
    else:
        entry = list(entrypoint or [])
        rest = command if command else list(cmd or [])
    args = entry + rest
    if not args:
        raise UsageError("no command: the image has no Entrypoint or Cmd and none was given")
    return args


def _split_entrypoint(text: str) -> list[str]:
    """--entrypoint is split like a shell would (without expansions)."""
    try:
        return shlex.split(text)
    except ValueError as exc:
        raise UsageError(f"--entrypoint {text!r}: {exc}") from None


def merge_env(image_env: Sequence[str], overrides: Sequence[Mapping[str, str]],
              cli_env: Sequence[str], host_env: Mapping[str, str], defaults: Mapping[str, str]) -> list[str]:
    """Image env, then each override map in order, then --env (K=V, or K to copy the host's value).

    `defaults` (PATH, HOME, HOSTNAME) apply only where nothing else set the variable.
    """
    env: dict[str, str] = {}
    for item in image_env:
        key, _, value = item.partition("=")
        env[key] = value
    for mapping in overrides:
        env.update(mapping)
    for item in cli_env:
        key, sep, value = item.partition("=")
        if sep:
            env[key] = value
        elif key in host_env:
            env[key] = host_env[key]
    for key, value in defaults.items():
        env.setdefault(key, value)
    return [f"{k}={v}" for k, v in env.items()]


def build_spec(inputs: SpecInputs) -> dict[str, object]:
    """The config.json document for inputs."""
    return {
        "ociVersion": OCI_VERSION,
        "process": _process(inputs),
        "root": {"path": inputs.rootfs, "readonly": False},
        "hostname": inputs.hostname,
        "mounts": _mounts(inputs),
        "linux": _linux(inputs),
        **({"hooks": inputs.edits.hooks} if inputs.edits.hooks else {}),
    }


def _process(inputs: SpecInputs) -> dict[str, object]:
    user = inputs.user
    caps = list(DEFAULT_CAPS)
    live = caps if user.uid == 0 else []
    return {
        "terminal": False,
        "user": {"uid": user.uid, "gid": user.gid,
                 **({"additionalGids": list(user.additional_gids)} if user.additional_gids else {})},
        "args": list(inputs.args),
        "env": list(inputs.env),
        "cwd": inputs.cwd,
        "capabilities": {"bounding": caps, "effective": live, "permitted": live},
        "rlimits": [{"type": "RLIMIT_NOFILE", "hard": inputs.nofile, "soft": inputs.nofile}],
        "noNewPrivileges": True,
    }


def _mount(dest: str, typ: str, source: str, options: Sequence[str]) -> dict[str, object]:
    return {"destination": dest, "type": typ, "source": source, "options": list(options)}


def _mounts(inputs: SpecInputs) -> list[dict[str, object]]:
    mounts = [
        _mount("/proc", "proc", "proc", ("nosuid", "noexec", "nodev")),
        _mount("/dev", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
        _mount("/dev/pts", "devpts", "devpts",
               ("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5")),
        _mount("/dev/shm", "tmpfs", "shm", ("nosuid", "noexec", "nodev", "mode=1777", "size=65536k")),
        _mount("/dev/mqueue", "mqueue", "mqueue", ("nosuid", "noexec", "nodev")),
        _mount("/sys", "sysfs", "sysfs", ("nosuid", "noexec", "nodev", "ro")),
        _mount("/sys/fs/cgroup", "cgroup", "cgroup", ("nosuid", "noexec", "nodev", "relatime", "ro")),
    ]
    for m in inputs.mounts:
        mounts.append(_mount(m.container, "bind", str(m.host), ("rbind", "rprivate") + (("ro",) if m.readonly else ())))
    for b in inputs.edits.mounts:
        mounts.append(_mount(b.container_path, "bind", b.host_path, b.options))
    return mounts


def _linux(inputs: SpecInputs) -> dict[str, object]:
    namespaces = ["pid", "mount", "ipc", "uts"] + (["network"] if inputs.network == "none" else [])
    devices = [{"path": d.path, "type": d.type, "major": d.major, "minor": d.minor,
                "fileMode": d.file_mode, "uid": d.uid, "gid": d.gid} for d in inputs.edits.devices]
    return {
        "namespaces": [{"type": t} for t in namespaces],
        "devices": devices,
        "resources": _resources(inputs),
        "maskedPaths": list(MASKED_PATHS),
        "readonlyPaths": list(READONLY_PATHS),
    }


def _resources(inputs: SpecInputs) -> dict[str, object]:
    rules = [dict(r) for r in _DEFAULT_DEVICE_RULES]
    rules += [{"allow": True, "type": d.type, "major": d.major, "minor": d.minor, "access": d.permissions}
              for d in inputs.edits.devices]
    resources: dict[str, object] = {"devices": rules}
    if inputs.memory is not None:
        resources["memory"] = {"limit": inputs.memory}
    if inputs.cpus is not None:
        resources["cpu"] = {"quota": _cpu_quota(inputs.cpus, _CPU_PERIOD_US), "period": _CPU_PERIOD_US}
    if inputs.pids_limit is not None:
        resources["pids"] = {"limit": inputs.pids_limit}
    return resources


def _cpu_quota(cpus: float, period_us: int) -> int:
    """CFS quota in µs for cpus CPUs: at least the kernel's 1 ms minimum, never 0 (no limit)."""
    if not math.isfinite(cpus) or cpus <= 0:
        raise UsageError(f"--cpus must be a positive number, got {cpus}")
    return max(_MIN_CPU_QUOTA_US, round(cpus * period_us))

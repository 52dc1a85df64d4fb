"""Process identity that survives PID reuse, and the child-subreaper switch."""
from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

_PR_SET_CHILD_SUBREAPER = 36
_subreaper_set = False


def _stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/PID/stat from the third (the state) on; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ')'.
    return stat[stat.rindex(b")") + 2:].split()


def process_start_time(pid: int) -> int | None:
    """The start time (clock ticks since boot) of a live process, or None if there is none."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def process_cpu_seconds(pid: int) -> float | None:
    """CPU seconds (user + system, all its threads) a process has used; None if there is none."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class ProcessRef:
    """A process named by PID and start time, so a recycled PID is not mistaken for it."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        start = process_start_time(pid)
        if start is None:
            raise ProcessLookupError(pid)
        return cls(pid, start)

    @classmethod
    def current(cls) -> ProcessRef:
        return cls.of(os.getpid())

    def alive(self) -> bool:
        return process_start_time(self.pid) == self.start_time

    def to_json(self) -> list[int]:
        return [self.pid, self.start_time]

    @classmethod
    def from_json(cls, value: object) -> ProcessRef:
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value)):
            raise ValueError(f"not a process reference: {value!r}")
        return cls(value[0], value[1])


def any_alive(refs: list[ProcessRef]) -> bool:
    return any(ref.alive() for ref in refs)


def become_subreaper() -> None:
    """Make orphaned descendants (the container's init once `runc create` exits) our children."""
    global _subreaper_set
    if _subreaper_set:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")
    _subreaper_set = True

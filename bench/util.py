"""Small pieces every benchmark shares: page-cache dropping, medians, timing, JSON + table output."""
from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable


def drop_page_cache() -> None:
    """Flush dirty pages and drop the page, dentry and inode caches (root only)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Trash:
    """Directories a benchmark is done with (host caches, pulled root filesystems), deleted when
    it ends instead of between runs. On an ext4 without a journal (this VM's root filesystem),
    creating a file skips each inode freed in the last 60 s, reading its inode-table block to
    check (fs/ext4/ialloc.c, recently_deleted): a run that creates files right after a cache was
    deleted paid for that deletion (measured, a cold 1 GiB read from S3, three pairs: 156-250 MB/s
    after deleting the last run's cache against 189-260 MB/s into a new directory; perf showed 10 %
    of the mount daemon's CPU time in that scan)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.empty()  # leftovers of an interrupted run

    def discard(self, path: Path) -> None:
        """Move path (if it exists) out of the way, for empty() to delete."""
        if path.exists():
            self.root.mkdir(parents=True, exist_ok=True)
            path.rename(self.root / f"{time.monotonic_ns()}-{path.name}")

    def empty(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def cpu_ticks() -> dict[str, float]:
    """Seconds all CPUs together spent busy, idle and stolen by the hypervisor since boot (from
    /proc/stat): the difference over a run shows how much of it this VM did not get."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    hz = os.sysconf("SC_CLK_TCK")
    return {"busy": (user + nice + system + irq + softirq) / hz, "idle": (idle + iowait) / hz,
            "steal": steal / hz}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.monotonic()
    out = fn()
    return time.monotonic() - t, out


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def p90(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]


def machine() -> dict[str, Any]:
    """What the numbers were taken on."""
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(mem / 2 ** 30, 1),
            "kernel": platform.release(), "python": sys.version.split()[0],
            "runc": _first_line(["runc", "--version"])}


def _first_line(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "unknown"


def write_json(path: Path, doc: Any) -> None:
    """doc as strict JSON: a NaN (a phase a run did not reach, a median of no runs) is null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_nulls(doc), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")


def _nulls(doc: Any) -> Any:
    if isinstance(doc, float) and (doc != doc or doc in (float("inf"), float("-inf"))):
        return None
    if isinstance(doc, dict):
        return {k: _nulls(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [_nulls(v) for v in doc]
    return doc

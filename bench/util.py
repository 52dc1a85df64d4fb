"""Small pieces every benchmark shares: page-cache dropping, medians, timing, JSON + table output."""
from __future__ import annotations

import json
import os
import platform
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
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n")

"""Aggregate runs into medians, p90s and ratios to native; write JSON, markdown, a terminal table
and PNG plots. Every figure comes from the records of the run that makes the report."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.util import median, p90

PHASES = ["pull", "image_resolved", "mount_ready", "rootfs_ready", "spec_ready", "runc_create", "runc_start", "ready"]


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    keys = sorted({(r["workload"], r["mode"]) for r in records}, key=lambda k: k)
    for wl, mode in keys:
        runs = [r for r in records if r["workload"] == wl and r["mode"] == mode and r["rep"] >= 0]
        ok = [r for r in runs if r["ok"]]
        ready = [r["ready_s"] for r in ok]
        rows.append({"workload": wl, "mode": mode, "runs": len(runs), "failed": len(runs) - len(ok),
                     "median_s": median(ready), "p90_s": p90(ready),
                     "phases": {p: median([r["phases"][p] for r in ok if p in r["phases"]]) for p in PHASES},
                     "bytes_fetched": median([r["bytes_fetched"] for r in ok]),
                     "fetches": median([r["fetches"] for r in ok]),
                     "bytes_read": median([r["bytes_read"] for r in ok]),
                     "prefetched": median([r.get("prefetched", 0) for r in ok])})
    for row in rows:
        base = next((x["median_s"] for x in rows if x["workload"] == row["workload"] and x["mode"] == "native"),
                    float("nan"))
        row["vs_native"] = row["median_s"] / base if base and not math.isnan(base) else float("nan")
    return rows


def _f(x: float, unit: str = "s") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.2f} {unit}" if unit == "s" else f"{x:.2f}x"


def _mb(x: float) -> str:
    return "-" if not x or math.isnan(x) else f"{x / 1e6:.1f}"


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    out = ["| workload | mode | time to ready (median) | p90 | vs native | MB fetched | fetches | MB read | runs |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fetches = "-" if math.isnan(r["fetches"]) or not r["fetches"] else f"{r['fetches']:.0f}"
        out.append(f"| {r['workload']} | {r['mode']} | {_f(r['median_s'])} | {_f(r['p90_s'])} | "
                   f"{_f(r['vs_native'], 'x')} | {_mb(r['bytes_fetched'])} | {fetches} | {_mb(r['bytes_read'])} | "
                   f"{r['runs'] - r['failed']}/{r['runs']} |")
    m = meta["machine"]
    out.append(f"\nTaken {meta['started']} on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, "
               f"Linux {m['kernel']}, {m['runc']}; network profile `{meta['network']}`, store {meta['store_kind']}, "
               f"{meta['repeat']} repeats, modes interleaved, page cache dropped before every run. "
               f"Command: `{meta['command']}`.")
    return "\n".join(out) + "\n"


def terminal(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="cold start: time to ready")
    for col in ("workload", "mode", "median", "p90", "vs native", "MB fetched", "fetches", "runs"):
        t.add_column(col, justify="left" if col in ("workload", "mode") else "right", no_wrap=True)
    for r in rows:
        t.add_row(r["workload"], r["mode"], _f(r["median_s"]), _f(r["p90_s"]), _f(r["vs_native"], "x"),
                  _mb(r["bytes_fetched"]), f"{r['fetches']:.0f}" if _present(r["fetches"]) and r["fetches"] else "-",
                  f"{r['runs'] - r['failed']}/{r['runs']}")
    Console().print(t)


def _present(value: Any) -> bool:
    return isinstance(value, (int, float)) and not math.isnan(value)


def _phase_span(phases: dict[str, Any], phase: str) -> float:
    """How long a run spent in phase: from the last earlier phase it reached (0 if none) to this
    one; 0 for a phase it did not reach (or a mode does not have: NaN or missing)."""
    end = phases.get(phase)
    if not _present(end):
        return 0.0
    earlier = [phases.get(p) for p in PHASES[:PHASES.index(phase)]]
    start = next((v for v in reversed(earlier) if _present(v)), 0.0)
    return max(0.0, end - start)


def plots(rows: list[dict[str, Any]], sizes: dict[str, int], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [out / "phases.png", out / "ready_vs_size.png"]
    workloads = sorted({r["workload"] for r in rows})
    fig, axes = plt.subplots(1, len(workloads), figsize=(4.5 * len(workloads), 4), squeeze=False)
    for ax, wl in zip(axes[0], workloads):
        sub = [r for r in rows if r["workload"] == wl]
        bottoms = [0.0] * len(sub)
        for phase in PHASES:
            heights = [_phase_span(r["phases"], phase) for r in sub]
            ax.bar([r["mode"] for r in sub], heights, bottom=bottoms, label=phase)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
        ax.set_title(wl)
        ax.set_ylabel("seconds")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in sorted({r["mode"] for r in rows}):
        pts = [(sizes.get(r["workload"], 0) / 1e6, r["median_s"]) for r in rows if r["mode"] == mode]
        ax.plot(*zip(*sorted(pts)), marker="o", label=mode)
    ax.set_xlabel("image size (MB of file content)")
    ax.set_ylabel("time to ready (s, median)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths

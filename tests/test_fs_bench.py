"""fs_bench's report: medians of times and of the CPU each party used, ratios against native."""
from __future__ import annotations

import os
from pathlib import Path

from bench.fs_bench import op_counts, summarise, table
from bench.util import Trash
from runner.procs import process_cpu_seconds


def _rec(tree: str, mode: str, value: float, cpu: dict[str, float] | None = None) -> dict[str, object]:
    return {"tree": tree, "mode": mode, "value": value, "ops": {}, "steal_s": 0.0, "cpu": cpu or {}}


def test_summary_has_cpu_medians_and_ratios() -> None:
    records = [
        _rec("native", "native_cold", 2.0, {"workload_s": 1.8, "store_s": 0.0}),
        _rec("native", "native_cold", 2.2, {"workload_s": 2.0, "store_s": 0.0}),
        _rec("native", "native_cold", 1.8, {"workload_s": 1.6, "store_s": 0.0}),
        _rec("this", "lazy_cold", 3.0, {"workload_s": 1.9, "daemon_s": 1.5, "daemon_loop_s": 0.6, "store_s": 0.7}),
        _rec("this", "lazy_cold", 3.4, {"workload_s": 2.1, "daemon_s": 1.9, "daemon_loop_s": 0.8, "store_s": 0.9}),
        _rec("this", "lazy_cold", 2.6, {"workload_s": 1.7, "daemon_s": 1.1, "daemon_loop_s": 0.4, "store_s": 0.5}),
        # a tree whose daemon did not report its CPU yet: no daemon columns, no crash
        _rec("base", "lazy_cold", 4.0, {"workload_s": 2.0, "store_s": 0.8}),
    ]
    s = summarise(records, ["this", "base"])
    cold = s["modes"]["this"]["lazy_cold"]
    assert cold["median"] == 3.0 and cold["min"] == 2.6 and cold["max"] == 3.4
    assert cold["cpu"] == {"workload_s": 1.9, "daemon_s": 1.5, "daemon_loop_s": 0.6, "store_s": 0.7}
    assert s["modes"]["base"]["lazy_cold"]["cpu"] == {"workload_s": 2.0, "store_s": 0.8}
    assert s["ratios"]["this"]["lazy_cold"]["ratio"] == 1.5
    text = table(s)
    assert "lazy_cold / native_cold: 1.50x (target <= 1.3x) MISS" in text
    line = next(x for x in text.splitlines() if x.startswith("this") and "daemon_loop" in x)
    assert line.split()[1:] == ["lazy_cold", "workload", "1.90", "daemon", "1.50", "daemon_loop", "0.60",
                                "store", "0.70"]


def test_process_cpu_of_self_and_of_a_gone_process() -> None:
    busy = sum(i * i for i in range(300_000))  # some CPU of our own
    assert busy > 0
    used = process_cpu_seconds(os.getpid())
    assert used is not None and used > 0
    assert process_cpu_seconds(2 ** 22 + 12345) is None  # above pid_max's default: no such process


def test_trash_moves_now_and_deletes_at_the_end(tmp_path: Path) -> None:
    """Benchmarks move used caches aside between runs and delete them only when they end."""
    (tmp_path / "trash" / "old").mkdir(parents=True)  # left by an interrupted run: gone at once
    trash = Trash(tmp_path / "trash")
    assert not (tmp_path / "trash").exists()
    for _ in range(2):  # the same path used and discarded twice
        cache = tmp_path / "cache"
        (cache / "chunks").mkdir(parents=True)
        (cache / "chunks" / "c").write_bytes(b"x")
        trash.discard(cache)
        assert not cache.exists()
    trash.discard(tmp_path / "never-made")
    kept = sorted(p.name for p in (tmp_path / "trash").iterdir())
    assert len(kept) == 2 and all(name.endswith("-cache") for name in kept)
    assert all((tmp_path / "trash" / name / "chunks" / "c").read_bytes() == b"x" for name in kept)
    trash.empty()
    assert not (tmp_path / "trash").exists()


def _stats(reads: int, read_us: float, loads: int | None, load_ms: float) -> dict:
    doc: dict = {"fuse": {"ops": {"read": {"count": reads, "mean_us": read_us, "p99_us": 9.0}}}, "fetch": {}}
    if loads is not None:
        doc["fetch"]["times"] = {"demand": {"load": {"count": loads, "total_ms": load_ms, "p99_us": 8000.0}},
                                 "prefetch": {"load": {"count": 0, "total_ms": 0.0, "p99_us": 0}}}
    return doc


def test_op_counts_include_the_chunk_loads_minus_those_before() -> None:
    first, later = _stats(10, 20.0, 4, 24.0), _stats(30, 10.0, 6, 30.0)
    assert op_counts(first) == {"read": {"count": 10, "mean_us": 20.0, "p99_us": 9.0},
                                "load:demand": {"count": 4, "mean_us": 6000.0, "p99_us": 8000.0}}
    since = op_counts(later, first)
    assert since["read"] == {"count": 20, "mean_us": 5.0}  # no p99: it would be of all 30 reads
    assert since["load:demand"] == {"count": 2, "mean_us": 3000.0}
    assert "load:prefetch" not in since
    assert op_counts(_stats(1, 1.0, None, 0)) == {"read": {"count": 1, "mean_us": 1.0, "p99_us": 9.0}}

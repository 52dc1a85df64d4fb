"""Performance targets: runner overhead against plain `runc run`, and 16 concurrent starts against one."""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from runner import DirectoryProvider, ImageConfig, run
from runner.spec import SpecInputs, build_spec
from runner.users import ResolvedUser
from tests.fixtures.runner import RunnerEnv, busybox_root, needs_runc, runner_env  # noqa: F401

pytestmark = [needs_runc, pytest.mark.root, pytest.mark.slow]
ROUNDS = 7
OVERHEAD_LIMIT_S = 0.150


def _plain_bundle(root: Path, base: Path) -> Path:
    bundle = base / "plain-bundle"
    shutil.copytree(root, bundle / "rootfs", symlinks=True)
    spec = build_spec(SpecInputs(args=["true"], env=["PATH=/bin"], cwd="/", user=ResolvedUser(0, 0), hostname="p"))
    (bundle / "config.json").write_text(json.dumps(spec))
    return bundle


def _runc_run(bundle: Path, i: int) -> float:
    start = time.monotonic()
    subprocess.run(["runc", "run", "--bundle", str(bundle), f"coldstart-perf-{os.getpid()}-{i}"],
                   stdin=subprocess.DEVNULL, check=True)
    return time.monotonic() - start


def _runner_run(env: RunnerEnv) -> float:
    start = time.monotonic()
    result = run(env.options("true"), DirectoryProvider(env.root, ImageConfig()),
                 stdout=lambda b: None, stderr=lambda b: None)
    assert result.exit_code == 0
    return time.monotonic() - start


def test_runner_overhead_against_plain_runc(runner_env: RunnerEnv, record_property: object) -> None:
    bundle = _plain_bundle(runner_env.root, runner_env.base)
    _runc_run(bundle, -1)
    _runner_run(runner_env)
    plain, ours = [], []
    for i in range(ROUNDS):  # interleaved, so both see the same host load
        plain.append(_runc_run(bundle, i))
        ours.append(_runner_run(runner_env))
    overhead = statistics.median(ours) - statistics.median(plain)
    record_property("runner_overhead_ms", round(overhead * 1000, 1))  # type: ignore[operator]
    shutil.rmtree(bundle)
    assert overhead <= OVERHEAD_LIMIT_S, f"runner {statistics.median(ours):.3f}s vs runc run {statistics.median(plain):.3f}s"


def _p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[round(0.9 * (len(ordered) - 1))]


def _starts(env: RunnerEnv, tmp: Path, tag: str, count: int) -> list[dict[str, float]]:
    """The timings of count runs started at once."""
    outs = [tmp / f"{tag}{i}.json" for i in range(count)]
    procs = [subprocess.Popen(env.harness("--timings-json", str(out), "x:1", "--", "true"), stderr=subprocess.DEVNULL)
             for out in outs]
    assert [p.wait(timeout=120) for p in procs] == [0] * count
    return [json.loads(out.read_text()) for out in outs]


def _most_at_once(runs: list[dict[str, float]]) -> int:
    """The most runs that were between writing their spec and runc start returning at one moment."""
    events = sorted(e for r in runs for e in ((r["started_at"] + r["spec_ready"], 1),
                                               (r["started_at"] + r["runc_start"], -1)))
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_sixteen_concurrent_starts_overlap_and_on_8_cpus_p90_within_twice_one(runner_env: RunnerEnv, tmp_path: Path) -> None:
    single = statistics.median(_starts(runner_env, tmp_path, f"s{i}-", 1)[0]["runc_start"] for i in range(5))
    runs = _starts(runner_env, tmp_path, "c", 16)
    p90 = _p90([r["runc_start"] for r in runs])
    at_once = _most_at_once(runs)
    measured = f"p90 of 16 concurrent {p90 * 1000:.0f} ms, single {single * 1000:.0f} ms, {at_once} at once"
    # Nothing of ours serialises the starts: their runc create + start overlap (a lock around
    # them would leave one at a time; 10 were seen at once on 2 CPUs), whatever the CPUs.
    assert at_once >= 4, measured
    cpus = os.cpu_count() or 1
    if cpus >= 8:  # runc alone burns ~40 ms of CPU per start: 16 at once cannot finish in 2x on few cores
        assert p90 <= 2 * single, measured

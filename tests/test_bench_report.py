"""The suite's report and its command line: phase bars add up to the time to ready, the JSON is
strict (NaN is null), and bad arguments are usage errors before anything runs."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import PHASES, _phase_span
from bench.suite import Plan, plan_from, run_suite
from bench.util import write_json

NAN = float("nan")


def test_phase_bars_add_up_to_ready_whatever_phases_a_mode_has() -> None:
    native = {"pull": NAN, "image_resolved": 0.05, "mount_ready": 0.05, "rootfs_ready": 0.1, "spec_ready": 0.12,
              "runc_create": 0.2, "runc_start": 0.25, "ready": 0.4}
    containerd = {p: NAN for p in PHASES} | {"pull": 0.5, "ready": 2.0}
    for phases in (native, containerd):
        assert math.isclose(sum(_phase_span(phases, p) for p in PHASES), phases["ready"])
    assert _phase_span(containerd, "ready") == 1.5 and _phase_span(native, "pull") == 0.0


def test_report_json_is_strict(tmp_path: Path) -> None:
    write_json(tmp_path / "r.json", {"median_s": NAN, "rows": [{"pull": NAN, "ready": 1.5}], "inf": math.inf})
    text = (tmp_path / "r.json").read_text()

    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")
    assert json.loads(text, parse_constant=refuse) == {"median_s": None, "rows": [{"pull": None, "ready": 1.5}],
                                                       "inf": None}


def test_repeat_is_the_suites_unless_given() -> None:
    assert plan_from("quick", None, None, None, "loopback", Path("x"), None).repeat == 3
    assert plan_from("quick", None, None, 1, "loopback", Path("x"), None).repeat == 1


def test_a_plan_with_nothing_to_run_stops_before_any_setup(tmp_path: Path) -> None:
    plan = Plan([], ["native"], 1, "loopback", tmp_path, None)
    with pytest.raises(SystemExit, match="nothing to run"):
        run_suite(plan)
    assert not any(tmp_path.iterdir())


def cs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, **(env or {})))


@pytest.mark.parametrize("args, message", [
    (["bench", "--repeat", "0"], "must be more than 0"),
    (["bench", "--repeat", "x"], "not a whole number"),
    (["mount", "a:1", "/nonexistent", "--cache-size", "abc"], "not a size"),
])
def test_bad_arguments_are_usage_errors(args: list[str], message: str) -> None:
    r = cs(*args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_build_with_a_missing_ca_bundle_is_one_line(tmp_path: Path) -> None:
    spec = tmp_path / "spec.py"
    spec.write_text("from imagefs import Image\napp = Image.debian_slim()\n")
    r = cs("build", f"{spec}::app", "--ca-bundle", str(tmp_path / "missing.pem"),
           env={"COLDSTART_STORE": f"file://{tmp_path}/store"})
    assert r.returncode == 2 and "--ca-bundle" in r.stderr and "Traceback" not in r.stderr


def test_profile_show_json_without_a_profile_is_json(tmp_path: Path, rich_tree: Path) -> None:
    env = {"COLDSTART_STORE": f"file://{tmp_path}/store"}
    assert cs("import", str(rich_tree), "app:1", env=env).returncode == 0
    r = cs("profile", "show", "app:1", "--json", env=env)
    assert r.returncode == 1 and json.loads(r.stdout) == {"ref": "app:1", "profile": None}

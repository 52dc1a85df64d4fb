"""Runtime choice: runc, crun where it works, and the fallback (said out loud) where it does not."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import runner.runtime as rt
from runner.errors import RuntimeUnavailable
from runner.runtime import cgroup_hybrid, select_runtime
from tests.fixtures.runner import RunnerEnv, busybox_root, needs_runc, runner_env  # noqa: F401

FAIL_CRUN = "#!/bin/sh\ncase \"$*\" in *create*) echo 'fake crun: cannot set up cgroups' >&2; exit 1;; esac\nexit 0\n"


@pytest.fixture
def fake_crun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    crun = bindir / "crun"
    crun.write_text(FAIL_CRUN)
    crun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    return crun


def test_hybrid_detection(tmp_path: Path) -> None:
    assert not cgroup_hybrid(tmp_path)
    (tmp_path / "unified").mkdir()
    (tmp_path / "unified" / "cgroup.controllers").write_text("\n")
    assert not cgroup_hybrid(tmp_path)
    (tmp_path / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    assert cgroup_hybrid(tmp_path)


def test_explicit_choices(tmp_path: Path) -> None:
    if shutil.which("runc") is None:
        pytest.skip("runc not installed")
    runtime, notices = select_runtime("runc", tmp_path)
    assert runtime.name == "runc" and notices == []
    runtime, _ = select_runtime(shutil.which("runc") or "", tmp_path)
    assert runtime.name == "runc"
    with pytest.raises(RuntimeUnavailable):
        select_runtime(str(tmp_path / "nope"), tmp_path)


def test_auto_skips_crun_on_hybrid_cgroups(fake_crun: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rt, "cgroup_hybrid", lambda: True)
    runtime, notices = select_runtime("auto", tmp_path)
    assert runtime.name == "runc"
    assert notices and "hybrid cgroups" in notices[0] and "using runc" in notices[0]


def test_auto_prefers_crun_where_it_works(fake_crun: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rt, "cgroup_hybrid", lambda: False)
    runtime, notices = select_runtime("auto", tmp_path)
    assert (runtime.name, runtime.path, notices) == ("crun", str(fake_crun), [])


@needs_runc
@pytest.mark.root
def test_failing_crun_falls_back_to_runc_and_is_remembered(runner_env: RunnerEnv, fake_crun: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rt, "cgroup_hybrid", lambda: False)
    cap = runner_env.run("echo", "ran")
    assert cap.code == 0 and cap.out == "ran\n" and cap.result.runtime == "runc"
    assert "falling back to runc" in cap.err and "cannot set up cgroups" in cap.err
    again = runner_env.run("echo", "ran")
    assert again.result.runtime == "runc"
    assert "not using crun: fake crun: cannot set up cgroups" in again.err
    fake_crun.write_text(FAIL_CRUN + "\n")  # a new crun binary gets another chance
    os.utime(fake_crun, ns=(1, 1))
    assert select_runtime("auto", runner_env.state_dir)[0].name == "crun"

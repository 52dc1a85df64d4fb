"""Hostile images and inputs under real runc: FIFOs in /etc, a catastrophic --ready-regex, a runtime
that is not one, an output file that cannot be written. Each must end promptly with one clear line."""
from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.errors import ContainerStartError, ImageError, UsageError
from tests.fixtures.runner import RunnerEnv, make_busybox_root, needs_runc

pytestmark = [needs_runc, pytest.mark.root, pytest.mark.timeout(120)]


@pytest.fixture
def own_env(tmp_path: Path) -> Iterator[RunnerEnv]:
    """A runner env on a busybox image of this test's own, free to be made hostile."""
    env = RunnerEnv(tmp_path / "run", make_busybox_root(tmp_path / "image"))
    yield env
    left = env.wait_clean()
    assert not left, f"left behind: {left}"


def test_fifo_etc_hosts_is_left_as_it_is(own_env: RunnerEnv) -> None:
    os.mkfifo(own_env.root / "etc" / "hosts")
    cap = own_env.run("sh", "-c", "echo ok; test -p /etc/hosts && echo still-a-fifo")
    assert cap.code == 0 and cap.out == "ok\nstill-a-fifo\n"
    assert "left the image's /etc/hosts as it is: a FIFO, not a regular file" in cap.err


@pytest.mark.parametrize("name", ["passwd", "group"])
def test_fifo_passwd_or_group_fails_before_runc(own_env: RunnerEnv, name: str) -> None:
    (own_env.root / "etc" / name).unlink()
    os.mkfifo(own_env.root / "etc" / name)
    with pytest.raises(ImageError, match=f"/etc/{name} is a FIFO"):  # runc would block opening it
        own_env.run("echo", "never")


def test_catastrophic_ready_regex_gives_up_and_the_run_ends(own_env: RunnerEnv) -> None:
    started = time.monotonic()
    cap = own_env.run("sh", "-c", "echo " + "a" * 40 + "!; echo after; exit 3", ready_regex="(a+)+$")
    assert time.monotonic() - started < 30
    assert cap.code == 3 and cap.out.endswith("after\n")
    assert not cap.result.ready and cap.result.timings["ready"] is None
    assert "--ready-regex took over" in cap.err


def test_ready_regex_still_marks_ready_after_a_long_line(own_env: RunnerEnv) -> None:
    cap = own_env.run("sh", "-c", "head -c 131072 /dev/zero | tr '\\0' a; echo; sleep 0.3; echo server ready",
                      ready_regex=".*ready")
    t = cap.result.timings
    assert cap.code == 0 and cap.result.ready
    assert t["first_output"] < t["ready"] <= t["exit"]  # type: ignore[operator]
    assert t["ready"] - t["first_output"] > 0.2  # type: ignore[operator]


def test_runtime_that_writes_no_pid_file_is_a_start_error(own_env: RunnerEnv) -> None:
    with pytest.raises(ContainerStartError, match="wrote no pid file.*/bin/true an OCI runtime"):
        own_env.run("true", runtime="/bin/true")


def test_timings_json_in_a_missing_directory_fails_before_the_run(own_env: RunnerEnv, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--timings-json"):
        own_env.run("true", timings_json=tmp_path / "missing" / "t.json")

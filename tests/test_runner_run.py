"""Real containers under runc on a real overlay: behaviour, isolation, cleanup and concurrency."""
from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from runner import ImageConfig, MountSpec
from runner.errors import ContainerStartError, UserNotFound
from tests.fixtures.runner import (RunnerEnv, busybox_root, make_busybox_root, needs_runc, runner_env,  # noqa: F401
                                   wait_for)

pytestmark = [needs_runc, pytest.mark.root]


def test_exit_code_and_output(runner_env: RunnerEnv) -> None:
    cap = runner_env.run("sh", "-c", "echo out; echo err >&2; exit 3")
    assert cap.code == 3
    assert cap.out == "out\n" and "err\n" in cap.err


def test_zero_exit(runner_env: RunnerEnv) -> None:
    assert runner_env.run("true").code == 0


def _kill_init_on(marker: bytes, env: RunnerEnv, sig: int) -> tuple[bytearray, object]:
    seen = bytearray()

    def sink(data: bytes) -> None:
        seen.extend(data)
        if marker in seen:
            for pid_file in (env.state_dir / "containers").glob("*/init.pid"):
                os.kill(int(pid_file.read_text()), sig)
    return seen, sink


def test_signal_death_gives_128_plus_n(runner_env: RunnerEnv) -> None:
    from runner import DirectoryProvider, run
    seen, sink = _kill_init_on(b"up", runner_env, signal.SIGKILL)
    result = run(runner_env.options("sh", "-c", "echo up; sleep 30"), DirectoryProvider(runner_env.root, ImageConfig()),
                 stdout=sink, stderr=lambda b: None)  # type: ignore[arg-type]
    assert result.exit_code == 128 + signal.SIGKILL


def test_output_streams_live(runner_env: RunnerEnv) -> None:
    from runner import DirectoryProvider, run
    arrivals: list[tuple[float, bytes]] = []
    run(runner_env.options("sh", "-c", "echo first; sleep 1; echo second"),
        DirectoryProvider(runner_env.root, ImageConfig()),
        stdout=lambda b: arrivals.append((time.monotonic(), b)), stderr=lambda b: None)
    text = b"".join(b for _, b in arrivals)
    assert text == b"first\nsecond\n"
    first = next(t for t, b in arrivals if b"first" in b)
    second = next(t for t, b in arrivals if b"second" in b)
    assert second - first > 0.7


def test_ready_regex_and_timings(runner_env: RunnerEnv, tmp_path: Path) -> None:
    out = tmp_path / "t.json"
    cap = runner_env.run("sh", "-c", "echo starting; sleep 0.3; echo 'server READY on 80' >&2; sleep 0.2",
                         ready_regex=r"READY on \d+", timings_json=out, timings=True)
    t = cap.result.timings
    assert cap.result.ready
    order = ["image_resolved", "mount_ready", "rootfs_ready", "spec_ready", "runc_create", "runc_start", "first_output",
             "ready", "exit"]
    values = [t[k] for k in order]
    assert all(isinstance(v, float) for v in values), t
    assert values == sorted(values)  # type: ignore[type-var]
    assert t["ready"] - t["first_output"] > 0.2  # type: ignore[operator]
    assert t["mount_cold"] is False and t["total"] >= t["exit"]  # type: ignore[operator]
    assert json.loads(out.read_text()) == t
    assert "runc create" in cap.err and "ready (regex)" in cap.err


def test_ready_regex_unmatched(runner_env: RunnerEnv) -> None:
    cap = runner_env.run("echo", "nothing here", ready_regex="READY")
    assert not cap.result.ready and cap.result.timings["ready"] is None


def test_ready_regex_on_last_unterminated_line(runner_env: RunnerEnv) -> None:
    assert runner_env.run("printf", "a\nREADY", ready_regex="^READY$").result.ready


def test_image_defaults_env_workdir_user(runner_env: RunnerEnv) -> None:
    config = ImageConfig(env=["GREETING=hello", "PATH=/bin"], cmd=["sh", "-c", 'echo "$GREETING $HOME"; pwd; id'],
                         working_dir="/work", user="app")
    cap = runner_env.run(config=config)
    assert cap.out.splitlines() == ["hello /home/app", "/work", "uid=1000(app) gid=1000(app) groups=50(staff)"]
    cap = runner_env.run(config=config, env=["GREETING=bye"], workdir="/tmp", user="0:50")
    assert cap.out.splitlines() == ["bye /root", "/tmp", "uid=0(root) gid=50(staff)"]


def test_entrypoint_plus_cmd(runner_env: RunnerEnv) -> None:
    config = ImageConfig(entrypoint=["echo", "entry"], cmd=["default"])
    assert runner_env.run(config=config).out == "entry default\n"
    assert runner_env.run("given", config=config).out == "entry given\n"


def test_unknown_user_fails_before_start(runner_env: RunnerEnv) -> None:
    with pytest.raises(UserNotFound):
        runner_env.run("true", user="ghost")


def test_missing_command_is_127(runner_env: RunnerEnv) -> None:
    with pytest.raises(ContainerStartError) as info:
        runner_env.run("no-such-command")
    assert info.value.exit_code == 127


def test_command_that_cannot_run_is_126(runner_env: RunnerEnv) -> None:
    with pytest.raises(ContainerStartError) as info:
        runner_env.run("/etc/passwd")
    assert info.value.exit_code == 126


def test_bind_mounts_ro_and_rw(runner_env: RunnerEnv, tmp_path: Path) -> None:
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    (ro / "f").write_text("host data\n")
    cap = runner_env.run("sh", "-c", "cat /in/f; echo x > /in/g || echo ro-refused; echo y > /out/g",
                         mounts=[MountSpec(ro, "/in", True), MountSpec(rw, "/out")])
    assert cap.out == "host data\nro-refused\n"
    assert "Read-only file system" in cap.err
    assert not (ro / "g").exists() and (rw / "g").read_text() == "y\n"


def _interfaces(text: str) -> set[str]:
    return {line.split(":")[0].strip() for line in text.splitlines()[2:]}


def test_network_none_and_host(runner_env: RunnerEnv) -> None:
    none = runner_env.run("cat", "/proc/net/dev")
    host = runner_env.run("cat", "/proc/net/dev", network="host")
    assert _interfaces(none.out) == {"lo"}
    assert _interfaces(host.out) == _interfaces(Path("/proc/net/dev").read_text())


def test_container_sees_only_its_image(runner_env: RunnerEnv) -> None:
    cap = runner_env.run("sh", "-c", "ls /; cat /proc/self/mountinfo")
    top = set(cap.out.split("\n", 1)[0].split()) | set(cap.out.splitlines())
    assert "bin" in top and "work" in top
    roots = [line.split()[3] for line in cap.out.splitlines() if " - " in line]
    assert roots and not [r for r in roots if r.startswith(("/tmp", str(runner_env.base)))], roots
    assert "127.0.1.1" in runner_env.run("cat", "/etc/hosts").out


def test_lower_layer_is_read_only(runner_env: RunnerEnv, tmp_path: Path) -> None:
    root = make_busybox_root(tmp_path / "image")
    before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    env = RunnerEnv(runner_env.base, root)
    cap = env.run("sh", "-c", "rm -rf /bin/ls /etc; echo x > /newfile; chmod 000 /work; ls /etc || echo gone")
    assert cap.code == 0 and "gone" in cap.out
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before
    assert (root / "etc" / "passwd").exists() and not (root / "newfile").exists()
    assert stat.S_IMODE((root / "work").stat().st_mode) == 0o755


def test_containers_do_not_see_each_others_layer(runner_env: RunnerEnv) -> None:
    results: dict[str, object] = {}
    writer = threading.Thread(target=lambda: results.update(a=runner_env.run(
        "sh", "-c", "echo secret > /marker; sleep 2; cat /marker")))
    writer.start()
    try:
        wait_for(lambda: list(runner_env.layers_dir.glob("*/upper/marker")), what="writer's marker")
        cap = runner_env.run("sh", "-c", "cat /marker || echo absent; ls /proc | grep -c '^[0-9]'")
    finally:
        writer.join()
    assert cap.out.splitlines()[0] == "absent"
    assert results["a"].out == "secret\n"  # type: ignore[attr-defined]


def test_keep_preserves_writable_layer(runner_env: RunnerEnv) -> None:
    cap = runner_env.run("sh", "-c", "echo kept > /file", keep=True)
    upper = cap.result.upper_dir
    assert upper is not None and (upper / "file").read_text() == "kept\n"
    shutil.rmtree(upper.parent)


def test_resource_limits_apply(runner_env: RunnerEnv) -> None:
    # The container sees cgroup v2 files on a unified host (Debian 12's default), v1 files on a
    # v1 or hybrid host (this project's machines).
    script = ("cd /sys/fs/cgroup; if [ -f cgroup.controllers ]; then echo v2; cat pids.max memory.max cpu.max; "
              "else echo v1; cat pids/pids.max memory/memory.limit_in_bytes cpu/cpu.cfs_quota_us; fi")
    cap = runner_env.run("sh", "-c", script, pids_limit=32, memory=64 << 20, cpus=0.5)
    version, *values = cap.out.split()
    expected = {"v1": ["32", str(64 << 20), "50000"], "v2": ["32", str(64 << 20), "50000", "100000"]}
    assert values == expected[version]


def test_setuid_obeys_no_new_privileges(runner_env: RunnerEnv, tmp_path: Path) -> None:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is needed to build a static setuid test program")
    root = make_busybox_root(tmp_path / "image")
    src = tmp_path / "euid.c"
    src.write_text('#include <stdio.h>\n#include <unistd.h>\nint main(void){printf("%d\\n",(int)geteuid());return 0;}\n')
    built = subprocess.run(["gcc", "-static", "-O1", "-o", str(root / "bin" / "euid"), str(src)], capture_output=True)
    if built.returncode != 0:
        pytest.skip(f"cannot build a static binary: {built.stderr.decode()[-200:]}")
    os.chmod(root / "bin" / "euid", 0o4755)
    env = RunnerEnv(runner_env.base, root)
    assert env.run("/bin/euid", user="1000").out == "1000\n"

    def allow_escalation(spec: dict[str, object]) -> None:
        spec["process"]["noNewPrivileges"] = False  # type: ignore[index]
    assert env.run("/bin/euid", user="1000", spec_hook=allow_escalation).out == "0\n"  # the control


def test_device_node_in_image_is_unusable(runner_env: RunnerEnv, tmp_path: Path) -> None:
    root = make_busybox_root(tmp_path / "image")
    os.mknod(root / "mem", 0o666 | stat.S_IFCHR, os.makedev(1, 1))
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    env = RunnerEnv(runner_env.base, root)
    cap = env.run("sh", "-c", "head -c1 /mem || echo mem-refused; echo x > /null || echo null-refused; "
                  "mknod /tmp/m c 1 1 && (head -c1 /tmp/m || echo made-refused); "
                  "mknod /dev/m c 1 1 && (head -c1 /dev/m || echo cgroup-refused)")
    assert cap.out.splitlines() == ["mem-refused", "null-refused", "made-refused", "cgroup-refused"], cap.err


def test_runtime_failure_leaves_nothing(runner_env: RunnerEnv) -> None:
    def break_spec(spec: dict[str, object]) -> None:
        spec["process"]["cwd"] = "relative"  # type: ignore[index]
    with pytest.raises(ContainerStartError):
        runner_env.run("true", spec_hook=break_spec)


def _harness(env: RunnerEnv, *args: str, **kw: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(env.harness(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]


def _read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float = 15.0) -> bytes:
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        assert time.monotonic() < deadline, seen
        chunk = proc.stdout.read1(4096)
        assert chunk, f"runner ended early: {seen!r}"
        seen += chunk
    return seen


def test_sigterm_is_forwarded(runner_env: RunnerEnv) -> None:
    proc = _harness(runner_env, "x:1", "--", "sh", "-c",
                    "trap 'echo got-term; exit 5' TERM; echo up; while true; do sleep 0.1; done")
    _read_until(proc, b"up")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=15)
    assert b"got-term" in out and proc.returncode == 5


def test_second_signal_kills(runner_env: RunnerEnv) -> None:
    proc = _harness(runner_env, "x:1", "--", "sh", "-c", "echo up; sleep 60")
    _read_until(proc, b"up")
    # The first is forwarded (pid 1 ignores it), the second kills. Exactly two, apart (signals
    # sent closer together may merge into one): a third could reach the runner after it restored
    # the default handlers on its way out, and end it with 130 instead.
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=15)
    assert proc.returncode == 128 + signal.SIGKILL


def test_killed_runner_leaves_nothing(runner_env: RunnerEnv) -> None:
    proc = _harness(runner_env, "x:1", "--", "sh", "-c", "echo up; sleep 60")
    _read_until(proc, b"up")
    assert runner_env.leftovers()  # the container is there
    proc.kill()
    proc.wait()
    assert runner_env.wait_clean() == []


def test_killed_runner_and_guard_are_cleaned_by_next_run(runner_env: RunnerEnv) -> None:
    proc = _harness(runner_env, "x:1", "--", "sh", "-c", "echo up; sleep 60")
    _read_until(proc, b"up")
    owner = json.loads(next((runner_env.state_dir / "containers").glob("*/owner.json")).read_text())
    for pid, _ in reversed(owner["owners"]):
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    time.sleep(0.3)
    assert runner_env.leftovers()
    assert runner_env.run("true").code == 0  # its start-up clears the stale container
    assert runner_env.leftovers() == []


def test_sixteen_concurrent_share_one_mount(runner_env: RunnerEnv, tmp_path: Path) -> None:
    log, sync = tmp_path / "mounts.log", tmp_path / "sync"
    sync.mkdir()
    wait_go = "i=0; while [ ! -e /sync/go ] && [ $i -lt 1200 ]; do sleep 0.05; i=$((i+1)); done"
    procs = [_harness(runner_env, "--shared-bind", "--mount-log", str(log), "--mount", f"{sync}:/sync:ro",
                      "x:1", "--", "sh", "-c", f"echo c{i}; {wait_go}") for i in range(16)]
    try:
        wait_for(lambda: len(_overlays(runner_env.base)) >= 16, timeout=60, what="16 overlays")
        shared = [m for m in _mount_targets() if m.startswith(str(runner_env.state_dir / "mounts"))]
    finally:
        (sync / "go").touch()
        outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 16, [o[1][-300:] for o in outs]
    assert [o[0] for o in outs] == [f"c{i}\n".encode() for i in range(16)]
    assert len(shared) == 1
    assert [line.split()[0] for line in log.read_text().splitlines()] == ["start", "stop"]


def _mount_targets() -> list[str]:
    return [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]


def _overlays(base: Path) -> list[str]:
    return [line for line in Path("/proc/mounts").read_text().splitlines()
            if line.startswith("overlay ") and str(base) in line]

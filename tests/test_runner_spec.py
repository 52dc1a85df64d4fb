"""Pure parts of the runner: options, user resolution, env and args rules, the generated OCI spec."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import pytest

import runner
from runner.edits import BindMount, DeviceNode, SpecEdits
from runner.imagefs_lower import image_of_key, mount_key
from runner.shared_mount import key_dir_name
from runner.errors import ImageError, UsageError, UserNotFound
from runner.options import MountSpec, RunOptions, add_run_arguments, options_from_args, parse_size
from runner.spec import DEFAULT_CAPS, SpecInputs, build_spec, compose_args, merge_env
from runner.stream import MATCH_BUDGET_S, ReadyWatcher
from runner.timings import PHASES, Timings
from runner.users import MAX_DB_BYTES, ResolvedUser, parse_id, resolve_user, secure_join, write_in_root
from tests.fixtures.runner import GROUP, PASSWD


def test_public_api_is_explicit() -> None:
    assert sorted(runner.__all__) == sorted(set(runner.__all__))
    for name in runner.__all__:
        assert hasattr(runner, name), name


# -- args and env ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("entry", "cmd", "override", "command", "expected"), [
    (["/entry"], ["a", "b"], None, None, ["/entry", "a", "b"]),
    (["/entry"], ["a", "b"], None, ["x"], ["/entry", "x"]),
    (None, ["sh"], None, ["ls", "-l"], ["ls", "-l"]),
    (["/entry"], ["a"], "/other --flag", None, ["/other", "--flag"]),
    (["/entry"], ["a"], "/other", ["x"], ["/other", "x"]),
    (["/entry"], ["a"], "", ["ls"], ["ls"]),
])
def test_compose_args_follows_docker(entry: list[str] | None, cmd: list[str] | None, override: str | None,
                                     command: list[str] | None, expected: list[str]) -> None:
    assert compose_args(entry, cmd, override, command) == expected


def test_compose_args_without_any_command_fails() -> None:
    with pytest.raises(UsageError, match="no command"):
        compose_args(None, None, None, None)


def test_compose_args_rejects_an_unbalanced_entrypoint() -> None:
    with pytest.raises(UsageError, match="--entrypoint.*closing quotation"):
        compose_args(None, ["sh"], '"abc', None)


def test_merge_env_orders_image_edits_cli_then_defaults() -> None:
    env = merge_env(["A=image", "B=image", "PATH=/img"], [{"B": "gpu", "G": "1"}],
                    ["A=cli", "FROMHOST", "MISSING"], {"FROMHOST": "h"}, {"PATH": "/default", "HOME": "/root"})
    assert env == ["A=cli", "B=gpu", "PATH=/img", "G=1", "FROMHOST=h", "HOME=/root"]


def test_merge_env_keeps_equals_in_values() -> None:
    assert merge_env(["X=a=b"], [], ["Y=c=d"], {}, {}) == ["X=a=b", "Y=c=d"]


# -- users -----------------------------------------------------------------------------------------

@pytest.fixture
def etc_root(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text(PASSWD)
    (tmp_path / "etc" / "group").write_text(GROUP)
    return tmp_path


@pytest.mark.parametrize(("spec", "expected"), [
    ("", ResolvedUser(0, 0, (), "/root")),
    ("app", ResolvedUser(1000, 1000, (50,), "/home/app")),
    ("1000", ResolvedUser(1000, 1000, (50,), "/home/app")),
    ("app:staff", ResolvedUser(1000, 50, (), "/home/app")),
    ("app:77", ResolvedUser(1000, 77, (), "/home/app")),
    ("4242", ResolvedUser(4242, 0, (), "/")),
    ("4242:4343", ResolvedUser(4242, 4343, (), "/")),
])
def test_resolve_user(etc_root: Path, spec: str, expected: ResolvedUser) -> None:
    assert resolve_user(etc_root, spec) == expected


@pytest.mark.parametrize("spec", ["ghost", "app:ghosts"])
def test_resolve_unknown_user_or_group_fails(etc_root: Path, spec: str) -> None:
    with pytest.raises(UserNotFound):
        resolve_user(etc_root, spec)


def test_resolve_user_without_passwd_accepts_numbers_only(tmp_path: Path) -> None:
    assert resolve_user(tmp_path, "12:34") == ResolvedUser(12, 34, (), "/")
    with pytest.raises(UserNotFound):
        resolve_user(tmp_path, "app")


def test_secure_join_keeps_symlinks_inside_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").symlink_to("/etc/../../etc/shadow")
    (root / "etc" / "rel").symlink_to("../../../outside")
    assert secure_join(root, "/etc/passwd") == root / "etc" / "shadow"
    assert secure_join(root, "etc/rel") == root / "outside"
    assert secure_join(root, "/../../x") == root / "x"


def test_passwd_symlink_to_host_is_not_followed_out(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").symlink_to("/etc/passwd")  # inside the image: itself, i.e. missing
    with pytest.raises(UserNotFound):
        resolve_user(tmp_path, "root")


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("1000", 1000), ("4294967294", 4294967294),
                                            ("4294967295", None), ("\u00b2", None), ("\u0663", None),
                                            ("-1", None), ("", None), ("1" * 5000, None)])
def test_parse_id_takes_ascii_digits_in_range(text: str, value: int | None) -> None:
    assert parse_id(text) == value


def test_image_entries_with_non_ascii_ids_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:\u00b2:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n")
    (tmp_path / "etc" / "group").write_text("evil:x:\u00b9:app\nstaff:x:50:app\n")
    assert resolve_user(tmp_path, "app") == ResolvedUser(1000, 1000, (50,), "/home/app")
    for spec in ("root", "\u00b2", "\u0663", "app:evil", "app:\u00b9"):
        with pytest.raises(UserNotFound):
            resolve_user(tmp_path, spec)


@pytest.mark.parametrize("name", ["passwd", "group"])
def test_passwd_or_group_that_is_a_fifo_is_refused_without_blocking(etc_root: Path, name: str) -> None:
    (etc_root / "etc" / name).unlink()
    os.mkfifo(etc_root / "etc" / name)
    with pytest.raises(ImageError, match=f"/etc/{name} is a FIFO, not a regular file"):
        resolve_user(etc_root, "app")


def test_huge_passwd_is_refused_without_reading_it(etc_root: Path) -> None:
    with open(etc_root / "etc" / "passwd", "ab") as f:
        f.truncate(512 << 20)  # sparse: no disk used
    with pytest.raises(ImageError, match="larger than 4 MiB"):
        resolve_user(etc_root, "0")


def test_passwd_up_to_the_cap_is_read(etc_root: Path) -> None:
    filler = "#" * 99 + "\n"
    text = filler * ((MAX_DB_BYTES - 200) // len(filler)) + "late:x:7:8::/l:/bin/sh\n"
    (etc_root / "etc" / "passwd").write_text(text)
    assert resolve_user(etc_root, "late") == ResolvedUser(7, 8, (), "/l")


def test_write_in_root_writes_regular_files_and_skips_a_fifo(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "hosts").write_text("old and longer\n")
    assert write_in_root(tmp_path, "/etc/hosts", "new\n") is None
    assert (tmp_path / "etc" / "hosts").read_text() == "new\n"
    assert write_in_root(tmp_path, "/etc/hostname", "h\n") is None
    os.mkfifo(tmp_path / "etc" / "fifo")
    assert write_in_root(tmp_path, "/etc/fifo", "x\n") == "a FIFO, not a regular file"
    (tmp_path / "etc" / "dir").mkdir()
    assert write_in_root(tmp_path, "/etc/dir", "x\n") is not None


# -- options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "size"), [("512m", 512 << 20), ("1g", 1 << 30), ("100", 100),
                                           ("1.5k", 1536), ("64MB", 64 << 20)])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "m", "12x", "-1"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_mount_spec() -> None:
    assert MountSpec.parse("/a:/b") == MountSpec(Path("/a"), "/b", False)
    assert MountSpec.parse("/a:/b:ro") == MountSpec(Path("/a"), "/b", True)
    for bad in ("/a", "a:/b", "/a:b", "/a:/b:rx", "/a:/b:ro:x"):
        with pytest.raises(UsageError):
            MountSpec.parse(bad)


def _parse(*argv: str) -> RunOptions:
    parser = argparse.ArgumentParser()
    add_run_arguments(parser)
    return options_from_args(parser.parse_args(argv))


def test_arguments_map_to_options() -> None:
    opts = _parse("--env", "A=1", "-e", "B", "--workdir", "/w", "--user", "app", "--mount", "/h:/c:ro",
                  "--network", "host", "--memory", "256m", "--cpus", "1.5", "--pids-limit", "64",
                  "--gpus", "0,1", "--keep", "--ready-regex", "ready", "--timings", "--timings-json", "/t.json",
                  "--store", "s3://b", "--cache", "/c", "img:1", "--", "echo", "--env", "x")
    assert opts.image == "img:1"
    assert opts.command == ["echo", "--env", "x"]
    assert opts.env == ["A=1", "B"]
    assert (opts.workdir, opts.user, opts.network) == ("/w", "app", "host")
    assert opts.mounts == [MountSpec(Path("/h"), "/c", True)]
    assert (opts.memory, opts.cpus, opts.pids_limit, opts.gpus) == (256 << 20, 1.5, 64, "0,1")
    assert opts.keep and opts.timings and opts.ready_regex == "ready"
    assert opts.timings_json == Path("/t.json")
    assert (opts.store, opts.cache) == ("s3://b", "/c")


def test_command_without_separator_and_no_command() -> None:
    assert _parse("img:1", "ls", "-l").command == ["ls", "-l"]
    assert _parse("img:1").command is None
    assert _parse("img:1", "--").command is None


@pytest.mark.parametrize("kw", [{"network": "bridge"}, {"workdir": "rel"}, {"cpus": 0.0},
                                {"ready_regex": "("}, {"env": ["=x"]}, {"pids_limit": 0},
                                {"cpus": float("nan")}, {"cpus": float("inf")}, {"cpus": 1e-9},
                                {"user": "\u00b2"}, {"user": "app:\u00b2"}, {"user": "99999999999"},
                                {"hostname": "a\n127.0.0.1 evil"}, {"hostname": "a" * 65}, {"hostname": ""},
                                {"hostname": "under_score"}])
def test_invalid_options(kw: dict[str, object]) -> None:
    with pytest.raises(UsageError):
        RunOptions(image="x", **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("argv", [["--cpus", "nan"], ["--cpus", "inf"], ["--cpus", "1e-9"], ["-u", "\u00b2"],
                                  ["--hostname", "x" * 100]])
def test_invalid_arguments_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        _parse(*argv, "img:1")


def test_valid_edge_options() -> None:
    opts = RunOptions(image="x", cpus=0.01, user="app:staff", hostname="a" * 64)
    assert opts.cpus == 0.01 and opts.user == "app:staff"
    assert RunOptions(image="x", hostname="web-1.example.org").hostname == "web-1.example.org"


# -- spec ------------------------------------------------------------------------------------------

def _inputs(**kw: object) -> SpecInputs:
    base: dict[str, object] = {"args": ["sh"], "env": ["PATH=/bin"], "cwd": "/", "user": ResolvedUser(0, 0),
                               "hostname": "h"}
    base.update(kw)
    return SpecInputs(**base)  # type: ignore[arg-type]


def test_spec_process_defaults() -> None:
    spec = build_spec(_inputs(user=ResolvedUser(0, 0, (5, 6))))
    proc = spec["process"]
    assert isinstance(proc, dict)
    assert proc["noNewPrivileges"] is True
    assert proc["terminal"] is False
    assert proc["user"] == {"uid": 0, "gid": 0, "additionalGids": [5, 6]}
    assert proc["capabilities"]["bounding"] == list(DEFAULT_CAPS)
    assert proc["capabilities"]["effective"] == list(DEFAULT_CAPS)
    assert "CAP_SYS_ADMIN" not in proc["capabilities"]["bounding"]
    assert proc["rlimits"][0]["type"] == "RLIMIT_NOFILE"


def test_spec_non_root_has_no_effective_caps() -> None:
    caps = build_spec(_inputs(user=ResolvedUser(1000, 1000)))["process"]["capabilities"]  # type: ignore[index]
    assert caps["effective"] == [] and caps["permitted"] == []
    assert caps["bounding"] == list(DEFAULT_CAPS)


def test_spec_namespaces_follow_network() -> None:
    def kinds(network: str) -> list[str]:
        return [n["type"] for n in build_spec(_inputs(network=network))["linux"]["namespaces"]]  # type: ignore[index]
    assert kinds("none") == ["pid", "mount", "ipc", "uts", "network"]
    assert kinds("host") == ["pid", "mount", "ipc", "uts"]


def test_spec_standard_mounts_and_hardening() -> None:
    spec = build_spec(_inputs(mounts=[MountSpec(Path("/h"), "/c", True), MountSpec(Path("/r"), "/w")]))
    mounts = {m["destination"]: m for m in spec["mounts"]}  # type: ignore[union-attr]
    for dest in ("/proc", "/dev", "/dev/pts", "/dev/shm", "/dev/mqueue", "/sys"):
        assert dest in mounts
    assert "ro" in mounts["/sys"]["options"]
    assert mounts["/c"]["source"] == "/h" and "ro" in mounts["/c"]["options"]
    assert "ro" not in mounts["/w"]["options"]
    linux = spec["linux"]
    assert "/proc/kcore" in linux["maskedPaths"] and "/proc/sys" in linux["readonlyPaths"]  # type: ignore[index]
    assert spec["root"] == {"path": "rootfs", "readonly": False}
    host_sources = {m["source"] for m in spec["mounts"] if m["type"] == "bind"}  # type: ignore[index,union-attr]
    assert host_sources == {"/h", "/r"}


def test_spec_resources() -> None:
    res = build_spec(_inputs(memory=1 << 28, cpus=0.5, pids_limit=10))["linux"]["resources"]  # type: ignore[index]
    assert res["memory"] == {"limit": 1 << 28}
    assert res["cpu"] == {"quota": 50000, "period": 100000}
    assert res["pids"] == {"limit": 10}
    assert res["devices"][0] == {"allow": False, "access": "rwm"}
    bare = build_spec(_inputs())["linux"]["resources"]  # type: ignore[index]
    assert set(bare) == {"devices"}


@pytest.mark.parametrize(("cpus", "quota"), [(0.1, 10000), (1.5, 150000), (0.01, 1000), (1e-9, 1000)])
def test_spec_cpu_quota_is_never_zero(cpus: float, quota: int) -> None:
    res = build_spec(_inputs(cpus=cpus))["linux"]["resources"]  # type: ignore[index]
    assert res["cpu"] == {"quota": quota, "period": 100000}


@pytest.mark.parametrize("cpus", [float("nan"), float("inf"), -1.0])
def test_spec_rejects_unusable_cpus(cpus: float) -> None:
    with pytest.raises(UsageError):
        build_spec(_inputs(cpus=cpus))


# -- ready regex -----------------------------------------------------------------------------------

def test_ready_watcher_matches_a_line_split_across_chunks() -> None:
    w = ReadyWatcher(r"^READY on \d+$")
    assert not w.feed(1, b"noise\nREA")
    assert not w.feed(2, b"DY on 1\n")  # another stream's output does not continue this line
    assert w.feed(1, b"DY on 80\nmore\n") and w.matched


def test_ready_watcher_tries_only_the_first_4k_of_a_line() -> None:
    w = ReadyWatcher("READY")
    assert not w.feed(1, b"x" * 5000 + b"READY\n")
    assert not w.feed(1, b"y" * 3000)
    assert not w.feed(1, b"y" * 3000 + b"READY\n")
    assert w.feed(1, b"z" * 4000 + b"READY\n")


def test_ready_watcher_is_fast_on_a_long_line() -> None:
    w = ReadyWatcher(".*ready")
    started = time.monotonic()
    for _ in range(2):
        w.feed(1, b"a" * 65536)
    assert w.feed(1, b"\nthe server is ready\n")
    assert time.monotonic() - started < 1.0


def test_ready_watcher_gives_up_on_catastrophic_backtracking() -> None:
    warnings: list[str] = []
    w = ReadyWatcher("(a+)+$", warn=warnings.append)
    started = time.monotonic()
    assert not w.feed(1, b"a" * 40 + b"!\n")
    assert time.monotonic() - started < MATCH_BUDGET_S + 1.0
    assert w.gave_up and not w.matched and len(warnings) == 1 and "--ready-regex" in warnings[0]
    assert not w.feed(1, b"aaaa\n") and not w.finish(1)  # no more searching once given up


def test_spec_applies_device_edits() -> None:
    edits = SpecEdits(devices=[DeviceNode("/dev/nvidia3", "c", 195, 3)],
                      mounts=[BindMount("/host/lib/libcuda.so.1", "/usr/lib/libcuda.so.1")],
                      hooks={"createContainer": [{"path": "/bin/true"}]})
    spec = build_spec(_inputs(edits=edits))
    linux = spec["linux"]
    assert linux["devices"] == [{"path": "/dev/nvidia3", "type": "c", "major": 195, "minor": 3,  # type: ignore[index]
                                 "fileMode": 0o666, "uid": 0, "gid": 0}]
    assert {"allow": True, "type": "c", "major": 195, "minor": 3, "access": "rwm"} in linux["resources"]["devices"]  # type: ignore[index]
    mount = [m for m in spec["mounts"] if m["destination"] == "/usr/lib/libcuda.so.1"][0]  # type: ignore[index,union-attr]
    assert "ro" in mount["options"] and mount["source"] == "/host/lib/libcuda.so.1"
    assert spec["hooks"] == {"createContainer": [{"path": "/bin/true"}]}


def test_spec_edits_extend_without_duplicates() -> None:
    a = SpecEdits(devices=[DeviceNode("/dev/x", "c", 1, 1)], env={"A": "1"})
    a.extend(SpecEdits(devices=[DeviceNode("/dev/x", "c", 1, 1), DeviceNode("/dev/y", "c", 1, 2)], env={"B": "2"}))
    assert [d.path for d in a.devices] == ["/dev/x", "/dev/y"]
    assert a.env == {"A": "1", "B": "2"}


# -- timings ---------------------------------------------------------------------------------------

def test_timings_keys_and_first_mark_wins() -> None:
    now = [10.0]
    t = Timings(clock=lambda: now[0])
    now[0] = 10.5
    t.mark("image_resolved")
    now[0] = 11.0
    t.mark("image_resolved")
    t.mount_cold = True
    t.finish()
    doc = t.as_dict()
    assert set(doc) == set(PHASES) | {"mount_cold", "total", "started_at"}
    assert abs(doc["started_at"] - time.time()) < 60  # type: ignore[operator]
    assert doc["image_resolved"] == 0.5 and doc["total"] == 1.0 and doc["ready"] is None
    assert "image resolved" in t.human() and "(cold)" not in t.human()
    with pytest.raises(ValueError):
        t.mark("bogus")


def test_timings_phase_names_are_the_benchmarks() -> None:
    assert PHASES == ("image_resolved", "mount_ready", "rootfs_ready", "spec_ready", "runc_create", "runc_start",
                      "first_output", "ready", "exit")


def test_mount_key_names_the_store_and_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = "ab" * 32
    a = mount_key(image, "file:///s1", str(tmp_path / "c"))
    assert a.startswith(image + ".") and image_of_key(a) == image and image_of_key(image) == image
    assert a == mount_key(image, "file:///s1/", str(tmp_path / "c")) == mount_key(image, "/s1", str(tmp_path / "c"))
    assert a != mount_key(image, "file:///s2", str(tmp_path / "c"))
    assert a != mount_key(image, "file:///s1", str(tmp_path / "d"))
    assert mount_key(image, "s3://b/p?endpoint=http://127.0.0.1:1", None) != mount_key(
        image, "s3://b/p?endpoint=http://127.0.0.1:2", None)
    assert key_dir_name(a) == a  # readable, no hashed fallback
    monkeypatch.setenv("COLDSTART_STORE", "file:///s1")
    monkeypatch.setenv("COLDSTART_CACHE", str(tmp_path / "c"))
    assert mount_key(image, None, None) == a  # the defaults, resolved


def test_signals_are_handled_while_a_ready_regex_search_runs() -> None:
    import signal
    import subprocess
    handled: list[float] = []
    old = signal.signal(signal.SIGUSR1, lambda *_: handled.append(time.monotonic()))
    try:
        killer = subprocess.Popen(["sh", "-c", f"sleep 0.2; kill -USR1 {os.getpid()}"])
        started = time.monotonic()
        ReadyWatcher("(a+)+$").feed(1, b"a" * 40 + b"!\n")
        killer.wait()
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert handled and handled[0] - started < MATCH_BUDGET_S  # during the search, not after it

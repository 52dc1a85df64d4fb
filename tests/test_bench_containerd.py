"""The benchmark's containerd mode end to end: a private containerd and registry, a cold pull and run of
the busybox `hello` image, failures and timeouts that leave no container behind, and a shutdown that
leaves no process, mount or directory of ours. Also: the suite skips the mode when tools are missing."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest

from bench import modes, suite
from bench.containerd import ContainerdBench, make_cold, missing_tools, pull_and_run, shim_pids
from bench.rootfs import build_busybox
from bench.workloads import READY, WORKLOADS
from imagefs.importers.rootfs import import_rootfs
from imagefs.store.local import LocalStore
from imagefs.writer import write_image
from runner.mounts import mount_points

needs_containerd = pytest.mark.skipif(bool(missing_tools()) or os.geteuid() != 0,
                                      reason="needs root and containerd, ctr, docker-registry, skopeo, runc")
SCRATCH = Path("/var/tmp")  # short paths: containerd's sockets live in the scratch directory


@pytest.fixture(scope="module")
def hello(tmp_path_factory: pytest.TempPathFactory) -> tuple[LocalStore, str]:
    """The hello workload's image (busybox), in a store of its own."""
    store = LocalStore(tmp_path_factory.mktemp("store"), fsync=False)
    image_id, _ = write_image(store, import_rootfs(str(build_busybox())))
    return store, image_id


@pytest.fixture(scope="module")
def ctrd(hello: tuple[LocalStore, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerdBench]:
    with ContainerdBench(SCRATCH, tmp_path_factory.mktemp("oci")) as bench:
        bench.push(*hello, "hello")
        yield bench


def _no_containers(bench: ContainerdBench) -> None:
    left = bench.containerd.leftovers()
    assert left["containers"] == [] and left["tasks"] == []


@needs_containerd
@pytest.mark.root
def test_hello_pulls_cold_and_is_ready(ctrd: ContainerdBench, hello: tuple[LocalStore, str], tmp_path: Path) -> None:
    ctx = modes.Context("file:///unused", tmp_path, containerd=ctrd)
    records = [modes.run_containerd(ctx, WORKLOADS["hello"], hello[1], rep) for rep in range(2)]
    for rec in records:
        assert rec.ok, rec.error
        assert 0 < rec.phases["pull"] < rec.ready_s == rec.phases["ready"] <= rec.phases["exit"]
        # measured from the content store the pull filled: the layout's manifest, config and
        # layer, each once (what was pushed), and more than the tiny manifest and config alone
        assert (rec.bytes_fetched, rec.fetches) == (ctrd.images[hello[1]].total_bytes, 3)
        assert rec.bytes_fetched > 500_000
    _no_containers(ctrd)
    assert ctrd.containerd.leftovers()["images"] == [ctrd.images[hello[1]].ref]


@needs_containerd
@pytest.mark.root
def test_cold_reset_empties_containerd(ctrd: ContainerdBench, hello: tuple[LocalStore, str]) -> None:
    ctrd.containerd.ctr("images", "pull", "--plain-http", ctrd.images[hello[1]].ref)
    make_cold(ctrd.containerd)
    assert all(v == [] for v in ctrd.containerd.leftovers().values())


@needs_containerd
@pytest.mark.root
def test_failing_command_is_recorded_and_removed(ctrd: ContainerdBench, hello: tuple[LocalStore, str]) -> None:
    make_cold(ctrd.containerd)
    res = pull_and_run(ctrd.containerd, ctrd.images[hello[1]].ref, ["/bin/sh", "-c", "echo nope; exit 3"], READY)
    assert not res.ok and res.exit_code == 3 and "without the ready line" in res.error
    _no_containers(ctrd)


@needs_containerd
@pytest.mark.root
def test_hung_container_is_killed_at_the_timeout(ctrd: ContainerdBench, hello: tuple[LocalStore, str]) -> None:
    make_cold(ctrd.containerd)
    res = pull_and_run(ctrd.containerd, ctrd.images[hello[1]].ref, ["/bin/sleep", "600"], READY, timeout=2)
    assert not res.ok and "timed out" in res.error
    _no_containers(ctrd)


@needs_containerd
@pytest.mark.root
def test_close_leaves_no_process_mount_or_directory(hello: tuple[LocalStore, str], tmp_path: Path) -> None:
    with ContainerdBench(SCRATCH, tmp_path / "oci") as bench:
        bench.push(*hello, "hello")
        res = pull_and_run(bench.containerd, bench.images[hello[1]].ref, ["/bin/echo", "ready"], READY)
        assert res.ok, res.error
        pids = [p.pid for p in (bench.containerd.proc, bench.registry.proc) if p is not None]
        workdir, socket = bench.workdir, bench.containerd.socket
    assert len(pids) == 2 and not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert shim_pids(socket) == []
    assert not workdir.exists()
    assert [m for m in mount_points() if m.startswith(str(workdir))] == []


def _plan(modes_: list[str], tmp_path: Path) -> suite.Plan:
    return suite.Plan([WORKLOADS["hello"]], modes_, 1, "loopback", tmp_path, None)


def test_suite_skips_the_mode_without_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("bench.containerd.missing_tools", lambda: ["containerd"])
    plan = _plan(["native", "containerd"], tmp_path)
    notes = suite._drop_unavailable_modes(plan)
    assert plan.modes == ["native"] and "containerd not installed" in notes[0]
    with pytest.raises(SystemExit, match="nothing to run"):
        suite._drop_unavailable_modes(_plan(["containerd"], tmp_path))

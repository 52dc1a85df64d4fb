"""GPU discovery and injection, fed a fake host tree (mknod'd 195:N nodes, stub driver libraries) and a
fake NVML through the same code a real host uses; then a real runc container must see exactly that."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner.edits import DeviceNode
from runner.errors import GpuError
from runner.gpu import (GpuHost, GpuInfo, container_lib_dir, discover, driver_binaries, driver_version,
                        parse_capabilities, plan_gpus, select_gpus)
from tests.fixtures.runner import RunnerEnv, busybox_root, needs_runc, runner_env  # noqa: F401

VERSION = "535.104.05"
LIBDIR = "usr/lib/x86_64-linux-gnu"
UVM_MAJOR = 237
UUID0 = "GPU-11111111-2222-3333-4444-555555555555"
UUID1 = "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"


class FakeNvml:
    """The slice of pynvml the runner uses. GPU index 0 has minor 3 (index is not minor); strings are
    bytes for one GPU and str for the other, as pynvml versions differ."""

    class NVMLError(Exception):
        pass

    class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801 - pynvml's name
        pass

    @dataclass
    class Memory:
        total: int

    def __init__(self, fail: Exception | None = None) -> None:
        self.gpus = [(UUID0.encode(), 3, b"Fake H200", 141 << 30), (UUID1, 0, "Fake H200", 141 << 30)]
        self.fail = fail
        self.open = False

    def nvmlInit(self) -> None:  # noqa: N802
        if self.fail:
            raise self.fail
        self.open = True

    def nvmlShutdown(self) -> None:  # noqa: N802
        self.open = False

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:  # noqa: N802
        return i

    def nvmlDeviceGetUUID(self, h: int) -> bytes | str:  # noqa: N802
        return self.gpus[h][0]

    def nvmlDeviceGetMinorNumber(self, h: int) -> int:  # noqa: N802
        return self.gpus[h][1]

    def nvmlDeviceGetName(self, h: int) -> bytes | str:  # noqa: N802
        return self.gpus[h][2]

    def nvmlDeviceGetMemoryInfo(self, h: int) -> FakeNvml.Memory:  # noqa: N802
        return self.Memory(self.gpus[h][3])

    def nvmlSystemGetDriverVersion(self) -> str:  # noqa: N802
        return VERSION


def _mknod(path: Path, major: int, minor: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))


def _lib(root: Path, name: str, soname_link: str | None = None) -> None:
    (root / LIBDIR).mkdir(parents=True, exist_ok=True)
    (root / LIBDIR / name).write_text(f"stub {name}\n")
    if soname_link:
        (root / LIBDIR / soname_link).symlink_to(name)


def _elf_lib(root: Path, name: str, soname: str, tmp: Path) -> bool:
    """A real shared object whose DT_SONAME differs from any symlink (tests the ELF reader)."""
    if shutil.which("gcc") is None:
        return False
    (tmp / "a.c").write_text("int nv_stub(void) { return 1; }\n")
    built = subprocess.run(["gcc", "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(root / LIBDIR / name),
                            str(tmp / "a.c")], capture_output=True)
    return built.returncode == 0


@pytest.fixture
def fake_host(tmp_path: Path) -> GpuHost:
    root = tmp_path / "host"
    for minor in (0, 1, 3):
        _mknod(root / "dev" / f"nvidia{minor}", 195, minor)
    _mknod(root / "dev" / "nvidiactl", 195, 255)
    _mknod(root / "dev" / "nvidia-modeset", 195, 254)
    _mknod(root / "dev" / "nvidia-uvm", UVM_MAJOR, 0)
    _mknod(root / "dev" / "nvidia-uvm-tools", UVM_MAJOR, 1)
    (root / "proc/driver/nvidia").mkdir(parents=True)
    (root / "proc/driver/nvidia/version").write_text(
        f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {VERSION}  Sat Aug 19 01:15:15 UTC 2023\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n")
    _lib(root, f"libcuda.so.{VERSION}", "libcuda.so.1")
    _lib(root, f"libnvidia-ml.so.{VERSION}", "libnvidia-ml.so.1")
    _lib(root, f"libnvidia-ptxjitcompiler.so.{VERSION}", "libnvidia-ptxjitcompiler.so.1")
    _lib(root, f"libnvidia-nvvm.so.{VERSION}", "libnvidia-nvvm.so.4")
    _lib(root, f"libnvidia-encode.so.{VERSION}", "libnvidia-encode.so.1")    # video: not by default
    _lib(root, f"libEGL_nvidia.so.{VERSION}", "libEGL_nvidia.so.0")          # graphics: not by default
    _lib(root, "libnvidia-ml.so.999.1")                                     # another driver version
    _lib(root, "libz.so.1")                                                 # not a driver library
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: Fake H200 (from stub)'\n")
    os.chmod(root / "usr/bin/nvidia-smi", 0o755)
    return GpuHost(root=root, nvml=FakeNvml())


def _host_with_elf(fake_host: GpuHost, tmp_path: Path) -> bool:
    return _elf_lib(fake_host.root, f"libnvidia-allocator.so.{VERSION}", "libnvidia-allocator.so.1", tmp_path)


# -- discovery and selection -----------------------------------------------------------------------

@pytest.mark.parametrize("line", [
    f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {VERSION}  Sat Aug 19 01:15:15 UTC 2023",
    f"NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {VERSION}  Release Build  (dvs-builder@U16)",
])
def test_driver_version_formats(tmp_path: Path, line: str) -> None:
    (tmp_path / "proc/driver/nvidia").mkdir(parents=True)
    (tmp_path / "proc/driver/nvidia/version").write_text(line + "\n")
    assert driver_version(GpuHost(root=tmp_path)) == VERSION
    assert driver_version(GpuHost(root=tmp_path / "none")) is None


def test_discover_reads_nvml(fake_host: GpuHost) -> None:
    driver = discover(fake_host)
    assert driver.version == VERSION
    assert driver.gpus == (GpuInfo(0, UUID0, 3, "Fake H200", 141 << 30), GpuInfo(1, UUID1, 0, "Fake H200", 141 << 30))
    assert not fake_host.nvml.open


def test_discover_without_driver_library_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GpuError, match="no NVIDIA driver"):
        discover(GpuHost(root=tmp_path, nvml=FakeNvml(fail=FakeNvml.NVMLError_LibraryNotFound())))


@pytest.mark.may_skip
def test_discover_with_the_real_nvml_on_a_host_without_gpus(tmp_path: Path) -> None:
    if Path("/proc/driver/nvidia/version").exists():
        pytest.skip("this host has an NVIDIA driver")
    with pytest.raises(GpuError, match="no NVIDIA driver|not loaded"):
        discover(GpuHost(root=tmp_path))


def test_select_gpus() -> None:
    gpus = discover(GpuHost(nvml=FakeNvml(), root=Path("/nonexistent"))).gpus
    assert select_gpus(gpus, "all") == list(gpus)
    assert select_gpus(gpus, "none") == [] and select_gpus(gpus, "void") == []
    assert select_gpus(gpus, "1") == [gpus[1]]
    assert select_gpus(gpus, f"{UUID1},0") == [gpus[1], gpus[0]]
    assert select_gpus(gpus, "GPU-1111") == [gpus[0]]
    assert select_gpus(gpus, "device=0") == [gpus[0]]
    with pytest.raises(GpuError, match="no such GPU: 2"):
        select_gpus(gpus, "2")
    with pytest.raises(GpuError, match="no such GPU: GPU-ffff"):
        select_gpus(gpus, "GPU-ffff")


def test_capabilities() -> None:
    assert parse_capabilities(None) == {"utility", "compute"}
    assert "graphics" in parse_capabilities("all")
    with pytest.raises(GpuError, match="bogus"):
        parse_capabilities("compute,bogus")


# -- the plan ---------------------------------------------------------------------------------------

def _names(plan_mounts: list[tuple[str, str]]) -> dict[str, str]:
    return {Path(dest).name: Path(src).name for src, dest in plan_mounts}


def test_plan_all_gpus(fake_host: GpuHost, tmp_path: Path) -> None:
    elf = _host_with_elf(fake_host, tmp_path)
    edits = plan_gpus("all", [], [], fake_host).edits(tmp_path / "empty-rootfs")
    assert [(d.path, d.major, d.minor) for d in edits.devices] == [
        ("/dev/nvidia3", 195, 3), ("/dev/nvidia0", 195, 0), ("/dev/nvidiactl", 195, 255),
        ("/dev/nvidia-uvm", UVM_MAJOR, 0), ("/dev/nvidia-uvm-tools", UVM_MAJOR, 1)]
    mounts = {m.container_path: m for m in edits.mounts}
    libs = {Path(p).name: Path(m.host_path).name for p, m in mounts.items() if p.startswith("/usr/lib/")}
    expected = {f"libcuda.so.{VERSION}": f"libcuda.so.{VERSION}", "libcuda.so.1": f"libcuda.so.{VERSION}",
                "libcuda.so": f"libcuda.so.{VERSION}",
                f"libnvidia-ml.so.{VERSION}": f"libnvidia-ml.so.{VERSION}", "libnvidia-ml.so.1": f"libnvidia-ml.so.{VERSION}",
                f"libnvidia-ptxjitcompiler.so.{VERSION}": f"libnvidia-ptxjitcompiler.so.{VERSION}",
                "libnvidia-ptxjitcompiler.so.1": f"libnvidia-ptxjitcompiler.so.{VERSION}",
                f"libnvidia-nvvm.so.{VERSION}": f"libnvidia-nvvm.so.{VERSION}", "libnvidia-nvvm.so.4": f"libnvidia-nvvm.so.{VERSION}"}
    if elf:
        expected |= {f"libnvidia-allocator.so.{VERSION}": f"libnvidia-allocator.so.{VERSION}",
                     "libnvidia-allocator.so.1": f"libnvidia-allocator.so.{VERSION}"}
    assert libs == expected
    assert all("ro" in m.options for m in mounts.values())
    assert mounts["/usr/bin/nvidia-smi"].host_path == str(fake_host.root / "usr/bin/nvidia-smi")
    assert edits.env == {"NVIDIA_VISIBLE_DEVICES": f"{UUID0},{UUID1}", "NVIDIA_DRIVER_CAPABILITIES": "compute,utility"}


def test_a_driver_binary_beats_a_script_that_wraps_it(fake_host: GpuHost, tmp_path: Path) -> None:
    """As on the GPU host the device check ran on: /usr/bin/nvidia-smi is a script that execs
    the driver's own copy from a directory of its own; the container gets the ELF binary."""
    real = fake_host.root / "usr/local/nvidia/bin/nvidia-smi"
    real.parent.mkdir(parents=True)
    real.write_bytes(b"\x7fELF" + bytes(60))
    os.chmod(real, 0o755)
    mounts = {m.container_path: m for m in driver_binaries(fake_host, frozenset({"utility"}))}
    assert mounts["/usr/bin/nvidia-smi"].host_path == str(real)
    real.unlink()  # only the script left: it is still what there is
    mounts = {m.container_path: m for m in driver_binaries(fake_host, frozenset({"utility"}))}
    assert mounts["/usr/bin/nvidia-smi"].host_path == str(fake_host.root / "usr/bin/nvidia-smi")


def test_plan_follows_capabilities_and_env(fake_host: GpuHost, tmp_path: Path) -> None:
    plan = plan_gpus("all", ["NVIDIA_VISIBLE_DEVICES=1"], ["NVIDIA_DRIVER_CAPABILITIES=utility,display,video"],
                     fake_host)
    edits = plan.edits(tmp_path)
    assert [d.path for d in edits.devices] == ["/dev/nvidia0", "/dev/nvidiactl", "/dev/nvidia-uvm",
                                               "/dev/nvidia-uvm-tools", "/dev/nvidia-modeset"]
    names = {Path(m.container_path).name for m in edits.mounts}
    assert "libnvidia-encode.so.1" in names and "libnvidia-ml.so.1" in names
    assert "libcuda.so.1" not in names and "libEGL_nvidia.so.0" not in names
    assert edits.env["NVIDIA_VISIBLE_DEVICES"] == UUID1


def test_plan_none_and_void(fake_host: GpuHost, tmp_path: Path) -> None:
    none = plan_gpus("none", [], [], fake_host).edits(tmp_path)
    assert [d.path for d in none.devices] == ["/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"]
    assert none.env["NVIDIA_VISIBLE_DEVICES"] == "none"
    void = plan_gpus("all", ["NVIDIA_VISIBLE_DEVICES=void"], [], fake_host).edits(tmp_path)
    assert (void.devices, void.mounts, void.env) == ([], [], {})


def test_plan_missing_device_node(fake_host: GpuHost) -> None:
    (fake_host.root / "dev" / "nvidia3").unlink()
    with pytest.raises(GpuError, match="/dev/nvidia3 does not exist"):
        plan_gpus("0", [], [], fake_host)


def test_container_lib_dir(tmp_path: Path) -> None:
    assert container_lib_dir(tmp_path) == "/usr/lib/x86_64-linux-gnu"
    (tmp_path / "usr/lib64").mkdir(parents=True)
    assert container_lib_dir(tmp_path) == "/usr/lib64"
    (tmp_path / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    assert container_lib_dir(tmp_path) == "/usr/lib/x86_64-linux-gnu"


# -- CDI --------------------------------------------------------------------------------------------

def _cdi_spec(host: GpuHost) -> dict[str, object]:
    lib = f"/{LIBDIR}/libcuda.so.{VERSION}"
    return {
        "cdiVersion": "0.5.0", "kind": "nvidia.com/gpu",
        "devices": [
            {"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia3"}]}},
            {"name": UUID1, "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0", "type": "c",
                                                                "major": 195, "minor": 0}]}},
        ],
        "containerEdits": {
            "env": ["NVIDIA_VISIBLE_DEVICES=void", "CDI_MARK=1"],
            "deviceNodes": [{"path": "/dev/nvidiactl"}, {"path": "/dev/nvidia-uvm", "permissions": "rw"}],
            "mounts": [{"hostPath": lib, "containerPath": "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
                        "options": ["ro", "nosuid", "nodev", "bind"]}],
            "hooks": [{"hookName": "createContainer", "path": "/usr/bin/nvidia-ctk", "args": ["nvidia-ctk", "hook"]}],
        },
    }


def _write_cdi(host: GpuHost, rel: str, doc: dict[str, object]) -> Path:
    path = host.root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def test_cdi_device_by_name(fake_host: GpuHost, tmp_path: Path) -> None:
    _write_cdi(fake_host, "etc/cdi/nvidia.json", _cdi_spec(fake_host))
    edits = plan_gpus("nvidia.com/gpu=0", [], [], fake_host).edits(tmp_path)
    assert edits.devices == [DeviceNode("/dev/nvidiactl", "c", 195, 255),
                             DeviceNode("/dev/nvidia-uvm", "c", UVM_MAJOR, 0, "rw"),
                             DeviceNode("/dev/nvidia3", "c", 195, 3)]
    assert edits.env["CDI_MARK"] == "1"
    assert [m.container_path for m in edits.mounts] == ["/usr/lib/x86_64-linux-gnu/libcuda.so.1"]
    assert edits.mounts[0].host_path == str(fake_host.root / LIBDIR / f"libcuda.so.{VERSION}")
    assert edits.hooks == {"createContainer": [{"path": "/usr/bin/nvidia-ctk", "args": ["nvidia-ctk", "hook"]}]}


def test_cdi_all_and_lists(fake_host: GpuHost, tmp_path: Path) -> None:
    _write_cdi(fake_host, "etc/cdi/nvidia.json", _cdi_spec(fake_host))
    every = plan_gpus("nvidia.com/gpu=all", [], [], fake_host).edits(tmp_path)
    both = plan_gpus(f"nvidia.com/gpu=0,{UUID1}", [], [], fake_host).edits(tmp_path)
    assert {d.path for d in every.devices} == {d.path for d in both.devices} == {
        "/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia3", "/dev/nvidia0"}


def test_cdi_errors(fake_host: GpuHost) -> None:
    with pytest.raises(GpuError, match="no CDI spec for nvidia.com/gpu"):
        plan_gpus("nvidia.com/gpu=0", [], [], fake_host)
    _write_cdi(fake_host, "etc/cdi/nvidia.json", _cdi_spec(fake_host))
    with pytest.raises(GpuError, match=r"no CDI device nvidia.com/gpu=7 \(known: 0, GPU-"):
        plan_gpus("nvidia.com/gpu=7", [], [], fake_host)


def test_cdi_run_dir_takes_priority(fake_host: GpuHost, tmp_path: Path) -> None:
    _write_cdi(fake_host, "etc/cdi/nvidia.json", _cdi_spec(fake_host))
    newer = _cdi_spec(fake_host)
    newer["containerEdits"] = {"env": ["WHICH=run"]}
    _write_cdi(fake_host, "var/run/cdi/nvidia.json", newer)
    assert plan_gpus("nvidia.com/gpu=0", [], [], fake_host).edits(tmp_path).env == {"WHICH": "run"}


def test_cdi_yaml(fake_host: GpuHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml
    path = fake_host.root / "etc/cdi/nvidia.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(_cdi_spec(fake_host), default_flow_style=False))  # block style: not JSON
    assert not path.read_text().lstrip().startswith("{")
    # the default loader (PyYAML's safe_load) reads it
    assert plan_gpus("nvidia.com/gpu=0", [], [], fake_host).edits(tmp_path).env["CDI_MARK"] == "1"
    # a host loader given instead is the one used
    seen: list[str] = []
    loader_host = GpuHost(root=fake_host.root, yaml_load=lambda text: seen.append(text) or yaml.safe_load(text))
    assert plan_gpus("nvidia.com/gpu=0", [], [], loader_host).edits(tmp_path).env["CDI_MARK"] == "1"
    assert seen
    # without PyYAML a YAML spec is a clear error, not a crash
    monkeypatch.setitem(sys.modules, "yaml", None)
    with pytest.raises(GpuError, match="PyYAML is not installed"):
        plan_gpus("nvidia.com/gpu=0", [], [], fake_host)


# -- real containers --------------------------------------------------------------------------------

PROBE = ("ls /dev | grep nvidia; echo --; ls /usr/lib/x86_64-linux-gnu; echo --; "
         "cat /usr/lib/x86_64-linux-gnu/libcuda.so; echo $NVIDIA_VISIBLE_DEVICES $NVIDIA_DRIVER_CAPABILITIES; "
         "nvidia-smi; head -c1 /dev/nvidia3; mknod /dev/other c 195 0 && head -c1 /dev/other; "
         "head -c1 /dev/nvidiactl; true")


@needs_runc
@pytest.mark.root
def test_container_sees_exactly_the_requested_gpu(runner_env: RunnerEnv, fake_host: GpuHost) -> None:
    cap = runner_env.run("sh", "-c", PROBE, gpus="0", gpu_host=fake_host)
    devs, libs, rest = cap.out.split("--\n")
    assert devs.split() == ["nvidia-uvm", "nvidia-uvm-tools", "nvidia3", "nvidiactl"]
    assert sorted(libs.split()) == sorted([
        "libcuda.so", "libcuda.so.1", f"libcuda.so.{VERSION}", "libnvidia-ml.so.1", f"libnvidia-ml.so.{VERSION}",
        "libnvidia-nvvm.so.4", f"libnvidia-nvvm.so.{VERSION}", "libnvidia-ptxjitcompiler.so.1",
        f"libnvidia-ptxjitcompiler.so.{VERSION}"])
    assert rest.splitlines() == [f"stub libcuda.so.{VERSION}", f"{UUID0} compute,utility",
                                 "GPU 0: Fake H200 (from stub)"]
    errors = cap.err.splitlines()
    # Given nodes open as far as the (absent) driver: ENXIO. A node not given is refused: EPERM.
    assert "head: /dev/nvidia3: No such device or address" in errors
    assert "head: /dev/other: Operation not permitted" in errors
    assert "head: /dev/nvidiactl: No such device or address" in errors


@needs_runc
@pytest.mark.root
def test_container_without_gpus_sees_none(runner_env: RunnerEnv) -> None:
    cap = runner_env.run("sh", "-c", "ls /dev | grep -c nvidia; mknod /dev/n c 195 255 && head -c1 /dev/n")
    assert cap.out == "0\n" and "Operation not permitted" in cap.err


@needs_runc
@pytest.mark.root
def test_cdi_device_in_a_container(runner_env: RunnerEnv, fake_host: GpuHost) -> None:
    spec = _cdi_spec(fake_host)
    del spec["containerEdits"]["hooks"]  # type: ignore[attr-defined]
    _write_cdi(fake_host, "etc/cdi/nvidia.json", spec)
    cap = runner_env.run("sh", "-c", "ls /dev | grep nvidia; cat /usr/lib/x86_64-linux-gnu/libcuda.so.1; echo $CDI_MARK",
                         gpus="nvidia.com/gpu=0", gpu_host=fake_host)
    assert cap.out.split() == ["nvidia-uvm", "nvidia3", "nvidiactl", "stub", f"libcuda.so.{VERSION}", "1"]


@needs_runc
@pytest.mark.root
@pytest.mark.parametrize("gpus", ["all", "nvidia.com/gpu=0", "5"])
def test_gpu_errors_stop_the_run_before_anything_starts(runner_env: RunnerEnv, tmp_path: Path, gpus: str) -> None:
    host = GpuHost(root=tmp_path / "no-driver")  # the real pynvml: no driver library on this host
    if gpus == "5":
        host = GpuHost(root=tmp_path / "no-driver", nvml=FakeNvml())
    with pytest.raises(GpuError):
        runner_env.run("true", gpus=gpus, gpu_host=host)
    assert not (runner_env.state_dir / "containers").exists() or not any((runner_env.state_dir / "containers").iterdir())
    assert not runner_env.layers_dir.exists()

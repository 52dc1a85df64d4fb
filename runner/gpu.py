"""NVIDIA GPUs without NVIDIA's container runtime: discovery (NVML), selection, and the spec edits.

Everything that touches the host goes through GpuHost (its root directory, an NVML-like module, the
CDI directories), so tests feed a fake GPU list and a fake host tree through the same code.
"""
from __future__ import annotations

import os
import platform
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.edits import BindMount, DeviceNode, SpecEdits
from runner.elf import soname
from runner.errors import GpuError
from runner.users import secure_join

ALL_CAPS = frozenset({"compute", "compat32", "graphics", "utility", "video", "display", "ngx"})
DEFAULT_CAPS = "utility,compute"
_LIB_CAPS = {  # library name prefix (before ".so") -> capability
    "libnvidia-ml": "utility", "libnvidia-cfg": "utility",
    "libcuda": "compute", "libcudadebugger": "compute", "libnvidia-opencl": "compute",
    "libnvidia-ptxjitcompiler": "compute", "libnvidia-nvvm": "compute", "libnvidia-gpucomp": "compute",
    "libnvidia-allocator": "compute", "libnvidia-pkcs11": "compute", "libnvidia-pkcs11-openssl3": "compute",
    "libnvidia-encode": "video", "libnvcuvid": "video", "libvdpau_nvidia": "video",
    "libnvidia-opticalflow": "video",
    "libnvidia-eglcore": "graphics", "libnvidia-glcore": "graphics", "libnvidia-tls": "graphics",
    "libnvidia-glsi": "graphics", "libnvidia-fbc": "graphics", "libnvidia-rtcore": "graphics",
    "libnvoptix": "graphics", "libGLX_nvidia": "graphics", "libEGL_nvidia": "graphics",
    "libGLESv2_nvidia": "graphics", "libGLESv1_CM_nvidia": "graphics", "libnvidia-glvkspirv": "graphics",
    "libnvidia-ngx": "ngx",
}
_BIN_CAPS = {"nvidia-smi": "utility", "nvidia-debugdump": "utility", "nvidia-persistenced": "utility",
             "nvidia-cuda-mps-control": "compute", "nvidia-cuda-mps-server": "compute"}
_LIB_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu", "usr/lib64", "usr/lib",
             "lib/x86_64-linux-gnu", "lib64", "usr/lib/x86_64-linux-gnu/nvidia/current", "usr/local/nvidia/lib64")
_BIN_DIRS = ("usr/bin", "usr/local/bin", "bin", "usr/sbin", "usr/local/nvidia/bin")
_VERSION = re.compile(r"Kernel Module\b.*?\s(\d+\.\d+(?:\.\d+)?)(?:\s|$)", re.MULTILINE)


@dataclass(frozen=True)
class GpuHost:
    """Where GPU facts come from. root: the host's '/' (a fake tree in tests); nvml: a pynvml-like module."""

    root: Path = Path("/")
    nvml: Any = None
    cdi_dirs: tuple[str, ...] = ("etc/cdi", "var/run/cdi")
    lib_dirs: tuple[str, ...] = _LIB_DIRS
    bin_dirs: tuple[str, ...] = _BIN_DIRS
    yaml_load: Callable[[str], Any] | None = None

    def path(self, host_path: str) -> Path:
        return self.root / host_path.lstrip("/")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    uuid: str
    minor: int
    name: str
    memory_total: int


@dataclass(frozen=True)
class DriverInfo:
    version: str
    gpus: tuple[GpuInfo, ...]


@dataclass(frozen=True)
class HostLibrary:
    """A driver file to bind-mount read-only under each of `names` in the container's library dir."""

    host_path: str
    names: tuple[str, ...]


@dataclass
class GpuPlan:
    """Edits decided before anything starts; libraries are placed once the image root is known."""

    base: SpecEdits = field(default_factory=SpecEdits)
    libraries: list[HostLibrary] = field(default_factory=list)

    def edits(self, rootfs: Path) -> SpecEdits:
        out = SpecEdits()
        out.extend(self.base)
        libdir = container_lib_dir(rootfs)
        out.extend(SpecEdits(mounts=[BindMount(lib.host_path, f"{libdir}/{name}")
                                     for lib in self.libraries for name in lib.names]))
        return out


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def driver_version(host: GpuHost) -> str | None:
    """The kernel module's version from /proc/driver/nvidia/version, or None without a driver."""
    try:
        text = host.path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = _VERSION.search(text)
    return match.group(1) if match else None


def _load_nvml(host: GpuHost) -> Any:
    if host.nvml is not None:
        return host.nvml
    try:
        import pynvml
    except ImportError as exc:
        raise GpuError("--gpus needs nvidia-ml-py (pynvml), which is not installed") from exc
    return pynvml


def discover(host: GpuHost) -> DriverInfo:
    """List the GPUs through NVML; GpuError with a clear message when there is no usable driver."""
    nvml = _load_nvml(host)
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise GpuError(_nvml_init_message(nvml, exc)) from None
    try:
        gpus = tuple(_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount()))
        version = driver_version(host) or _text(nvml.nvmlSystemGetDriverVersion())
    except nvml.NVMLError as exc:
        raise GpuError(f"NVML failed while listing GPUs: {exc}") from None
    finally:
        nvml.nvmlShutdown()
    return DriverInfo(version, gpus)


def _nvml_init_message(nvml: Any, exc: Exception) -> str:
    if isinstance(exc, getattr(nvml, "NVMLError_LibraryNotFound", ())):
        return "--gpus: no NVIDIA driver on this host (libnvidia-ml.so.1 not found)"
    if isinstance(exc, getattr(nvml, "NVMLError_DriverNotLoaded", ())):
        return "--gpus: the NVIDIA kernel driver is not loaded"
    return f"--gpus: NVML could not start: {exc}"


def _gpu(nvml: Any, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    return GpuInfo(index, _text(nvml.nvmlDeviceGetUUID(handle)), int(nvml.nvmlDeviceGetMinorNumber(handle)),
                   _text(nvml.nvmlDeviceGetName(handle)), int(nvml.nvmlDeviceGetMemoryInfo(handle).total))


def select_gpus(gpus: Sequence[GpuInfo], selector: str) -> list[GpuInfo]:
    """all | none | void | comma-separated indexes and/or UUIDs (GPU-...), as NVIDIA_VISIBLE_DEVICES."""
    selector = selector.strip().removeprefix("device=")
    if selector == "all":
        return list(gpus)
    if selector in ("none", "void", ""):
        return []
    chosen = []
    for item in (s.strip() for s in selector.split(",")):
        match = [g for g in gpus if (item.isdigit() and g.index == int(item)) or g.uuid == item
                 or (item.startswith("GPU-") and g.uuid.startswith(item))]
        if len(match) != 1:
            raise GpuError(f"--gpus: no such GPU: {item} (this host has {_describe(gpus)})")
        if match[0] not in chosen:
            chosen.append(match[0])
    return chosen


def _describe(gpus: Sequence[GpuInfo]) -> str:
    if not gpus:
        return "no GPUs"
    return ", ".join(f"{g.index}: {g.name} {g.uuid}" for g in gpus)


def parse_capabilities(value: str | None) -> frozenset[str]:
    names = {c.strip() for c in (value or DEFAULT_CAPS).split(",") if c.strip()}
    if "all" in names:
        return ALL_CAPS
    unknown = names - ALL_CAPS
    if unknown:
        raise GpuError(f"unknown NVIDIA_DRIVER_CAPABILITIES: {', '.join(sorted(unknown))}")
    return frozenset(names)


def device_node(host: GpuHost, path: str) -> DeviceNode | None:
    """The host's char device at path (major and minor by stat), or None if it is absent."""
    try:
        st = os.stat(host.path(path))
    except FileNotFoundError:
        return None
    if not stat.S_ISCHR(st.st_mode):
        raise GpuError(f"{path} is not a character device")
    return DeviceNode(path, "c", os.major(st.st_rdev), os.minor(st.st_rdev))


def nvidia_devices(host: GpuHost, gpus: Sequence[GpuInfo], caps: frozenset[str]) -> list[DeviceNode]:
    nodes = []
    for gpu in gpus:
        node = device_node(host, f"/dev/nvidia{gpu.minor}")
        if node is None:
            raise GpuError(f"GPU {gpu.index} ({gpu.uuid}): /dev/nvidia{gpu.minor} does not exist")
        nodes.append(node)
    ctl = device_node(host, "/dev/nvidiactl")
    if ctl is None:
        raise GpuError("/dev/nvidiactl does not exist: is the NVIDIA driver loaded?")
    extras = ["/dev/nvidia-uvm", "/dev/nvidia-uvm-tools"] + (["/dev/nvidia-modeset"] if "display" in caps else [])
    return nodes + [ctl] + [n for n in (device_node(host, p) for p in extras) if n is not None]


def driver_libraries(host: GpuHost, version: str, caps: frozenset[str]) -> list[HostLibrary]:
    """Driver libraries (file names ending in the driver version) for the capabilities, with their names."""
    pattern = re.compile(r"(lib[^/]+?)\.so\." + re.escape(version))
    found: dict[str, HostLibrary] = {}
    for libdir in host.lib_dirs:
        directory = host.path(libdir)
        if not directory.is_dir():
            continue
        for entry in sorted(directory.iterdir()):
            match = pattern.fullmatch(entry.name)
            if match and entry.name not in found and _LIB_CAPS.get(match.group(1)) in caps and entry.is_file():
                found[entry.name] = HostLibrary(str(entry), _library_names(entry, match.group(1)))
    return list(found.values())


def _library_names(path: Path, stem: str) -> tuple[str, ...]:
    names = [path.name]
    so = soname(path) or _soname_from_links(path)
    if so and so not in names:
        names.append(so)
    if stem == "libcuda":
        names.append("libcuda.so")
    return tuple(names)


def _soname_from_links(path: Path) -> str | None:
    """Without a readable DT_SONAME: the sibling symlink (as ldconfig made it) that points at path."""
    for sibling in sorted(path.parent.glob(path.name.split(".so.")[0] + ".so.*")):
        if sibling.is_symlink() and sibling.resolve() == path.resolve():
            return sibling.name
    return None


def driver_binaries(host: GpuHost, caps: frozenset[str]) -> list[BindMount]:
    mounts = []
    for name, cap in _BIN_CAPS.items():
        if cap not in caps:
            continue
        found = _driver_binary(host, name)
        if found is not None:
            mounts.append(BindMount(str(found), f"/usr/bin/{name}",
                                    ("rbind", "rprivate", "ro", "nosuid", "nodev")))
    socket = host.path("/run/nvidia-persistenced/socket")
    if socket.exists():
        mounts.append(BindMount(str(socket), "/run/nvidia-persistenced/socket",
                                ("rbind", "rprivate", "nosuid", "nodev", "noexec")))
    return mounts


def _driver_binary(host: GpuHost, name: str) -> Path | None:
    """The first executable file of that name in the host's binary dirs, an ELF binary before a
    script: a host may wrap the driver's tool in a script that execs it from a directory the
    container does not have (seen on a GPU host here: /usr/bin/nvidia-smi is `exec
    /usr/local/nvidia/bin/nvidia-smi`, a mount of its own that an overlay of / does not show)."""
    first: Path | None = None
    for bindir in host.bin_dirs:
        candidate = host.path(f"{bindir}/{name}")
        if not candidate.is_file():
            continue
        try:
            with open(candidate, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    return candidate
        except OSError:
            continue
        first = first or candidate
    return first


def container_lib_dir(rootfs: Path) -> str:
    """Where the image's loader looks: the Debian-style multiarch dir, else /usr/lib64."""
    multiarch = {"aarch64": "aarch64-linux-gnu"}.get(platform.machine(), "x86_64-linux-gnu")
    for candidate in (f"/usr/lib/{multiarch}", "/usr/lib64"):
        if secure_join(rootfs, candidate).is_dir():
            return candidate
    return f"/usr/lib/{multiarch}"


def _env_value(env: Sequence[str], key: str) -> str | None:
    value = None
    for item in env:
        k, sep, v = item.partition("=")
        if k == key and sep:
            value = v
    return value


def plan_gpus(request: str, cli_env: Sequence[str], image_env: Sequence[str], host: GpuHost) -> GpuPlan:
    """Everything --gpus needs, checked now: fails with GpuError before any container exists.

    A CDI name (vendor/class=name) is looked up in the CDI specs. Otherwise the GPUs are listed through
    NVML and chosen by `request`, or by NVIDIA_VISIBLE_DEVICES given with --env; the capabilities come
    from NVIDIA_DRIVER_CAPABILITIES (--env, then the image, default utility,compute).
    """
    if "=" in request and "/" in request.split("=", 1)[0]:
        from runner.cdi import cdi_edits
        return GpuPlan(base=cdi_edits(request, host))
    selector = _env_value(cli_env, "NVIDIA_VISIBLE_DEVICES") or request
    caps = parse_capabilities(_env_value(cli_env, "NVIDIA_DRIVER_CAPABILITIES")
                              or _env_value(image_env, "NVIDIA_DRIVER_CAPABILITIES"))
    if selector.strip() == "void":
        return GpuPlan()
    driver = discover(host)
    gpus = select_gpus(driver.gpus, selector)
    env = {"NVIDIA_VISIBLE_DEVICES": ",".join(g.uuid for g in gpus) or "none",
           "NVIDIA_DRIVER_CAPABILITIES": ",".join(sorted(caps))}
    base = SpecEdits(devices=nvidia_devices(host, gpus, caps), mounts=driver_binaries(host, caps), env=env)
    return GpuPlan(base, driver_libraries(host, driver.version, caps))

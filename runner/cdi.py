"""Container Device Interface: read CDI specs (JSON, or YAML with PyYAML) and turn a device name into edits."""
from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.edits import BindMount, DeviceNode, SpecEdits
from runner.errors import GpuError

Spec = dict[str, Any]
_DEFAULT_MOUNT_OPTIONS = ("rbind", "rprivate")


def _yaml_loader(host_loader: Callable[[str], Any] | None) -> Callable[[str], Any] | None:
    if host_loader is not None:
        return host_loader
    try:
        import yaml  # type: ignore[import-untyped]
    except ImportError:
        return None
    return yaml.safe_load  # type: ignore[no-any-return]


def load_specs(dirs: list[Path], yaml_load: Callable[[str], Any] | None = None) -> tuple[list[Spec], list[str]]:
    """All specs in dirs, later directories first (they take priority); and the files that were skipped."""
    loader = _yaml_loader(yaml_load)
    specs, skipped = [], []
    for directory in reversed(dirs):
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            spec, problem = _load(path, loader)
            if spec is not None:
                specs.append(spec)
            elif problem:
                skipped.append(f"{path}: {problem}")
    return specs, skipped


def _load(path: Path, loader: Callable[[str], Any] | None) -> tuple[Spec | None, str]:
    if path.suffix not in (".json", ".yaml", ".yml"):
        return None, ""
    try:
        text = path.read_text()
        if path.suffix == ".json":
            doc = json.loads(text)
        elif loader is None:
            return None, "YAML spec, but PyYAML is not installed"
        else:
            doc = loader(text)
    except (OSError, ValueError) as exc:
        return None, str(exc)
    except Exception as exc:  # noqa: BLE001 - a YAML parser's own error types
        return None, f"{type(exc).__name__}: {exc}"
    if not isinstance(doc, dict) or not isinstance(doc.get("kind"), str) or not isinstance(doc.get("devices"), list):
        return None, "not a CDI spec (needs kind and devices)"
    return doc, ""


def parse_request(request: str) -> list[tuple[str, str]]:
    """'nvidia.com/gpu=0,nvidia.com/gpu=1' or 'nvidia.com/gpu=0,1' -> [(kind, name), ...]."""
    out: list[tuple[str, str]] = []
    kind = ""
    for item in (s.strip() for s in request.split(",")):
        if "=" in item:
            kind, _, name = item.partition("=")
        else:
            name = item
        if not kind or "/" not in kind or not name:
            raise GpuError(f"--gpus: not a CDI device name: {request!r} (expected vendor.com/class=name)")
        out.append((kind, name))
    return out


def cdi_edits(request: str, host: Any) -> SpecEdits:
    """The edits for the CDI devices in request, from the specs under host.cdi_dirs."""
    specs, skipped = load_specs([host.path(d) for d in host.cdi_dirs], host.yaml_load)
    edits = SpecEdits()
    for kind, name in parse_request(request):
        spec, devices = _find(specs, kind, name, skipped)
        edits.extend(_edits(spec.get("containerEdits") or {}, host))
        for device in devices:
            edits.extend(_edits(device.get("containerEdits") or {}, host))
    return edits


def _find(specs: list[Spec], kind: str, name: str, skipped: list[str]) -> tuple[Spec, list[dict[str, Any]]]:
    known = []
    for spec in specs:
        if spec["kind"] != kind:
            continue
        devices = [d for d in spec["devices"] if isinstance(d, dict)]
        known += [str(d.get("name")) for d in devices]
        named = [d for d in devices if str(d.get("name")) == name]
        if named:
            return spec, named[:1]
        if name == "all" and devices:
            return spec, devices
    where = f"; skipped: {'; '.join(skipped)}" if skipped else ""
    if not known:
        raise GpuError(f"--gpus: no CDI spec for {kind} in /etc/cdi or /var/run/cdi{where}")
    raise GpuError(f"--gpus: no CDI device {kind}={name} (known: {', '.join(known)}){where}")


def _edits(doc: dict[str, Any], host: Any) -> SpecEdits:
    env = dict(str(e).partition("=")[::2] for e in doc.get("env") or [])
    devices = [_device(d, host) for d in doc.get("deviceNodes") or []]
    mounts = [BindMount(str(host.path(m["hostPath"])), str(m["containerPath"]),
                        tuple(m.get("options") or _DEFAULT_MOUNT_OPTIONS)) for m in doc.get("mounts") or []]
    hooks: dict[str, list[dict[str, object]]] = {}
    for hook in doc.get("hooks") or []:
        entry = {k: hook[k] for k in ("path", "args", "env", "timeout") if k in hook}
        hooks.setdefault(str(hook["hookName"]), []).append(entry)
    return SpecEdits(devices=devices, mounts=mounts, env=env, hooks=hooks)


def _device(doc: dict[str, Any], host: Any) -> DeviceNode:
    path = str(doc["path"])
    typ, major, minor = doc.get("type"), doc.get("major"), doc.get("minor")
    if major is None or minor is None or typ is None:
        host_path = host.path(str(doc.get("hostPath") or path))
        try:
            st = os.stat(host_path)
        except OSError as exc:
            raise GpuError(f"CDI device node {path}: {exc}") from None
        typ = typ or ("b" if stat.S_ISBLK(st.st_mode) else "c")
        major = os.major(st.st_rdev) if major is None else major
        minor = os.minor(st.st_rdev) if minor is None else minor
    return DeviceNode(path, str(typ), int(major), int(minor), str(doc.get("permissions") or "rwm"),
                      int(doc.get("fileMode") or 0o666), int(doc.get("uid") or 0), int(doc.get("gid") or 0))

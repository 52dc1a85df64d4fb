"""Device and mount edits to an OCI spec, as produced by GPU discovery or a CDI spec."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DeviceNode:
    """A device node created in the container's /dev and allowed in the device cgroup."""

    path: str
    type: str
    major: int
    minor: int
    permissions: str = "rwm"
    file_mode: int = 0o666
    uid: int = 0
    gid: int = 0


@dataclass
class BindMount:
    host_path: str
    container_path: str
    options: tuple[str, ...] = ("rbind", "rprivate", "ro", "nosuid", "nodev")


@dataclass
class SpecEdits:
    """What to add to a generated spec. `env` overrides the image's variables; --env overrides it."""

    devices: list[DeviceNode] = field(default_factory=list)
    mounts: list[BindMount] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    hooks: dict[str, list[dict[str, object]]] = field(default_factory=dict)

    def extend(self, other: SpecEdits) -> None:
        """Add other's edits; a device or mount path already present is not added twice."""
        paths = {d.path for d in self.devices}
        self.devices += [d for d in other.devices if d.path not in paths]
        targets = {m.container_path for m in self.mounts}
        self.mounts += [m for m in other.mounts if m.container_path not in targets]
        self.env.update(other.env)
        for name, hooks in other.hooks.items():
            self.hooks.setdefault(name, []).extend(hooks)

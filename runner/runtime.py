"""The OCI runtime binary (runc, or crun where it works) and its lifecycle commands."""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from runner.errors import RuntimeUnavailable

_HYBRID_REASON = "crun does not support this host's hybrid cgroups (controllers on both v1 and v2)"


@dataclass
class Runtime:
    """A runtime binary; `root` is its state directory (None: the runtime's default)."""

    name: str
    path: str
    root: str | None = None

    def argv(self, *args: str) -> list[str]:
        return [self.path, *(("--root", self.root) if self.root else ()), *args]

    def start(self, container_id: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv("start", container_id), capture_output=True, check=False)

    def delete(self, container_id: str) -> None:
        """Kill (if running) and delete the container; no error if it does not exist."""
        subprocess.run(self.argv("delete", "--force", container_id), capture_output=True, check=False)

    def to_json(self) -> dict[str, str | None]:
        return {"name": self.name, "path": self.path, "root": self.root}

    @classmethod
    def from_json(cls, doc: dict[str, str | None]) -> Runtime:
        return cls(str(doc["name"]), str(doc["path"]), doc.get("root"))


def cgroup_hybrid(sys_cgroup: Path = Path("/sys/fs/cgroup")) -> bool:
    """True on a v1 host whose unified (v2) hierarchy also has controllers: crun refuses to run there."""
    try:
        controllers = (sys_cgroup / "unified" / "cgroup.controllers").read_text().split()
    except OSError:
        return False
    return bool(controllers)


def _verdict_file(state_dir: Path) -> Path:
    return state_dir / "crun-unusable"


def _verdict_key(path: str) -> str:
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{path} {os.stat(path).st_mtime_ns} {boot}"


def mark_crun_unusable(state_dir: Path, crun: Runtime, reason: str) -> None:
    """Remember (until the binary changes or the host reboots) that crun failed here."""
    state_dir.mkdir(parents=True, exist_ok=True)
    _verdict_file(state_dir).write_text(_verdict_key(crun.path) + "\n" + reason)


def _crun_problem(state_dir: Path, crun: str) -> str | None:
    if cgroup_hybrid():
        return _HYBRID_REASON
    try:
        key, _, reason = _verdict_file(state_dir).read_text().partition("\n")
    except OSError:
        return None
    return reason if key == _verdict_key(crun) else None


def select_runtime(choice: str, state_dir: Path, root: str | None = None) -> tuple[Runtime, list[str]]:
    """Pick the runtime for `choice` (auto, runc, crun or a path); returns it and notices to show."""
    if choice not in ("auto", "runc", "crun"):
        if not os.access(choice, os.X_OK):
            raise RuntimeUnavailable(f"runtime {choice} is not an executable file")
        return Runtime(Path(choice).name, choice, root), []
    if choice != "auto":
        path = shutil.which(choice)
        if path is None:
            raise RuntimeUnavailable(f"{choice} not found on PATH")
        return Runtime(choice, path, root), []
    return _auto_runtime(state_dir, root)


def _auto_runtime(state_dir: Path, root: str | None) -> tuple[Runtime, list[str]]:
    crun, runc = shutil.which("crun"), shutil.which("runc")
    notices = []
    if crun is not None:
        problem = _crun_problem(state_dir, crun)
        if problem is None:
            return Runtime("crun", crun, root), []
        notices.append(f"not using crun: {problem}; using runc")
    if runc is None:
        raise RuntimeUnavailable("no OCI runtime found: install runc (or crun on a cgroup v2 host)")
    return Runtime("runc", runc, root), notices

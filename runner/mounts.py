"""Thin wrappers over mount(2)/umount2(2) and /proc/self/mountinfo."""
from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

from runner.errors import MountError

MS_RDONLY = 0x1
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MNT_DETACH = 0x2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise MountError(f"{what}: {os.strerror(err)}")


def mount(source: str, target: Path, fstype: str, flags: int = 0, data: str = "") -> None:
    result = _libc.mount(source.encode(), str(target).encode(), fstype.encode(), flags,
                         data.encode() if data else None)
    _check(result, f"mount {fstype} on {target}")


def bind_mount(source: Path, target: Path, readonly: bool = False) -> None:
    mount(str(source), target, "", MS_BIND | MS_REC)
    if readonly:
        mount("", target, "", MS_BIND | MS_REC | MS_RDONLY | MS_REMOUNT)


def _overlay_path(path: Path) -> str:
    text = str(path)
    if any(c in text for c in ",:\\"):
        raise MountError(f"overlay paths may not contain ',', ':' or '\\': {text}")
    return text


def mount_overlay(lower: Path, upper: Path, work: Path, target: Path, volatile: bool) -> None:
    """Mount a writable overlay (nodev: device nodes shipped in the image never open). Directory
    renames and metadata-only copy-ups are pinned off, whatever the host's module defaults: the
    upper directory then holds every changed file whole and every renamed directory in full,
    which is what an image build reads back from it (imagefs.builder.diff)."""
    data = (f"lowerdir={_overlay_path(lower)},upperdir={_overlay_path(upper)},workdir={_overlay_path(work)}"
            ",redirect_dir=off,metacopy=off")
    if volatile:
        data += ",volatile"
    mount("overlay", target, "overlay", MS_NODEV, data)


def unmount(target: Path) -> bool:
    """Unmount target, lazily if it is busy. False when nothing was mounted there."""
    path = str(target).encode()
    if _libc.umount2(path, 0) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    if _libc.umount2(path, MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise MountError(f"umount {target}: {os.strerror(err)}")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\ooo."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_points() -> list[str]:
    """Every mount point in this process's mount namespace (dead FUSE mounts included)."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [_unescape(line.split(" ", 5)[4]) for line in f]


def is_mounted(path: Path) -> bool:
    return str(path) in mount_points()


def mount_healthy(path: Path, timeout: float = 5.0) -> bool:
    """Mounted and answering. A FUSE mount whose daemon died answers ENOTCONN, but only to the
    requests that reach it (the kernel still answers a stat of its root from the attributes it
    holds): imagefs.fs.mounts.probe_answer looks up a name never asked for. A mount that does not
    answer within timeout is not healthy either."""
    from imagefs.fs.mounts import probe_answer  # the runner's lower mounts are coldstart's

    return is_mounted(path) and probe_answer(path, timeout) == 0

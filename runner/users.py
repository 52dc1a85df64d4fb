"""Resolve a user spec ("uid[:gid]" or names) against the image's /etc/passwd and /etc/group."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from runner.errors import UserNotFound

_MAX_LINKS = 40


@dataclass
class ResolvedUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str = "/"


def secure_join(root: Path, path: str) -> Path:
    """Resolve path inside root as if root were '/': symlinks (absolute or relative) cannot leave it."""
    parts = list(PurePosixPath("/", path).parts[1:])
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part in (".", ""):
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            links += 1
            if links > _MAX_LINKS:
                raise OSError(f"too many symlinks resolving {path} in {root}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = list(PurePosixPath(target).parts) + parts
            if parts and parts[0] == "/":
                parts.pop(0)
            continue
        resolved.append(part)
    return root.joinpath(*resolved)


def _read_db(rootfs: Path, name: str) -> list[list[str]]:
    try:
        text = secure_join(rootfs, f"/etc/{name}").read_text(errors="replace")
    except OSError:
        return []
    rows = []
    for line in text.splitlines():
        if line and not line.startswith("#"):
            rows.append(line.split(":"))
    return rows


def _find(rows: list[list[str]], key: str, width: int) -> list[str] | None:
    for row in rows:
        if len(row) >= width and (row[0] == key or row[2] == key):
            return row
    return None


def _group_id(groups: list[list[str]], spec: str) -> int:
    row = _find(groups, spec, 3)
    if row is not None and row[2].isdigit():
        return int(row[2])
    if spec.isdigit():
        return int(spec)
    raise UserNotFound(f"unable to find group {spec}: no matching entries in the image's /etc/group")


def _supplementary(groups: list[list[str]], user: str, primary: int) -> tuple[int, ...]:
    gids = []
    for row in groups:
        if len(row) >= 4 and row[2].isdigit() and user in row[3].split(","):
            gid = int(row[2])
            if gid != primary and gid not in gids:
                gids.append(gid)
    return tuple(gids)


def resolve_user(rootfs: Path, spec: str) -> ResolvedUser:
    """Docker's rules: '' is root; a name must exist in passwd; a number need not."""
    user_part, _, group_part = (spec or "0").partition(":")
    passwd = _read_db(rootfs, "passwd")
    row = _find(passwd, user_part, 7)
    if row is not None and row[2].isdigit() and row[3].isdigit():
        uid, gid, home, name = int(row[2]), int(row[3]), row[5] or "/", row[0]
    elif user_part.isdigit():
        uid, gid, home, name = int(user_part), 0, "/", ""
    else:
        raise UserNotFound(f"unable to find user {user_part}: no matching entries in the image's /etc/passwd")
    groups = _read_db(rootfs, "group")
    if group_part:
        gid = _group_id(groups, group_part)
        return ResolvedUser(uid, gid, (), home)
    return ResolvedUser(uid, gid, _supplementary(groups, name, gid) if name else (), home)


def write_in_root(root: Path, path: str, text: str) -> bool:
    """Write a file at path inside root without following a symlink out of it; False if impossible."""
    try:
        target = secure_join(root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True

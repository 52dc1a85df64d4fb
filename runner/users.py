"""Resolve a user spec ("uid[:gid]" or names) against the image's /etc/passwd and /etc/group."""
from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from imagefs.regular import NotRegularFile, open_regular
from runner.errors import ImageError, UserNotFound

_MAX_LINKS = 40
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel
_ID = re.compile(r"[0-9]{1,10}")  # ASCII only: str.isdigit() also accepts '²', which int() refuses
# Larger passwd/group files are refused rather than read (runc also refuses lines over 64 KiB).
MAX_DB_BYTES = 4 << 20


@dataclass
class ResolvedUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    home: str = "/"


def parse_id(text: str) -> int | None:
    """A uid or gid written in ASCII digits, within the kernel's range; None otherwise."""
    if _ID.fullmatch(text) is None:
        return None
    value = int(text)
    return value if value <= _MAX_ID else None


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


def _read_db(rootfs: Path, name: str) -> bytes:
    """The image's /etc/<name> (empty when missing). ImageError when it is too large, or is not a
    regular file: runc reads it too while it creates the container, and would block on a FIFO."""
    try:
        fd = open_regular(secure_join(rootfs, f"/etc/{name}"), follow=False)  # resolved in the root
    except NotRegularFile as exc:
        raise ImageError(f"the image's /etc/{name} is {exc.strerror}: refusing to use it") from None
    except OSError:
        return b""
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_DB_BYTES + 1)
    if len(data) > MAX_DB_BYTES:
        raise ImageError(f"the image's /etc/{name} is larger than {MAX_DB_BYTES >> 20} MiB: refusing to read it")
    return data


def _rows(data: bytes) -> Iterator[list[str]]:
    """The entries of a passwd/group file, one line at a time."""
    for raw in io.BytesIO(data):
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line and not line.startswith("#"):
            yield line.split(":")


def _find(data: bytes, key: str, width: int, id_fields: tuple[int, ...]) -> list[str] | None:
    """The first well-formed entry whose name or id is key (entries with unusable ids are skipped)."""
    for row in _rows(data):
        if len(row) < width or any(parse_id(row[i]) is None for i in id_fields):
            continue
        if row[0] == key or row[2] == key:
            return row
    return None


def _group_id(groups: bytes, spec: str) -> int:
    row = _find(groups, spec, 3, (2,))
    gid = int(row[2]) if row is not None else parse_id(spec)
    if gid is None:
        raise UserNotFound(f"unable to find group {spec}: no matching entries in the image's /etc/group")
    return gid


def _supplementary(groups: bytes, user: str, primary: int) -> tuple[int, ...]:
    gids: list[int] = []
    for row in _rows(groups):
        gid = parse_id(row[2]) if len(row) >= 4 else None
        if gid is not None and gid != primary and gid not in gids and user in row[3].split(","):
            gids.append(gid)
    return tuple(gids)


def resolve_user(rootfs: Path, spec: str) -> ResolvedUser:
    """Docker's rules: '' is root; a name must exist in passwd; a number need not."""
    user_part, _, group_part = (spec or "0").partition(":")
    row = _find(_read_db(rootfs, "passwd"), user_part, 7, (2, 3))
    number = parse_id(user_part)
    if row is not None:
        uid, gid, home, name = int(row[2]), int(row[3]), row[5] or "/", row[0]
    elif number is not None:
        uid, gid, home, name = number, 0, "/", ""
    else:
        raise UserNotFound(f"unable to find user {user_part}: no matching entries in the image's /etc/passwd")
    groups = _read_db(rootfs, "group")
    if group_part:
        return ResolvedUser(uid, _group_id(groups, group_part), (), home)
    return ResolvedUser(uid, gid, _supplementary(groups, name, gid) if name else (), home)


def write_in_root(root: Path, path: str, text: str) -> str | None:
    """Write a regular file at path inside root without following a symlink out of it and without
    blocking on a FIFO; None when written, else why not (the file is then left as it is)."""
    try:
        target = secure_join(root, path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = open_regular(target, os.O_WRONLY | os.O_CREAT, follow=False)
    except OSError as exc:
        return exc.strerror or str(exc)
    with os.fdopen(fd, "w") as f:
        f.truncate()
        f.write(text)
    return None

"""Compare two directory trees entry by entry: content hash, type, mode, owner, size, mtime,
xattrs, link targets, and hardlink identity (which names share an inode)."""
from __future__ import annotations

import hashlib
import os
import stat
from typing import Any


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    out = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for n in names:
        try:
            out[os.fsencode(n)] = os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            pass
    return out


def _hash(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def snapshot(root: str | os.PathLike[str], *, mtime: bool = True) -> dict[bytes, tuple[Any, ...]]:
    """path -> (type, mode, uid, gid, size, mtime_ns, rdev, target, xattrs, hash, link group)."""
    top = os.fsencode(root)
    out: dict[bytes, tuple[Any, ...]] = {}
    first_name: dict[tuple[int, int], bytes] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = full[len(top):]
            st = os.lstat(full)
            group = b""
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                group = first_name.setdefault((st.st_dev, st.st_ino), rel)
            out[rel] = (
                stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                st.st_mtime_ns if mtime else 0,
                st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
                os.readlink(full) if stat.S_ISLNK(st.st_mode) else b"",
                tuple(sorted(_xattrs(full).items())),
                _hash(full) if stat.S_ISREG(st.st_mode) else "",
                group,
            )
    return out


def diff(a: dict[bytes, tuple[Any, ...]], b: dict[bytes, tuple[Any, ...]], limit: int = 20) -> list[str]:
    """Human-readable differences (empty when the trees match)."""
    out = []
    for path in sorted(a.keys() | b.keys()):
        if a.get(path) != b.get(path):
            out.append(f"{path!r}: {a.get(path)} != {b.get(path)}")
            if len(out) >= limit:
                break
    return out

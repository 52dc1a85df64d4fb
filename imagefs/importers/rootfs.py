"""Import a directory on the host (a root filesystem) into a BuildTree, without following symlinks."""
from __future__ import annotations

import os
import stat

from imagefs.errors import InvalidSource, UnsafeInput
from imagefs.tree import MAX_DEPTH, BuildTree, FileSource, Node


def read_xattrs(path: bytes) -> dict[bytes, bytes]:
    """Every extended attribute of path (not followed); none where the filesystem has none."""
    out: dict[bytes, bytes] = {}
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return out
    for name in names:
        try:
            out[os.fsencode(name)] = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
    return out


def node_from_stat(st: os.stat_result, path: bytes) -> Node:
    node = Node(mode=st.st_mode, uid=st.st_uid, gid=st.st_gid, mtime_ns=st.st_mtime_ns,
                xattrs=read_xattrs(path))
    if stat.S_ISDIR(st.st_mode):
        node.children = {}
    elif stat.S_ISREG(st.st_mode):
        node.source = FileSource(path, st.st_size)
    elif stat.S_ISLNK(st.st_mode):
        node.target = os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        node.rdev = st.st_rdev
    return node


def import_rootfs(root: str | os.PathLike[str]) -> BuildTree:
    """Every entry below root with its metadata; hardlinks inside root stay one node."""
    top = os.fsencode(root)
    try:
        st = os.lstat(top)
    except OSError as e:
        raise InvalidSource(f"cannot read {os.fsdecode(top)}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidSource(f"{os.fsdecode(top)} is not a directory")
    tree = BuildTree(node_from_stat(st, top))
    links: dict[tuple[int, int], Node] = {}
    _scan(top, tree.root, links, st.st_dev, 1)
    return tree


def _scan(path: bytes, parent: Node, links: dict[tuple[int, int], Node], dev: int, depth: int) -> None:
    assert parent.children is not None
    if depth > MAX_DEPTH:
        raise UnsafeInput(f"{os.fsdecode(path)[:200]}...: deeper than {MAX_DEPTH} directories")
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as e:
        raise InvalidSource(f"cannot list {os.fsdecode(path)}: {e.strerror}") from None
    for entry in entries:
        st = entry.stat(follow_symlinks=False)
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in links:
            parent.children[entry.name] = links[key]
            continue
        node = node_from_stat(st, entry.path)
        parent.children[entry.name] = node
        if stat.S_ISDIR(st.st_mode):
            _scan(entry.path, node, links, dev, depth + 1)
        elif st.st_nlink > 1:
            links[key] = node

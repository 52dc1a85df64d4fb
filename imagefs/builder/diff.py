"""Parent image -> BuildTree, and a container's overlayfs upper directory applied on top of it.

Unchanged files keep their parent's extents (ExtentSource), so writing the child image uploads
only what the step changed. In the upper directory a 0/0 character device is a whiteout (the
name was deleted) and a directory with trusted.overlay.opaque=y replaces the lower directory.
"""
from __future__ import annotations

import os
import stat

from imagefs.errors import InvalidSource, UnsafeInput
from imagefs.importers.rootfs import node_from_stat
from imagefs.index import ROOT_INO, ImageIndex
from imagefs.tree import MAX_DEPTH, BuildTree, ExtentSource, Node

OPAQUE = b"trusted.overlay.opaque"
_PRIVATE = b"trusted.overlay."
# An upper entry that is only metadata (its data stays in the lower file) or a directory renamed
# in place: neither can be applied from the upper directory alone, so an overlay the builder
# reads back is mounted without them (runner.mounts.mount_overlay); one that has them is refused.
_UNREADABLE = (b"trusted.overlay.metacopy", b"trusted.overlay.redirect")


def tree_from_index(index: ImageIndex) -> BuildTree:
    """A mutable copy of an image's tree whose files point at the parent's stored chunks."""
    nodes: dict[int, Node] = {}

    def node(ino: int) -> Node:
        if ino in nodes:
            return nodes[ino]
        i = index.inode(ino)
        n = Node(mode=i.mode, uid=i.uid, gid=i.gid, mtime_ns=i.mtime_ns, rdev=i.rdev, target=i.target,
                 xattrs=dict(i.xattrs or {}))
        if i.is_dir:
            n.children = {}
        elif i.is_reg:
            ext = i.extents or []
            pieces = tuple((index.chunks[ext[k]], ext[k + 1], ext[k + 2]) for k in range(0, len(ext), 3))
            sizes = {index.chunks[ext[k]]: index.chunk_sizes[ext[k]] for k in range(0, len(ext), 3)}
            n.source = ExtentSource(pieces, sizes, i.size)
        nodes[ino] = n
        return n

    root = node(ROOT_INO)
    for parent, names in index.children.items():
        p = node(parent)
        assert p.children is not None
        for name, child in names.items():
            p.children[name] = node(child)
    return BuildTree(root)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _public(node: Node, path: bytes) -> Node:
    """node without overlayfs's own attributes; InvalidSource for an entry the upper directory
    does not hold in full."""
    for name in _UNREADABLE:
        if name in node.xattrs:
            raise InvalidSource(f"overlay upper entry {os.fsdecode(path)} has {name.decode()}: mount the "
                                "overlay with redirect_dir=off,metacopy=off")
    node.xattrs = {k: v for k, v in node.xattrs.items() if not k.startswith(_PRIVATE)}
    return node


def apply_upper(tree: BuildTree, upper: str | os.PathLike[str]) -> int:
    """Apply an overlayfs upper directory to tree; returns the number of changed entries."""
    top = os.fsencode(upper)
    links: dict[tuple[int, int], Node] = {}
    root_st = os.lstat(top)
    _update_dir(tree.root, _public(node_from_stat(root_st, top), top))
    return _apply_dir(tree, top, (), links)


def _update_dir(old: Node, new: Node) -> None:
    old.mode, old.uid, old.gid, old.mtime_ns, old.xattrs = new.mode, new.uid, new.gid, new.mtime_ns, new.xattrs


def _apply_dir(tree: BuildTree, path: bytes, parts: tuple[bytes, ...], links: dict) -> int:  # type: ignore[type-arg]
    if len(parts) >= MAX_DEPTH:
        raise UnsafeInput(f"{os.fsdecode(path)[:200]}...: deeper than {MAX_DEPTH} directories")
    changed = 0
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        st = entry.stat(follow_symlinks=False)
        here = parts + (entry.name,)
        changed += 1
        if _is_whiteout(st):
            tree.remove(here)
            continue
        key = (st.st_dev, st.st_ino)
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1 and key in links:
            tree.put(here, links[key])
            continue
        new = _public(node_from_stat(st, entry.path), entry.path)
        if stat.S_ISDIR(st.st_mode):
            changed += _apply_subdir(tree, entry.path, here, new, links)
            continue
        if st.st_nlink > 1:
            links[key] = new
        tree.put(here, new)
    return changed


def _apply_subdir(tree: BuildTree, path: bytes, here: tuple[bytes, ...], new: Node, links: dict) -> int:  # type: ignore[type-arg]
    old = tree.get(here)
    opaque = is_opaque(path)
    if old is not None and old.is_dir and not opaque:
        _update_dir(old, new)
    else:
        new.opaque = True  # replaces whatever was there, children come only from the upper dir
        tree.put(here, new)
    return _apply_dir(tree, path, here, links)


def is_opaque(path: bytes | str | os.PathLike[str]) -> bool:
    """Whether an overlayfs upper directory hides everything below it."""
    try:
        return os.getxattr(path, OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False

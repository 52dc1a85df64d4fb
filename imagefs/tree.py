"""A mutable tree that importers and the builder fill in, before the writer turns it into an index.

Paths are bytes, relative to the image root, with no '.', '..' or empty components (normalise()).
Hardlinks are the same Node object under several names. File content is a Source, read later.
"""
from __future__ import annotations

import io
import os
import stat
from dataclasses import dataclass, field
from typing import Iterator, Protocol

from imagefs.errors import UnsafeInput


class Reader(Protocol):
    def readinto(self, buf: memoryview) -> int: ...

    def close(self) -> None: ...


class Source(Protocol):
    """Content of a regular file, read once, in order, by the writer."""

    @property
    def size(self) -> int: ...

    def open(self) -> Reader: ...


@dataclass(frozen=True)
class FileSource:
    """A whole regular file on the host (a rootfs import)."""

    path: bytes
    size: int

    def open(self) -> Reader:
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        return io.FileIO(fd, "rb", closefd=True)

    def advise(self) -> None:
        _will_need(self.path, 0, self.size)


@dataclass(frozen=True)
class RangeSource:
    """size bytes at offset of a host file (a member of an uncompressed tar spool)."""

    path: bytes
    offset: int
    size: int

    def open(self) -> Reader:
        f = io.FileIO(self.path, "rb")
        f.seek(self.offset)
        return f

    def advise(self) -> None:
        _will_need(self.path, self.offset, self.size)


@dataclass(frozen=True)
class BytesSource:
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def open(self) -> Reader:
        return io.BytesIO(self.data)


@dataclass(frozen=True)
class ExtentSource:
    """Content already stored: extents of a parent image, reused without reading or uploading."""

    extents: tuple[tuple[str, int, int], ...]  # (chunk digest, offset in chunk, length)
    chunk_sizes: dict[str, int]
    size: int

    def open(self) -> Reader:
        raise RuntimeError("ExtentSource content is never re-read")


def _will_need(path: bytes, offset: int, size: int) -> None:
    """Ask the kernel to start reading a file range now (a cold import reads ahead of the chunker)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, offset, size, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass(eq=False)
class Node:
    mode: int
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    rdev: int = 0
    target: bytes = b""
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    source: Source | None = None
    children: dict[bytes, "Node"] | None = None
    opaque: bool = False  # for layer merges: hides what lower layers had here

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def size(self) -> int:
        if stat.S_ISREG(self.mode):
            return self.source.size if self.source else 0
        if stat.S_ISLNK(self.mode):
            return len(self.target)
        return 0


def new_dir(mode: int = 0o755, **kw) -> Node:  # type: ignore[no-untyped-def]
    return Node(mode=stat.S_IFDIR | (mode & 0o7777), children={}, **kw)


# What an image may hold. A name longer than Linux's NAME_MAX cannot be made on any filesystem;
# no image needs a tree deeper than MAX_DEPTH, and every walk of a tree (import, build, export)
# stays well inside Python's recursion limit with it.
NAME_MAX = 255
MAX_DEPTH = 256


def normalise(path: bytes | str) -> tuple[bytes, ...]:
    """Split a path into components, rejecting '..', NUL, names longer than NAME_MAX bytes and
    paths deeper than MAX_DEPTH; a leading '/' or './' is dropped."""
    if isinstance(path, str):
        path = os.fsencode(path)
    if b"\0" in path:
        raise UnsafeInput(f"path contains NUL: {path!r}")
    parts = tuple(p for p in path.split(b"/") if p and p != b".")
    if b".." in parts:
        raise UnsafeInput(f"path escapes the root: {path.decode(errors='replace')}")
    if any(len(p) > NAME_MAX for p in parts):
        raise UnsafeInput(f"path has a name longer than {NAME_MAX} bytes: {path[:80].decode(errors='replace')}...")
    if len(parts) > MAX_DEPTH:
        raise UnsafeInput(f"path is deeper than {MAX_DEPTH} directories: {path[:80].decode(errors='replace')}...")
    return parts


class BuildTree:
    def __init__(self, root: Node | None = None) -> None:
        self.root = root or new_dir(0o755)

    def get(self, parts: tuple[bytes, ...]) -> Node | None:
        node: Node | None = self.root
        for p in parts:
            if node is None or node.children is None:
                return None
            node = node.children.get(p)
        return node

    def parent_dir(self, parts: tuple[bytes, ...], *, create: bool = True) -> Node:
        """The directory that holds parts[-1]; missing parents are made (0755, root) when create."""
        node = self.root
        for p in parts[:-1]:
            assert node.children is not None
            child = node.children.get(p)
            if child is None:
                if not create:
                    raise UnsafeInput(f"missing parent directory {b'/'.join(parts).decode(errors='replace')}")
                child = node.children[p] = new_dir(0o755)
            elif not child.is_dir:
                raise UnsafeInput(
                    f"{b'/'.join(parts).decode(errors='replace')}: a parent is not a directory")
            node = child
        return node

    def put(self, parts: tuple[bytes, ...], node: Node) -> None:
        """Place node at parts; a directory over a directory keeps the old children (tar semantics)."""
        if not parts:
            if not node.is_dir:
                raise UnsafeInput("the image root must be a directory")
            node.children = self.root.children
            self.root = node
            return
        parent = self.parent_dir(parts)
        assert parent.children is not None
        old = parent.children.get(parts[-1])
        if old is not None and old.is_dir and node.is_dir and not node.opaque:
            node.children = old.children
        parent.children[parts[-1]] = node

    def remove(self, parts: tuple[bytes, ...]) -> None:
        parent = self.get(parts[:-1]) if parts else None
        if parent is not None and parent.children is not None:
            parent.children.pop(parts[-1], None)

    def walk(self) -> Iterator[tuple[tuple[bytes, ...], Node]]:
        """Depth first, names in byte order: the tree order that the chunker packs files in."""
        stack: list[tuple[tuple[bytes, ...], Node]] = [((), self.root)]
        while stack:
            parts, node = stack.pop()
            yield parts, node
            if node.children:
                for name in sorted(node.children, reverse=True):
                    stack.append((parts + (name,), node.children[name]))

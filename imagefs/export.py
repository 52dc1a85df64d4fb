"""Write an image's tree out to a host directory, byte for byte and with all metadata.

Everything is created relative to directory file descriptors with O_NOFOLLOW and O_EXCL, so no
entry of the image (a symlink, a '..' name) can make the export write outside the target.
"""
from __future__ import annotations

import os
import stat
from typing import Callable

from imagefs.errors import ExportError, InvalidSource, UnsafeInput
from imagefs.index import ROOT_INO, ImageIndex, Inode
from imagefs.reader import ChunkReader, iter_file

ProgressFn = Callable[[int], None]
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


class _Exporter:
    def __init__(self, index: ImageIndex, reader: ChunkReader, progress: ProgressFn | None) -> None:
        self.index, self.reader, self.progress = index, reader, progress
        self.first_path: dict[int, bytes] = {}  # hardlinks: inode -> first exported path
        self.top = b""

    def run(self, target: bytes) -> None:
        os.makedirs(target, exist_ok=True)
        if os.listdir(target):
            raise InvalidSource(f"export target {os.fsdecode(target)} is not empty")
        self.top = os.path.realpath(target)
        fd = os.open(self.top, _DIR_FLAGS)
        try:
            self._dir(fd, ROOT_INO, self.top)
            self._meta(fd, None, self.index.inode(ROOT_INO))
        finally:
            os.close(fd)

    def _dir(self, dfd: int, ino: int, path: bytes) -> None:
        for name, child in self.index.children[ino].items():
            if b"/" in name or name in (b".", b".."):
                raise UnsafeInput(f"invalid name {name!r} in image")
            node = self.index.inode(child)
            if child in self.first_path and not node.is_dir:
                os.link(self.first_path[child], name, dst_dir_fd=dfd, follow_symlinks=False)
                continue
            self.first_path[child] = path + b"/" + name
            self._create(dfd, name, node)
            if node.is_dir:
                sub = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                try:
                    self._dir(sub, child, path + b"/" + name)
                    self._meta(sub, None, node)
                finally:
                    os.close(sub)
            else:
                self._meta(dfd, name, node)

    def _create(self, dfd: int, name: bytes, node: Inode) -> None:
        kind = stat.S_IFMT(node.mode)
        if kind == stat.S_IFDIR:
            os.mkdir(name, 0o700, dir_fd=dfd)
        elif kind == stat.S_IFLNK:
            os.symlink(node.target, name, dir_fd=dfd)
        elif kind == stat.S_IFREG:
            self._write_file(dfd, name, node)
        else:  # devices, fifos, sockets
            os.mknod(name, kind | 0o600, node.rdev, dir_fd=dfd)

    def _write_file(self, dfd: int, name: bytes, node: Inode) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
        try:
            for piece in iter_file(self.reader, self.index, node):
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view):]
                if self.progress:
                    self.progress(len(piece))
        finally:
            os.close(fd)

    def _meta(self, dfd: int, name: bytes | None, node: Inode) -> None:
        """Owner, then mode (chown clears setuid), then xattrs (capabilities), then times."""
        target: int | bytes = dfd if name is None else name
        kw = {} if name is None else {"dir_fd": dfd, "follow_symlinks": False}
        os.chown(target, node.uid, node.gid, **kw)
        if not stat.S_ISLNK(node.mode):
            os.chmod(target, stat.S_IMODE(node.mode), **kw)
        for key, value in (node.xattrs or {}).items():
            self._setxattr(dfd, name, key, value)
        os.utime(target, ns=(node.mtime_ns, node.mtime_ns), **kw)

    def _setxattr(self, dfd: int, name: bytes | None, key: bytes, value: bytes) -> None:
        # setxattr has no dir_fd form: go through /proc/self/fd, which names the entry exactly.
        path = f"/proc/self/fd/{dfd}".encode() + (b"/" + name if name else b"")
        try:
            os.setxattr(path, key, value, follow_symlinks=False)
        except OSError as e:
            raise InvalidSource(f"cannot set xattr {key!r} on {path!r}: {e.strerror}") from e


def export_image(index: ImageIndex, reader: ChunkReader, target: str | os.PathLike[str],
                 progress: ProgressFn | None = None) -> None:
    """Write the tree to target (created if missing, must be empty)."""
    try:
        _Exporter(index, reader, progress).run(os.fsencode(target))
    except RecursionError:
        raise ExportError(f"export to {os.fsdecode(target)}: the image's tree is too deep") from None
    except OSError as e:
        where = f" {os.fsdecode(e.filename)}:" if e.filename else ""
        raise ExportError(f"export to {os.fsdecode(target)}:{where} {e.strerror}") from None

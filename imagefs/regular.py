"""Opening a file that must be a regular one (a blob of an OCI layout, an image's /etc/passwd)
without ever blocking on a FIFO or a device someone put in its place."""
from __future__ import annotations

import errno
import os
import stat

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFLNK: "a symlink",
          stat.S_IFREG: "a regular file"}


def kind_of(mode: int) -> str:
    """'a FIFO', 'a socket', 'a regular file', ... for an st_mode."""
    return _KINDS.get(stat.S_IFMT(mode), "a special file")


class NotRegularFile(OSError):
    """The path exists but is a FIFO, socket, device, directory (or, without follow, a symlink)."""


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY, *, follow: bool = True,
                 mode: int = 0o644) -> int:
    """A descriptor of path opened with flags, which must be (or, with O_CREAT, become) a regular
    file: the open never blocks (O_NONBLOCK, cleared again), and what is there is checked on the
    open file (so nothing swapped in between is used). NotRegularFile, or the open's OSError."""
    extra = os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags | extra, mode)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO without a reader (or a socket), opened for writing
            raise NotRegularFile(errno.ENXIO, f"{kind_of(os.lstat(path).st_mode)}, not a regular file") from None
        if e.errno == errno.ELOOP and not follow:
            raise NotRegularFile(errno.ELOOP, "a symlink, not a regular file") from None
        raise
    try:
        got = os.fstat(fd).st_mode
        if not stat.S_ISREG(got):
            raise NotRegularFile(errno.EINVAL, f"{kind_of(got)}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd

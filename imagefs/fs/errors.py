"""Errors of the mounted filesystem. The FUSE adapter maps them to errno in one function."""
from __future__ import annotations

from imagefs.errors import ImageFSError


class FSError(ImageFSError):
    """A filesystem operation that cannot succeed (the caller gets an errno, the daemon lives on)."""


class NoEntry(FSError):
    """No such file, directory or inode."""


class NotADirectory(FSError):
    """A directory operation on something that is not a directory."""


class IsADirectory(FSError):
    """A file operation on a directory."""


class NotASymlink(FSError):
    """readlink of something that is not a symbolic link."""


class NoAttribute(FSError):
    """The inode has no extended attribute by that name."""


class ReadOnly(FSError):
    """Any attempt to change the image."""


class BadHandle(FSError):
    """A file handle the filesystem never gave out (or already released)."""


class AccessDenied(FSError):
    """The caller lacks the permission it asked about."""


class ChunkUnavailable(FSError):
    """A chunk could not be fetched or verified; the read fails with EIO. lasting: the store
    answered that it does not have it or has it corrupt (a retry will not help), rather than
    not answering."""

    def __init__(self, digest: str, reason: str, *, lasting: bool = False) -> None:
        super().__init__(f"chunk {digest} unavailable: {reason}")
        self.digest = digest
        self.reason = reason
        self.lasting = lasting


class MountError(ImageFSError):
    """Mounting, unmounting or talking to a mount daemon failed."""

    exit_code = 5

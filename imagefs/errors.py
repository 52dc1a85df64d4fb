"""One error hierarchy for the image store; adapters map it to errno or exit codes in one place each."""
from __future__ import annotations


class ImageFSError(Exception):
    """Base of every error this package raises on purpose."""

    exit_code = 1


class StoreError(ImageFSError):
    """A blob store operation failed."""


class StoreUnavailable(StoreError):
    """The store could not be reached (or kept failing past the retry deadline)."""

    exit_code = 3


class TemporaryStoreError(StoreError):
    """A failure worth retrying (timeout, 5xx, connection reset)."""


class BlobNotFound(StoreError):
    """A key does not exist in the store."""

    def __init__(self, key: str) -> None:
        super().__init__(f"not found in store: {key}")
        self.key = key


class InvalidKey(StoreError):
    """A store key that does not match the allowed alphabet or shape."""


class CorruptBlob(ImageFSError):
    """Bytes read back do not match their name or their header."""

    exit_code = 4

    def __init__(self, digest: str, reason: str) -> None:
        super().__init__(f"corrupt blob {digest}: {reason}")
        self.digest = digest
        self.reason = reason


class ImageNotFound(ImageFSError):
    """No tag or image ID by that name."""

    exit_code = 2


class InvalidReference(ImageFSError):
    """A NAME:TAG or image reference that cannot be parsed."""

    exit_code = 2


class UnsafeInput(ImageFSError):
    """An import source holds something that cannot be imported safely (path escape, bad link, ...)."""

    exit_code = 2


class InvalidSource(ImageFSError):
    """An import source that is missing, truncated, or of an unknown format."""

    exit_code = 2


class ExportError(ImageFSError):
    """Writing an image out to a host directory failed (disk full, a name the target refuses, ...)."""

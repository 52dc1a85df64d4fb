"""The narrow blob-store interface every backend implements and every wrapper preserves."""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Iterator

from imagefs.errors import InvalidKey

# Keys are '/'-separated segments of a small safe alphabet: no empty segment, no '.' or '..'.
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:+@=-]{0,199}")


def validate_key(key: str) -> str:
    """Return key unchanged if it is a valid store key, else raise InvalidKey."""
    if not isinstance(key, str) or not key or len(key) > 1000:
        raise InvalidKey(f"invalid store key: {key!r}")
    for seg in key.split("/"):
        if not _SEGMENT.fullmatch(seg):
            raise InvalidKey(f"invalid store key: {key!r}")
    return key


def validate_prefix(prefix: str) -> str:
    """A listing prefix: empty, or a key optionally ending in '/'."""
    if prefix == "":
        return prefix
    validate_key(prefix.rstrip("/"))
    return prefix


@dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch, as the backend reports it


class BlobStore(ABC):
    """get, get a byte range, put, exists, delete, list by prefix. Nothing else."""

    url: str = ""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Whole blob; BlobNotFound if missing."""

    @abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """Up to length bytes from offset (short at the end of the blob); BlobNotFound if missing."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store atomically: a reader sees the old blob, the new one, or nothing, never a torn write."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether key is present."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove key; deleting a missing key is not an error."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        """Every blob whose key starts with prefix, in no promised order."""

    def close(self) -> None:
        """Release connections; the default has nothing to release."""

    def __enter__(self) -> "BlobStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

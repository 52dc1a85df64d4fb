"""Local-directory backend: atomic writes (temp file, fsync, rename) and sharded folders."""
from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Callable, Iterator

from imagefs.errors import BlobNotFound, StoreError, StoreUnavailable
from imagefs.store.base import BlobInfo, BlobStore, validate_key, validate_prefix

# Namespaces whose many leaves are spread over 256 folders by their first two characters.
SHARDED = frozenset({"chunks", "index"})


class LocalStore(BlobStore):
    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root}"
        self.fsync = fsync
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreUnavailable(f"cannot create store directory {self.root}: {e.strerror}") from e

    def _path(self, key: str) -> Path:
        parts = validate_key(key).split("/")
        if len(parts) == 2 and parts[0] in SHARDED:
            return self.root / parts[0] / parts[1][:2] / parts[1]
        return self.root.joinpath(*parts)

    def get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        except OSError as e:
            raise StoreError(f"reading {key}: {e.strerror}") from e

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        try:
            with open(self._path(key), "rb") as f:
                return os.pread(f.fileno(), length, offset)
        except FileNotFoundError:
            raise BlobNotFound(key) from None
        except OSError as e:
            raise StoreError(f"reading {key}: {e.strerror}") from e

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            try:
                self._write_atomic(path, data)
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._write_atomic(path, data)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise StoreError(f"store disk full writing {key}") from e
            raise StoreError(f"writing {key}: {e.strerror}") from e

    def _write_atomic(self, path: Path, data: bytes) -> None:
        tmp = path.parent / f".tmp.{path.name}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        try:
            os.unlink(self._path(key))
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StoreError(f"deleting {key}: {e.strerror}") from e

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        validate_prefix(prefix)
        # Walk only the folder the prefix names; filter the leaves by the full prefix.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*base.split("/")) if base else self.root
        for dirpath, dirnames, filenames in os.walk(start, onerror=_walk_error(start)):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, self.root)
            parts = [] if rel == "." else rel.split(os.sep)
            if len(parts) == 2 and parts[0] in SHARDED:
                parts = parts[:1]  # the shard folder is not part of the key
            for name in filenames:
                if name.startswith("."):
                    continue
                key = "/".join([*parts, name])
                if not key.startswith(prefix):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                yield BlobInfo(key, st.st_size, st.st_mtime)

    def stale_temp_files(self) -> Iterator[Path]:
        """Temp files left by writers that died; gc removes the old ones."""
        for dirpath, _dirs, filenames in os.walk(self.root):
            for name in filenames:
                if name.startswith(".tmp."):
                    yield Path(dirpath) / name


def _walk_error(start: Path) -> Callable[[OSError], None]:
    """os.walk's onerror: a folder that cannot be read fails the listing (a listing that quietly
    left it out would make gc think what it holds is unreferenced); the start missing is an
    empty listing."""
    def fail(e: OSError) -> None:
        if isinstance(e, FileNotFoundError) and Path(e.filename or "") == start:
            return
        raise StoreError(f"listing {e.filename}: {e.strerror}") from e
    return fail

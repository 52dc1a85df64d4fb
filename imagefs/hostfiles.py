"""Small files the host keeps beside its chunk cache (indexes, learned start-up orders): one
directory, one file per name, written to a temporary file and renamed into place, at most
max_entries files (the oldest go first). Best-effort: failures are logged, never raised."""
from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)


class HostFiles:
    def __init__(self, directory: str | os.PathLike[str], max_entries: int) -> None:
        self.dir = Path(directory)
        self.max_entries = max_entries

    def path(self, name: str) -> Path:
        return self.dir / name

    def read(self, name: str) -> bytes | None:
        try:
            return self.path(name).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning("cannot read %s: %s", self.path(name), e.strerror or e)
            return None

    def write(self, name: str, data: bytes) -> bool:
        """Replace the file atomically; False (logged) if that failed."""
        tmp = self.dir / f".{name}.{secrets.token_hex(6)}.tmp"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, self.path(name))
        except OSError as e:
            log.warning("cannot keep %s: %s", self.path(name), e.strerror or e)
            self.remove(tmp.name)
            return False
        self._trim()
        return True

    def remove(self, name: str) -> None:
        try:
            self.path(name).unlink()
        except OSError:
            pass

    def _trim(self) -> None:
        """Remove the oldest files beyond max_entries (stale temporary files count, and go first)."""
        try:
            entries = [(e.stat().st_mtime, e.name) for e in os.scandir(self.dir)]
        except OSError:
            return
        for _mtime, name in sorted(entries)[: max(0, len(entries) - self.max_entries)]:
            self.remove(name)

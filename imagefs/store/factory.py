"""Map a store URL (file:// or s3://) to a backend, wrapped with retries."""
from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from imagefs.errors import StoreError
from imagefs.store.base import BlobStore


def default_store_url() -> str:
    """--store, else $COLDSTART_STORE, else a local directory under the data home."""
    env = os.environ.get("COLDSTART_STORE")
    if env:
        return env
    if os.geteuid() == 0:
        return "file:///var/lib/coldstart/store"
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local/share")
    return f"file://{data_home}/coldstart/store"


def store_deadline() -> float:
    """Seconds a store call may keep retrying: $COLDSTART_STORE_DEADLINE, else the default."""
    from imagefs.store.retry import DEFAULT_DEADLINE

    raw = os.environ.get("COLDSTART_STORE_DEADLINE", "").strip()
    if not raw:
        return DEFAULT_DEADLINE
    try:
        value = float(raw)
    except ValueError:
        raise StoreError(f"COLDSTART_STORE_DEADLINE must be a number of seconds, not {raw!r}") from None
    if not value >= 0 or value == float("inf"):
        raise StoreError(f"COLDSTART_STORE_DEADLINE must be a finite number >= 0, not {raw!r}")
    return value


def open_store(url: str | None = None) -> BlobStore:
    """Open the store a URL names; a plain path is taken as a local directory."""
    url = url or default_store_url()
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        from imagefs.store.local import LocalStore

        path = parsed.path if parsed.scheme else url
        if not path:
            raise StoreError(f"store URL has no path: {url}")
        return LocalStore(path)
    if parsed.scheme == "s3":
        from imagefs.store.retry import RetryingStore
        from imagefs.store.s3 import S3Store

        deadline = store_deadline()
        query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
        inner = S3Store(
            bucket=parsed.netloc,
            prefix=parsed.path.strip("/"),
            endpoint=query.get("endpoint"),
            region=query.get("region"),
        )
        return RetryingStore(inner, deadline=deadline)
    raise StoreError(f"unknown store URL scheme {parsed.scheme!r} in {url} (use file:// or s3://)")

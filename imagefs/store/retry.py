"""A BlobStore wrapper that retries temporary failures until a per-call deadline.

Only TemporaryStoreError is retried; BlobNotFound, InvalidKey and every other StoreError pass
straight through. Waits grow exponentially with "equal jitter" (half fixed, half random) and
are cut short at the deadline; once it is spent the call raises StoreUnavailable naming the
operation, the key and the last error. Clock, sleep and randomness are injectable for tests.

The deadline bounds the whole call, attempts included: while a call runs, call_deadline() tells
the backend in its thread when it must end, and a backend ends its requests by then (the S3 read
path does; see imagefs.store.s3fast), so a store that answers slowly cannot hold a call past it.
"""
from __future__ import annotations

import random
import threading
import time
from typing import Callable, Iterator, TypeVar

from imagefs.errors import StoreUnavailable, TemporaryStoreError
from imagefs.store.base import BlobInfo, BlobStore

T = TypeVar("T")

DEFAULT_DEADLINE = 30.0

_calls = threading.local()  # .deadline: that of the RetryingStore call this thread is making


def call_deadline() -> float | None:
    """When (a time.monotonic() value) the RetryingStore call this thread is making must end;
    None outside such a call, or in one whose deadline is 0 (a single attempt, not limited here)."""
    return getattr(_calls, "deadline", None)


def _earlier(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


class RetryingStore(BlobStore):
    def __init__(
        self,
        inner: BlobStore,
        *,
        deadline: float = DEFAULT_DEADLINE,
        base_delay: float = 0.05,
        max_delay: float = 2.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        if deadline < 0 or base_delay < 0 or max_delay < 0:
            raise ValueError("deadline and delays must be >= 0")
        self.inner = inner
        self.url = inner.url
        self.deadline = deadline
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep
        self._clock = clock
        self._jitter = jitter

    def _delay(self, attempt: int) -> float:
        cap = min(self.max_delay, self.base_delay * (2**attempt))
        return cap / 2 + self._jitter() * cap / 2

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """fn() until it succeeds, fails for good, or the deadline passes: no attempt starts after
        it, and the one in progress is told to end by it (call_deadline())."""
        outer = call_deadline()
        _calls.deadline = _earlier(outer, (time.monotonic() + self.deadline) if self.deadline else None)
        try:
            return self._attempts(what, fn)
        finally:
            _calls.deadline = outer

    def _attempts(self, what: str, fn: Callable[[], T]) -> T:
        start = self._clock()
        attempt = 0
        while True:
            try:
                return fn()
            except TemporaryStoreError as e:
                attempt += 1
                left = self.deadline - (self._clock() - start)
                if left > 0:
                    self._sleep(min(self._delay(attempt - 1), left))
                if self._clock() - start >= self.deadline:
                    raise StoreUnavailable(
                        f"store {self.url} unavailable: {what} failed {attempt} times "
                        f"in {self._clock() - start:.1f}s; last error: {e}"
                    ) from e

    def get(self, key: str) -> bytes:
        return self._call(f"get {key}", lambda: self.inner.get(key))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self._call(f"get_range {key}", lambda: self.inner.get_range(key, offset, length))

    def put(self, key: str, data: bytes) -> None:
        self._call(f"put {key}", lambda: self.inner.put(key, data))

    def exists(self, key: str) -> bool:
        return self._call(f"exists {key}", lambda: self.inner.exists(key))

    def delete(self, key: str) -> None:
        self._call(f"delete {key}", lambda: self.inner.delete(key))

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        """Retries getting the listing started (up to its first entry); later failures pass through."""

        def start() -> tuple[Iterator[BlobInfo], BlobInfo | None]:
            it = iter(self.inner.list(prefix))
            return it, next(it, None)

        it, first = self._call(f"list {prefix or '(all)'}", start)
        if first is None:
            return
        yield first
        yield from it

    def close(self) -> None:
        self.inner.close()

"""RetryingStore: unit tests over a scripted flaky store, and real outages of an S3 endpoint."""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest

from imagefs.errors import BlobNotFound, InvalidKey, StoreError, StoreUnavailable, TemporaryStoreError
from imagefs.store.base import BlobInfo, BlobStore
from imagefs.store.factory import open_store, store_deadline
from imagefs.store.retry import RetryingStore, call_deadline
from imagefs.store.s3 import S3Store
from tests.fixtures.seaweed import SeaweedServer, free_ports


class FakeClock:
    """Time that moves only when the code under test sleeps (or a fake call takes time)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class FlakyStore(BlobStore):
    """Raises the scripted errors first (one per call), then behaves like a tiny dict store."""

    def __init__(self, errors: list[Exception], clock: FakeClock | None = None, call_cost: float = 0.0) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.blobs: dict[str, bytes] = {"k": b"0123456789"}
        self.clock = clock
        self.call_cost = call_cost
        self.closed = False

    def _step(self) -> None:
        self.calls += 1
        if self.clock is not None:
            self.clock.now += self.call_cost
        if self.errors:
            raise self.errors.pop(0)

    def get(self, key: str) -> bytes:
        self._step()
        if key not in self.blobs:
            raise BlobNotFound(key)
        return self.blobs[key]

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        return self.get(key)[offset : offset + length]

    def put(self, key: str, data: bytes) -> None:
        self._step()
        self.blobs[key] = data

    def exists(self, key: str) -> bool:
        self._step()
        return key in self.blobs

    def delete(self, key: str) -> None:
        self._step()
        self.blobs.pop(key, None)

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        self._step()
        for key in sorted(self.blobs):
            if key.startswith(prefix):
                yield BlobInfo(key, len(self.blobs[key]), 0.0)

    def close(self) -> None:
        self.closed = True


def temp(n: int) -> list[Exception]:
    return [TemporaryStoreError(f"flake {i}") for i in range(n)]


def wrap(inner: BlobStore, clock: FakeClock, deadline: float = 30.0) -> RetryingStore:
    return RetryingStore(inner, deadline=deadline, sleep=clock.sleep, clock=clock, jitter=lambda: 0.5)


OPS: dict[str, Callable[[BlobStore], object]] = {
    "get": lambda s: s.get("k"),
    "get_range": lambda s: s.get_range("k", 2, 3),
    "put": lambda s: s.put("k2", b"v"),
    "exists": lambda s: s.exists("k"),
    "delete": lambda s: s.delete("k"),
    "list": lambda s: list(s.list()),
}


@pytest.mark.parametrize("op", OPS)
def test_succeeds_after_temporary_errors(op: str) -> None:
    clock = FakeClock()
    inner = FlakyStore(temp(4))
    OPS[op](wrap(inner, clock))
    assert inner.calls == 5
    assert len(clock.sleeps) == 4


def test_returns_the_inner_result() -> None:
    clock = FakeClock()
    store = wrap(FlakyStore(temp(2)), clock)
    assert store.get("k") == b"0123456789"
    assert store.get_range("k", 2, 3) == b"234"
    assert store.exists("k") and not store.exists("nope")
    assert [i.key for i in store.list()] == ["k"]


def test_backoff_grows_and_is_capped() -> None:
    clock = FakeClock()
    store = RetryingStore(
        FlakyStore(temp(8)), base_delay=0.1, max_delay=1.0, sleep=clock.sleep, clock=clock, jitter=lambda: 1.0
    )
    store.get("k")
    assert clock.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0])


def test_jitter_stays_within_half_to_full_delay() -> None:
    clock = FakeClock()
    store = RetryingStore(FlakyStore(temp(6)), base_delay=0.1, max_delay=10.0, sleep=clock.sleep, clock=clock)
    store.get("k")
    for attempt, slept in enumerate(clock.sleeps):
        full = 0.1 * 2**attempt
        assert full / 2 <= slept <= full


def test_gives_up_at_the_deadline() -> None:
    clock = FakeClock()
    inner = FlakyStore(temp(10_000))
    store = wrap(inner, clock, deadline=5.0)
    with pytest.raises(StoreUnavailable) as info:
        store.get("blobs/wanted")
    message = str(info.value)
    assert "blobs/wanted" in message and "flake" in message
    assert isinstance(info.value.__cause__, TemporaryStoreError)
    assert clock.now - 1000.0 == pytest.approx(5.0)  # slept exactly up to the deadline, no further
    assert 5 < inner.calls < 100


def test_no_attempt_starts_after_the_deadline() -> None:
    class Timed(FlakyStore):
        def _step(self) -> None:
            starts.append(clock.now)
            super()._step()

    clock = FakeClock()
    starts: list[float] = []
    with pytest.raises(StoreUnavailable):
        wrap(Timed(temp(10_000), clock=clock, call_cost=0.3), clock, deadline=5.0).get("k")
    assert starts and max(starts) < 1005.0


def test_the_inner_store_is_told_the_deadline() -> None:
    """call_deadline() is the call's deadline (time.monotonic()) in every attempt, and only
    during the call; a nested call keeps the earlier of the two; deadline 0 sets none."""

    class Told(FlakyStore):
        def _step(self) -> None:
            told.append(call_deadline())
            super()._step()

    told: list[float | None] = []
    before = time.monotonic()
    RetryingStore(Told(temp(2)), deadline=7.0, sleep=lambda _s: None).get("k")
    assert len(told) == 3 and len(set(told)) == 1
    assert told[0] is not None and before + 7.0 <= told[0] <= time.monotonic() + 7.0
    assert call_deadline() is None

    told.clear()
    inner = RetryingStore(Told([]), deadline=60.0)
    RetryingStore(inner, deadline=7.0).get("k")
    assert told[0] is not None and told[0] <= time.monotonic() + 7.0
    RetryingStore(Told([]), deadline=0.0).get("k")
    assert told[1] is None


def test_deadline_counts_time_spent_in_calls() -> None:
    clock = FakeClock()
    inner = FlakyStore(temp(10_000), clock=clock, call_cost=2.0)
    with pytest.raises(StoreUnavailable):
        wrap(inner, clock, deadline=5.0).put("k", b"v")
    assert inner.calls <= 4


def test_zero_deadline_tries_once() -> None:
    clock = FakeClock()
    inner = FlakyStore(temp(1))
    with pytest.raises(StoreUnavailable):
        wrap(inner, clock, deadline=0.0).exists("k")
    assert inner.calls == 1 and clock.sleeps == []


@pytest.mark.parametrize(
    "error", [BlobNotFound("k"), StoreError("disk on fire"), InvalidKey("bad"), StoreUnavailable("gone")], ids=repr
)
def test_never_retries_permanent_errors(error: Exception) -> None:
    clock = FakeClock()
    inner = FlakyStore([error])
    with pytest.raises(type(error)) as info:
        wrap(inner, clock).get("k")
    assert info.value is error
    assert inner.calls == 1 and clock.sleeps == []


def test_blob_not_found_from_inner_passes_through() -> None:
    with pytest.raises(BlobNotFound):
        wrap(FlakyStore(temp(2)), FakeClock()).get("missing")


def test_list_retries_only_its_start() -> None:
    class MidListFailure(FlakyStore):
        def list(self, prefix: str = "") -> Iterator[BlobInfo]:
            self._step()
            yield BlobInfo("a", 1, 0.0)
            raise TemporaryStoreError("lost the connection mid-listing")

    clock = FakeClock()
    inner = MidListFailure(temp(2))
    it = wrap(inner, clock).list()
    assert next(it).key == "a"
    with pytest.raises(TemporaryStoreError):
        next(it)
    assert inner.calls == 3


def test_close_and_url_delegate() -> None:
    inner = FlakyStore([])
    inner.url = "fake://x"
    store = wrap(inner, FakeClock())
    assert store.url == "fake://x"
    with store:
        pass
    assert inner.closed


def test_deadline_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLDSTART_STORE_DEADLINE", raising=False)
    assert store_deadline() == 30.0
    monkeypatch.setenv("COLDSTART_STORE_DEADLINE", "2.5")
    assert store_deadline() == 2.5
    for bad in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv("COLDSTART_STORE_DEADLINE", bad)
        with pytest.raises(StoreError):
            store_deadline()


# --- real endpoints -------------------------------------------------------------------------


@pytest.fixture
def dummy_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "coldstart")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "coldstart")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.usefixtures("dummy_aws")
@pytest.mark.parametrize("op", ["get", "put"])
def test_closed_port_gives_store_unavailable(monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    (port,) = free_ports(1)
    monkeypatch.setenv("COLDSTART_STORE_DEADLINE", "2")
    store = open_store(f"s3://nobucket/p?endpoint=http://127.0.0.1:{port}")
    calls = {"get": lambda: store.get("k"), "put": lambda: store.put("k", b"v")}
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match="127.0.0.1"):
        calls[op]()
    assert 1.5 <= time.monotonic() - start < 6
    store.close()


@pytest.mark.usefixtures("dummy_aws")
def test_s3_errors_are_mapped_without_retries() -> None:
    (port,) = free_ports(1)
    store = S3Store("nobucket", "p", endpoint=f"http://127.0.0.1:{port}", connect_timeout=1)
    for call in (lambda: store.get("k"), lambda: store.exists("k"), lambda: list(store.list("x/"))):
        with pytest.raises(TemporaryStoreError, match="127.0.0.1"):
            call()
    store.close()


@pytest.mark.parametrize(
    ("bucket", "endpoint"), [("", "http://127.0.0.1:9"), ("bkt", "not a url"), ("bkt", "ftp://127.0.0.1:9/")]
)
def test_bad_s3_settings_are_store_errors(bucket: str, endpoint: str) -> None:
    with pytest.raises(StoreError):
        S3Store(bucket, endpoint=endpoint)


def test_store_outage_and_recovery(s3_server: SeaweedServer) -> None:
    """Stop the server, see calls fail fast, restart it mid-retry, and find the data intact."""
    url = s3_server.url_for(s3_server.new_bucket_name(), "outage")
    with open_store(url) as store:
        store.put("kept", b"survives a restart")
    s3_server.stop()
    try:
        with open_store(url) as down:
            assert isinstance(down, RetryingStore)
            with pytest.raises(StoreUnavailable):
                RetryingStore(down.inner, deadline=0.5).get("kept")
            result: dict[str, object] = {}

            def fetch() -> None:
                try:
                    result["data"] = down.get("kept")
                except BaseException as e:  # reported by the assert below
                    result["error"] = e

            waiter = threading.Thread(target=fetch)
            waiter.start()  # retries (deadline 30 s) while the server comes back
            time.sleep(1.0)
            s3_server.start()
            waiter.join(60)
            assert result == {"data": b"survives a restart"}
    finally:
        s3_server.start()  # no-op when running; leaves the server up for later tests

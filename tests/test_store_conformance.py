"""One behaviour suite for every BlobStore backend, each opened through open_store(url)."""
from __future__ import annotations

import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imagefs.errors import BlobNotFound, InvalidKey, StoreError, TemporaryStoreError
from imagefs.store.base import BlobStore
from imagefs.store.factory import open_store
from imagefs.store.local import LocalStore
from imagefs.store.retry import RetryingStore
from imagefs.store.s3 import S3Store
from tests.fixtures.seaweed import SeaweedServer

BAD_KEYS: list[object] = ["", "../x", "a//b", "/abs", "a/./b", "x/..", "a/", None, 7, b"bytes"]


@pytest.fixture(scope="module")
def s3_bucket(s3_server: SeaweedServer) -> str:
    """One bucket per module; each test gets its own prefix inside it."""
    return s3_server.new_bucket_name()


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BlobStore]:
    if request.param == "local":
        url = f"file://{tmp_path / 'store'}"
    else:
        server: SeaweedServer = request.getfixturevalue("s3_server")
        url = server.url_for(request.getfixturevalue("s3_bucket"), f"run/{uuid.uuid4().hex[:12]}")
    with open_store(url) as s:
        yield s


def keys_of(store: BlobStore, prefix: str = "") -> set[str]:
    return {info.key for info in store.list(prefix)}


# --- get / put ------------------------------------------------------------------------------


def test_put_get_round_trip(store: BlobStore) -> None:
    store.put("blobs/one", b"hello, store")
    assert store.get("blobs/one") == b"hello, store"


def test_get_missing_is_blob_not_found(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound) as info:
        store.get("blobs/missing")
    assert info.value.key == "blobs/missing"


def test_put_overwrites(store: BlobStore) -> None:
    store.put("k", b"first version, longer")
    store.put("k", b"second")
    assert store.get("k") == b"second"
    assert [(i.key, i.size) for i in store.list("k")] == [("k", 6)]


def test_overwrite_is_atomic_for_readers(store: BlobStore) -> None:
    old, new = b"a" * 200_000, b"b" * 300_000
    store.put("atomic", old)
    seen: set[bytes] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            seen.add(store.get("atomic"))

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(20):
            store.put("atomic", new if i % 2 == 0 else old)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert seen and seen <= {old, new}


@pytest.mark.parametrize("size", [0, 1, 5 * 1024 * 1024 + 3])
def test_binary_data(store: BlobStore, size: int) -> None:
    data = (bytes(range(256)) + os.urandom(size))[:size]
    store.put("bin/data", data)
    assert store.get("bin/data") == data
    assert [i.size for i in store.list("bin/")] == [size]
    if size > 1000:
        mid = size // 2
        assert store.get_range("bin/data", mid, 4096) == data[mid : mid + 4096]


# --- get_range ------------------------------------------------------------------------------


def test_get_range_middle(store: BlobStore) -> None:
    store.put("r", b"0123456789")
    assert store.get_range("r", 3, 4) == b"3456"
    assert store.get_range("r", 0, 1) == b"0"
    assert store.get_range("r", 0, 10) == b"0123456789"


def test_get_range_past_the_end_is_short(store: BlobStore) -> None:
    store.put("r", b"0123456789")
    assert store.get_range("r", 7, 100) == b"789"
    assert store.get_range("r", 10, 5) == b""
    assert store.get_range("r", 50, 5) == b""


def test_get_range_zero_length(store: BlobStore) -> None:
    store.put("r", b"0123456789")
    assert store.get_range("r", 0, 0) == b""
    assert store.get_range("r", 5, 0) == b""
    with pytest.raises(BlobNotFound):
        store.get_range("missing", 0, 0)


def test_get_range_missing_and_negative(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        store.get_range("missing", 0, 10)
    store.put("r", b"0123")
    with pytest.raises(ValueError):
        store.get_range("r", -1, 2)
    with pytest.raises(ValueError):
        store.get_range("r", 0, -2)


# --- exists / delete ------------------------------------------------------------------------


def test_exists(store: BlobStore) -> None:
    assert not store.exists("e/x")
    store.put("e/x", b"")
    assert store.exists("e/x")


def test_a_folder_is_not_a_blob(store: BlobStore) -> None:
    store.put("e/x", b"")
    assert not store.exists("e")


def test_delete(store: BlobStore) -> None:
    store.put("d/x", b"data")
    store.put("d/y", b"data")
    store.delete("d/x")
    assert not store.exists("d/x")
    with pytest.raises(BlobNotFound):
        store.get("d/x")
    assert keys_of(store, "d/") == {"d/y"}


def test_delete_missing_is_fine(store: BlobStore) -> None:
    store.delete("never/was")
    store.put("once", b"x")
    store.delete("once")
    store.delete("once")


# --- list -----------------------------------------------------------------------------------

CHUNKS = ["ab" + "0" * 62, "ab" + "1" * 62, "cd" + "2" * 62, "0f" + "3" * 62]
INDEXES = ["ab12", "9f00ff"]
OTHERS = ["tags/a/x", "tags/a/b/c", "tags/ab", "top", "images/sha-1"]
ALL_KEYS = {f"chunks/{c}" for c in CHUNKS} | {f"index/{i}" for i in INDEXES} | set(OTHERS)


@pytest.fixture
def filled(store: BlobStore) -> BlobStore:
    for key in sorted(ALL_KEYS):
        store.put(key, key.encode())
    return store


def test_list_everything(filled: BlobStore) -> None:
    infos = list(filled.list())
    assert {i.key for i in infos} == ALL_KEYS
    assert len(infos) == len(ALL_KEYS)
    assert all(i.size == len(i.key) for i in infos)


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("chunks/", {f"chunks/{c}" for c in CHUNKS}),
        ("chunks/ab", {f"chunks/{c}" for c in CHUNKS[:2]}),
        ("chunks/" + CHUNKS[2], {f"chunks/{CHUNKS[2]}"}),
        ("index/", {f"index/{i}" for i in INDEXES}),
        ("index/ab", {"index/ab12"}),
        ("tags/a/", {"tags/a/x", "tags/a/b/c"}),
        ("tags/a", {"tags/a/x", "tags/a/b/c", "tags/ab"}),
        ("tags/a/b/", {"tags/a/b/c"}),
        ("t", {"tags/a/x", "tags/a/b/c", "tags/ab", "top"}),
        ("nothing/", set()),
        ("tags/zz", set()),
        ("chunks/ff", set()),
    ],
)
def test_list_by_prefix(filled: BlobStore, prefix: str, expected: set[str]) -> None:
    assert keys_of(filled, prefix) == expected


def test_list_reports_size_and_mtime(store: BlobStore) -> None:
    before = time.time()
    store.put("m/blob", b"x" * 1234)
    (info,) = store.list("m/")
    assert (info.key, info.size) == ("m/blob", 1234)
    assert before - 120 <= info.mtime <= time.time() + 120  # S3 keeps whole seconds


def test_list_empty_store(store: BlobStore) -> None:
    assert list(store.list()) == []
    assert list(store.list("chunks/")) == []


def test_list_rejects_bad_prefix(store: BlobStore) -> None:
    with pytest.raises(InvalidKey):
        list(store.list("../"))


# --- keys -----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", BAD_KEYS, ids=repr)
def test_invalid_keys_rejected(store: BlobStore, key: object) -> None:
    calls = [
        lambda: store.get(key),  # type: ignore[arg-type]
        lambda: store.get_range(key, 0, 1),  # type: ignore[arg-type]
        lambda: store.put(key, b"x"),  # type: ignore[arg-type]
        lambda: store.exists(key),  # type: ignore[arg-type]
        lambda: store.delete(key),  # type: ignore[arg-type]
    ]
    for call in calls:
        with pytest.raises(InvalidKey):
            call()
    assert list(store.list()) == []


def test_unusual_but_valid_keys(store: BlobStore) -> None:
    keys = ["a:b", "x@1=2+3", "v1.0_rc-2", "A" * 200, "deep/" * 20 + "leaf"]
    for key in keys:
        store.put(key, key.encode())
    for key in keys:
        assert store.get(key) == key.encode()
    assert keys_of(store) == set(keys)


# --- concurrency ----------------------------------------------------------------------------


def test_concurrent_puts(store: BlobStore) -> None:
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(8):
                store.put(f"conc/{n}/{i}", f"{n}:{i}".encode() * 100)
                store.put("conc/shared", f"writer {n}".encode())
        except BaseException as e:  # collected and re-raised below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    expected = {f"conc/{n}/{i}" for n in range(16) for i in range(8)} | {"conc/shared"}
    assert keys_of(store, "conc/") == expected
    assert store.get("conc/7/3") == b"7:3" * 100
    assert store.get("conc/shared") in {f"writer {n}".encode() for n in range(16)}


# --- backend specifics ----------------------------------------------------------------------


def test_open_store_kinds(tmp_path: Path) -> None:
    assert isinstance(open_store(str(tmp_path / "plain")), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}/f"), LocalStore)
    with pytest.raises(StoreError):
        open_store("ftp://example/x")


def test_s3_bucket_is_created_on_first_put(s3_server: SeaweedServer) -> None:
    bucket = s3_server.new_bucket_name()
    with open_store(s3_server.url_for(bucket)) as s:  # no prefix: keys at the bucket root
        assert isinstance(s, RetryingStore)
        assert not s.exists("a") and list(s.list()) == []
        with pytest.raises(BlobNotFound):
            s.get("a")
        s.delete("a")
        s.put("a", b"1")
        assert s.get("a") == b"1"
    client = s3_server.client()
    try:
        listed = client.list_objects_v2(Bucket=bucket)["Contents"]
    finally:
        client.close()
    assert [o["Key"] for o in listed] == ["a"]


def test_s3_prefix_isolates_stores(s3_server: SeaweedServer, s3_bucket: str) -> None:
    with open_store(s3_server.url_for(s3_bucket, "iso/one")) as one, open_store(
        s3_server.url_for(s3_bucket, "iso/one-more")
    ) as other:
        one.put("k", b"1")
        other.put("k", b"2")
        assert (one.get("k"), other.get("k")) == (b"1", b"2")
        assert [i.key for i in one.list()] == ["k"]


@pytest.fixture
def no_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.usefixtures("no_aws_credentials")
def test_s3_dummy_credentials_with_explicit_endpoint(s3_server: SeaweedServer, s3_bucket: str) -> None:
    with S3Store(s3_bucket, "anon", endpoint=s3_server.endpoint) as s:
        s.put("k", b"v")
        assert s.get("k") == b"v"


@pytest.mark.usefixtures("no_aws_credentials")
def test_s3_without_credentials_or_endpoint_is_a_store_error() -> None:
    with S3Store("coldstart-no-such-bucket", region="us-east-1") as s:
        with pytest.raises(StoreError, match="credentials") as info:
            s.get("k")  # fails while signing, before any network traffic
    assert not isinstance(info.value, TemporaryStoreError)


@contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """Make a directory unwritable even for root (immutable flag), or skip where that is impossible."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield
        finally:
            path.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot make a directory unwritable for root here (no chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("key", ["top", "chunks/" + CHUNKS[0]])
@pytest.mark.may_skip  # where chattr +i is impossible (see unwritable)
def test_local_put_into_unwritable_dir_is_store_error(tmp_path: Path, key: str) -> None:
    store = open_store(f"file://{tmp_path / 'ro'}")
    with unwritable(tmp_path / "ro"):
        with pytest.raises(StoreError):
            store.put(key, b"data")


def test_local_put_where_a_file_is_in_the_way(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 's'}")
    store.put("tags", b"a blob where a folder is wanted")
    with pytest.raises(StoreError):
        store.put("tags/a/x", b"data")

"""S3 backend for AWS and for local S3 servers (SeaweedFS, MinIO, ...).

Objects live under ``<prefix>/<key>`` in one bucket, addressed path-style. Reads (get, get_range,
exists), deletes and the PUT of a small document (up to LEAN_PUT_MAX: leases, tags) take the lean
path of imagefs.store.s3fast: signed requests over keep-alive http.client connections, no boto3.
Bigger writes (chunks, indexes), bucket creation and listings (imports, gc) use boto3, imported
only when one of them is first called, so a process that only reads and keeps a lease (the mount
daemon, the runner's resolver) never imports it. Both paths sign with the same credentials and
region.

The bucket is created lazily, on the first put of each S3Store: a HEAD of the bucket, and
CreateBucket if that says 404 (a put that is still answered NoSuchBucket creates it once more and
repeats). Opening a store therefore does no network I/O (so every call that can fail is one that
RetryingStore retries), and reads from a bucket that does not exist yet find nothing.

Each call makes one attempt (botocore's own retries are off); callers get TemporaryStoreError for
anything worth retrying and wrap the store in RetryingStore. A read ends by the deadline of the
RetryingStore call it serves, else request_timeout seconds after it started, however slowly the
server sends. No botocore or http.client exception
leaves this module: every one is mapped onto imagefs.errors.
"""
from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Iterator
from urllib.parse import urlencode, urlparse

from imagefs.errors import BlobNotFound, StoreError, TemporaryStoreError
from imagefs.store.base import BlobInfo, BlobStore, validate_key, validate_prefix
from imagefs.store.s3fast import (
    TEMPORARY_CODES,
    TEMPORARY_STATUS,
    Response,
    S3Http,
    endpoint_for,
    one_line,
    response_error,
)
from imagefs.store.sigv4 import LazyCredentials, Signer, resolve_region

_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchBucket"})
_BUCKET_EXISTS = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})
# Small documents (leases, tags, build-cache entries) are PUT over the lean client: a process
# that only reads the store otherwise (a mount's daemon, writing its lease) never loads boto3.
# Chunks and indexes keep boto3's PUT (its retries and no whole-call deadline suit big bodies).
LEAN_PUT_MAX = 64 << 10


@functools.cache
def _boto() -> SimpleNamespace:
    """boto3 and the exception classes this module maps, imported on first use."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        ConnectionError as BotoConnectionError,
        HTTPClientError,
        IncompleteReadError,
    )
    from urllib3.exceptions import HTTPError as URLLib3Error

    return SimpleNamespace(
        boto3=boto3, Config=Config, BotoCoreError=BotoCoreError, ClientError=ClientError,
        # Everything botocore or the transport under it may raise; all of it is mapped.
        transport=(BotoCoreError, ClientError, URLLib3Error, OSError),
        temporary=(BotoConnectionError, HTTPClientError, IncompleteReadError, URLLib3Error, OSError),
    )


def _error_code(e: Any) -> tuple[str, int]:
    code = str(e.response.get("Error", {}).get("Code", ""))
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_not_found(e: Any) -> bool:
    code, status = _error_code(e)
    return code in _NOT_FOUND or (status == 404 and not code)


def _is_temporary(e: Any) -> bool:
    code, status = _error_code(e)
    return code in TEMPORARY_CODES or status in TEMPORARY_STATUS


def _map_error(e: Exception, what: str) -> StoreError:
    """Translate a botocore/transport exception into the store error hierarchy."""
    boto = _boto()
    if isinstance(e, boto.ClientError):
        code, status = _error_code(e)
        detail = " ".join(str(e.response.get("Error", {}).get("Message", "")).split())[:200]
        msg = f"s3 {what}: {code or 'error'} (HTTP {status})" + (f": {detail}" if detail else "")
        return TemporaryStoreError(msg) if _is_temporary(e) else StoreError(msg)
    if isinstance(e, boto.temporary):
        return TemporaryStoreError(f"s3 {what}: {one_line(e)}")
    return StoreError(f"s3 {what}: {one_line(e)}")


def _is_http_url(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def _client_config(max_pool: int, connect_timeout: float, read_timeout: float) -> Any:
    return _boto().Config(
        max_pool_connections=max_pool,
        retries={"total_max_attempts": 1, "mode": "standard"},  # one attempt: RetryingStore retries
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        s3={"addressing_style": "path"},
        # Checksums only where the API demands them: many S3-compatible servers reject the rest.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )


class S3Store(BlobStore):
    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint: str | None = None,
        region: str | None = None,
        max_pool: int = 32,
        *,
        connect_timeout: float = 3.0,
        read_timeout: float = 5.0,
        request_timeout: float = 60.0,
    ) -> None:
        if not bucket:
            raise StoreError("s3 store URL names no bucket")
        if endpoint is not None and not _is_http_url(endpoint):
            raise StoreError(f"s3 endpoint must be an http:// or https:// URL, not {endpoint!r}")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)
        self.url = self._make_url(endpoint, region)
        self.endpoint = endpoint
        self.region = resolve_region(region)
        self._credentials = LazyCredentials(endpoint)
        self._http = S3Http(endpoint_for(endpoint, self.region), Signer(self.region), self._credentials,
                            max_idle=max_pool, connect_timeout=connect_timeout, read_timeout=read_timeout,
                            request_timeout=request_timeout)
        self._timeouts = (max_pool, connect_timeout, read_timeout)
        self._client_lock = threading.Lock()
        self._client_obj: Any = None
        self._bucket_lock = threading.Lock()
        self._bucket_ready = False

    def _make_url(self, endpoint: str | None, region: str | None) -> str:
        query = {k: v for k, v in (("endpoint", endpoint), ("region", region)) if v}
        base = f"s3://{self.bucket}/{self.prefix}"
        return f"{base}?{urlencode(query)}" if query else base

    def _full(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- the lean path: reads, deletes, small writes -------------------------------------------
    def _request(self, method: str, key: str, what: str, headers: dict[str, str] | None = None,
              body: bytes | None = None) -> Response:
        return self._http.request(method, f"/{self.bucket}/{self._full(key)}", what, headers, body)

    def get(self, key: str) -> bytes:
        resp = self._request("GET", key, f"get {key}")
        if resp.status == 404:
            raise BlobNotFound(key)
        if resp.status != 200:
            raise response_error(f"get {key}", resp)
        return resp.body

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        if length == 0:
            if not self.exists(key):
                raise BlobNotFound(key)
            return b""
        what = f"get_range {key}"
        resp = self._request("GET", key, what, {"Range": f"bytes={offset}-{offset + length - 1}"})
        if resp.status == 404:
            raise BlobNotFound(key)
        if resp.status == 416:  # offset at or past the end: a short (empty) read
            return b""
        if resp.status not in (200, 206):
            raise response_error(what, resp)
        if "content-range" not in resp.headers:  # a server that ignored Range sent the whole blob
            return resp.body[offset : offset + length]
        return resp.body

    def exists(self, key: str) -> bool:
        resp = self._request("HEAD", key, f"exists {key}")
        if resp.status == 404:
            return False
        if resp.status != 200:
            raise response_error(f"exists {key}", resp)
        return True

    # -- writes (big ones through boto3), deletes, listings ------------------------------------
    @property
    def _client(self) -> Any:
        with self._client_lock:
            if self._client_obj is None:
                self._client_obj = self._make_client()
            return self._client_obj

    def _make_client(self) -> Any:
        boto = _boto()
        creds = self._credentials.explicit()
        keys = {} if creds is None else {"aws_access_key_id": creds.access_key,
                                         "aws_secret_access_key": creds.secret_key,
                                         "aws_session_token": creds.token or None}
        try:
            return boto.boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint, region_name=self.region,
                config=_client_config(*self._timeouts), **keys)
        except (boto.BotoCoreError, ValueError) as e:
            raise StoreError(f"s3 client for {self.url}: {one_line(e)}") from None

    @contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except Exception as e:
            if isinstance(e, _boto().transport):
                raise _map_error(e, what) from None
            raise

    def put(self, key: str, data: bytes) -> None:
        if len(data) <= LEAN_PUT_MAX and self._lean_put(key, bytes(data)):
            return
        full = self._full(key)
        with self._mapped(f"put {key}"):
            if not self._bucket_ready:
                self._ensure_bucket()
            try:
                self._client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data))
            except _boto().ClientError as e:
                if _error_code(e)[0] != "NoSuchBucket":
                    raise
                self._create_bucket()  # deleted behind our back: make it again, once
                self._client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data))

    def _lean_put(self, key: str, data: bytes) -> bool:
        """PUT over the lean client (no boto3: a mount's lease costs its daemon no import of it);
        False where the bucket is missing, which the boto3 path then creates."""
        resp = self._request("PUT", key, f"put {key}", body=data)
        if resp.status == 200:
            return True
        if resp.status == 404:
            return False
        raise response_error(f"put {key}", resp)

    def _ensure_bucket(self) -> None:
        """Create the bucket if HEAD says it is missing; any other answer leaves it to put."""
        with self._bucket_lock:
            if self._bucket_ready:
                return
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except _boto().ClientError as e:
                if _is_not_found(e):
                    self._create_bucket()
                elif _is_temporary(e):
                    raise
            self._bucket_ready = True

    def _create_bucket(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except _boto().ClientError as e:
            if _error_code(e)[0] not in _BUCKET_EXISTS:
                raise

    def delete(self, key: str) -> None:
        resp = self._request("DELETE", key, f"delete {key}")
        if resp.status not in (200, 204, 404):  # deleting what is not there is no error
            raise response_error(f"delete {key}", resp)

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        validate_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        with self._mapped(f"list {prefix or '(all)'}"):
            paginator = self._client.get_paginator("list_objects_v2")
            try:
                for page in paginator.paginate(Bucket=self.bucket, Prefix=root + prefix):
                    for obj in page.get("Contents", []):
                        yield BlobInfo(obj["Key"][len(root) :], int(obj["Size"]), obj["LastModified"].timestamp())
            except _boto().ClientError as e:
                if _error_code(e)[0] != "NoSuchBucket":  # no bucket yet: nothing to list
                    raise

    def close(self) -> None:
        self._http.close()
        with self._client_lock:
            client, self._client_obj = self._client_obj, None
        if client is not None:
            client.close()

"""S3 backend over boto3, for AWS and for local S3 servers (SeaweedFS, MinIO, ...).

Objects live under ``<prefix>/<key>`` in one bucket, addressed path-style. The bucket is
created lazily, on the first put of each S3Store: a HEAD of the bucket, and CreateBucket if
that says 404 (a put that is still answered NoSuchBucket creates it once more and repeats).
Opening a store therefore does no network I/O (so every call that can fail is one that
RetryingStore retries), and reads from a bucket that does not exist yet find nothing.

botocore's own retries are switched off (one attempt per call); callers get
TemporaryStoreError for anything worth retrying and wrap the store in RetryingStore.
No botocore exception leaves this module: every one is mapped onto imagefs.errors.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlencode, urlparse

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

from imagefs.errors import BlobNotFound, StoreError, TemporaryStoreError
from imagefs.store.base import BlobInfo, BlobStore, validate_key, validate_prefix

_NOT_FOUND = frozenset({"NoSuchKey", "NotFound", "404", "NoSuchBucket"})
_TEMPORARY_CODES = frozenset(
    {
        "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests",
        "RequestLimitExceeded", "RequestTimeout", "InternalError", "ServiceUnavailable",
    }
)
_TEMPORARY_STATUS = frozenset({429, 500, 502, 503, 504})
# Everything botocore or the transport under it may raise; all of it is mapped, none escapes.
_TRANSPORT_ERRORS = (BotoCoreError, ClientError, URLLib3Error, OSError)
_BUCKET_EXISTS = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})
# Credentials a local S3 server accepts; used only with an explicit endpoint and no real ones.
_DUMMY_CREDENTIALS = {"aws_access_key_id": "coldstart", "aws_secret_access_key": "coldstart"}


def _error_code(e: ClientError) -> tuple[str, int]:
    code = str(e.response.get("Error", {}).get("Code", ""))
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _is_not_found(e: ClientError) -> bool:
    code, status = _error_code(e)
    return code in _NOT_FOUND or (status == 404 and not code)


def _is_temporary(e: ClientError) -> bool:
    code, status = _error_code(e)
    return code in _TEMPORARY_CODES or status in _TEMPORARY_STATUS


def _map_error(e: Exception, what: str) -> StoreError:
    """Translate a botocore/transport exception into the store error hierarchy."""
    if isinstance(e, ClientError):
        code, status = _error_code(e)
        detail = " ".join(str(e.response.get("Error", {}).get("Message", "")).split())[:200]
        msg = f"s3 {what}: {code or 'error'} (HTTP {status})" + (f": {detail}" if detail else "")
        return TemporaryStoreError(msg) if _is_temporary(e) else StoreError(msg)
    if isinstance(e, (BotoConnectionError, HTTPClientError, IncompleteReadError, URLLib3Error, OSError)):
        return TemporaryStoreError(f"s3 {what}: {_one_line(e)}")
    return StoreError(f"s3 {what}: {_one_line(e)}")


def _is_http_url(url: str) -> bool:
    parsed = urlparse(url)
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]


def _client_config(max_pool: int, connect_timeout: float, read_timeout: float) -> Config:
    return Config(
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
        self._bucket_lock = threading.Lock()
        self._bucket_ready = False
        config = _client_config(max_pool, connect_timeout, read_timeout)
        try:
            self._client = self._make_client(endpoint, region, config)
        except (BotoCoreError, ValueError) as e:
            raise StoreError(f"s3 client for {self.url}: {_one_line(e)}") from None

    def _make_url(self, endpoint: str | None, region: str | None) -> str:
        query = {k: v for k, v in (("endpoint", endpoint), ("region", region)) if v}
        base = f"s3://{self.bucket}/{self.prefix}"
        return f"{base}?{urlencode(query)}" if query else base

    @staticmethod
    def _make_client(endpoint: str | None, region: str | None, config: Config) -> Any:
        session = boto3.session.Session()
        creds: dict[str, str] = {}
        if endpoint and session.get_credentials() is None:
            creds = dict(_DUMMY_CREDENTIALS)
        region = region or session.region_name or "us-east-1"
        return session.client("s3", endpoint_url=endpoint, region_name=region, config=config, **creds)

    def _full(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        try:
            yield
        except StoreError:
            raise
        except _TRANSPORT_ERRORS as e:
            raise _map_error(e, what) from None

    def get(self, key: str) -> bytes:
        full = self._full(key)
        with self._mapped(f"get {key}"):
            try:
                resp = self._client.get_object(Bucket=self.bucket, Key=full)
            except ClientError as e:
                if _is_not_found(e):
                    raise BlobNotFound(key) from None
                raise
            with resp["Body"] as body:
                return body.read()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("offset and length must be >= 0")
        full = self._full(key)
        if length == 0:
            if not self.exists(key):
                raise BlobNotFound(key)
            return b""
        with self._mapped(f"get_range {key}"):
            return self._read_range(key, full, offset, length)

    def _read_range(self, key: str, full: str, offset: int, length: int) -> bytes:
        byte_range = f"bytes={offset}-{offset + length - 1}"
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=full, Range=byte_range)
        except ClientError as e:
            if _is_not_found(e):
                raise BlobNotFound(key) from None
            if _error_code(e)[1] == 416:  # offset at or past the end: a short (empty) read
                return b""
            raise
        with resp["Body"] as body:
            data = body.read()
        if not resp.get("ContentRange"):  # a server that ignored Range sent the whole blob
            data = data[offset : offset + length]
        return data

    def put(self, key: str, data: bytes) -> None:
        full = self._full(key)
        with self._mapped(f"put {key}"):
            if not self._bucket_ready:
                self._ensure_bucket()
            try:
                self._client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data))
            except ClientError as e:
                if _error_code(e)[0] != "NoSuchBucket":
                    raise
                self._create_bucket()  # deleted behind our back: make it again, once
                self._client.put_object(Bucket=self.bucket, Key=full, Body=bytes(data))

    def _ensure_bucket(self) -> None:
        """Create the bucket if HEAD says it is missing; any other answer leaves it to put."""
        with self._bucket_lock:
            if self._bucket_ready:
                return
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError as e:
                if _is_not_found(e):
                    self._create_bucket()
                elif _is_temporary(e):
                    raise
            self._bucket_ready = True

    def _create_bucket(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as e:
            if _error_code(e)[0] not in _BUCKET_EXISTS:
                raise

    def exists(self, key: str) -> bool:
        full = self._full(key)
        with self._mapped(f"exists {key}"):
            try:
                self._client.head_object(Bucket=self.bucket, Key=full)
            except ClientError as e:
                if _is_not_found(e):
                    return False
                raise
            return True

    def delete(self, key: str) -> None:
        full = self._full(key)
        with self._mapped(f"delete {key}"):
            try:
                self._client.delete_object(Bucket=self.bucket, Key=full)
            except ClientError as e:
                if not _is_not_found(e):
                    raise

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        validate_prefix(prefix)
        root = f"{self.prefix}/" if self.prefix else ""
        with self._mapped(f"list {prefix or '(all)'}"):
            paginator = self._client.get_paginator("list_objects_v2")
            try:
                for page in paginator.paginate(Bucket=self.bucket, Prefix=root + prefix):
                    for obj in page.get("Contents", []):
                        yield BlobInfo(obj["Key"][len(root) :], int(obj["Size"]), obj["LastModified"].timestamp())
            except ClientError as e:
                if _error_code(e)[0] != "NoSuchBucket":  # no bucket yet: nothing to list
                    raise

    def close(self) -> None:
        self._client.close()

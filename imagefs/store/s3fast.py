"""The lean S3 read path: signed GET and HEAD over a bounded pool of keep-alive connections.

boto3 costs a read-only process ~0.5 s to import and set up and ~2.6 ms of CPU per GET; this
path needs only the standard library (http.client, hmac, hashlib) and a small fraction of that
CPU. Objects are addressed path-style (``/<bucket>/<key>``).

Answers come back as Response objects; transport failures (refused, reset, timed out, cut short)
raise TemporaryStoreError naming the endpoint, and response_error() maps an HTTP error answer
onto the store error hierarchy the same way for every caller.
"""
from __future__ import annotations

import http.client
import os
import re
import ssl
import threading
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlparse

from imagefs.errors import StoreError, TemporaryStoreError
from imagefs.store.sigv4 import Credentials, Signer, uri_encode

TEMPORARY_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "TooManyRequests",
    "RequestLimitExceeded", "RequestTimeout", "InternalError", "ServiceUnavailable",
})
TEMPORARY_STATUS = frozenset({429, 500, 502, 503, 504})
# A keep-alive connection the server has closed since its last use fails like this on reuse.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)
_XML_FIELD = re.compile(r"<(Code|Message)>([^<]*)</\1>")


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    headers: http.client.HTTPMessage  # looked up case-insensitively
    body: bytes


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text[:300]


def response_error(what: str, resp: Response) -> StoreError:
    """The store error for an S3 error answer: temporary for throttling and 5xx, else permanent."""
    fields = dict(_XML_FIELD.findall(resp.body[:4096].decode("utf-8", "replace")))
    code = fields.get("Code", "")
    detail = " ".join((fields.get("Message") or resp.reason).split())[:200]
    msg = f"s3 {what}: {code or 'error'} (HTTP {resp.status})" + (f": {detail}" if detail else "")
    if code in TEMPORARY_CODES or resp.status in TEMPORARY_STATUS:
        return TemporaryStoreError(msg)
    return StoreError(msg)


def endpoint_for(endpoint: str | None, region: str) -> str:
    return endpoint or f"https://s3.{region}.amazonaws.com"


class ConnectionPool:
    """Idle keep-alive connections to one endpoint, at most max_idle kept; any number in use."""

    def __init__(self, endpoint: str, *, max_idle: int, connect_timeout: float,
                 read_timeout: float) -> None:
        parsed = urlparse(endpoint)
        self.https = parsed.scheme == "https"
        self.hostname = parsed.hostname or ""
        self.port = parsed.port or (443 if self.https else 80)
        default = self.port == (443 if self.https else 80)
        name = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        self.host_header = name if default else f"{name}:{self.port}"
        self.base_path = parsed.path.rstrip("/")
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None

    def take(self) -> tuple[http.client.HTTPConnection, bool]:
        """(connection, reused): the most recently returned idle one, else a new one."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self.connect(), False

    def give(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def connect(self) -> http.client.HTTPConnection:
        """A new connection, connected (so connection errors surface here)."""
        conn: http.client.HTTPConnection
        if self.https:
            conn = http.client.HTTPSConnection(self.hostname, self.port, timeout=self.connect_timeout,
                                               context=self._ssl_context())
        else:
            conn = http.client.HTTPConnection(self.hostname, self.port, timeout=self.connect_timeout)
        try:
            conn.connect()
            assert conn.sock is not None
            conn.sock.settimeout(self.read_timeout)
        except BaseException:
            conn.close()
            raise
        return conn

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            bundle = os.environ.get("AWS_CA_BUNDLE") or None
            self._ssl = ssl.create_default_context(cafile=bundle)
        return self._ssl


class S3Http:
    """Signed, body-less S3 requests (GET, HEAD) over a ConnectionPool."""

    def __init__(self, endpoint: str, signer: Signer, credentials: Callable[[], Credentials], *,
                 max_idle: int = 32, connect_timeout: float = 3.0, read_timeout: float = 5.0) -> None:
        self.endpoint = endpoint
        self.signer = signer
        self.credentials = credentials
        self.pool = ConnectionPool(endpoint, max_idle=max_idle, connect_timeout=connect_timeout,
                                   read_timeout=read_timeout)

    def request(self, method: str, path: str, what: str, headers: dict[str, str] | None = None) -> Response:
        """Send method for path (unencoded, e.g. /bucket/key); transport failures are temporary."""
        encoded = uri_encode(self.pool.base_path + path, keep_slash=True)
        signed = self.signer.sign(self.credentials(), method, self.pool.host_header, encoded)
        send = {**signed, **(headers or {})}
        try:
            return self._exchange(method, encoded, send)
        except (OSError, http.client.HTTPException) as e:
            raise TemporaryStoreError(f"s3 {what}: {self.endpoint}{encoded}: {one_line(e)}") from None

    def _exchange(self, method: str, path: str, headers: dict[str, str]) -> Response:
        conn, reused = self.pool.take()
        try:
            return self._once(conn, method, path, headers)
        except _STALE:
            if not reused:
                raise
        # The server closed an idle connection: others may be stale too, so retry on a new one.
        return self._once(self.pool.connect(), method, path, headers)

    def _once(self, conn: http.client.HTTPConnection, method: str, path: str,
              headers: dict[str, str]) -> Response:
        """One request and its whole answer; the connection goes back to the pool only after that."""
        try:
            conn.request(method, path, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except BaseException:
            conn.close()
            raise
        answer = Response(resp.status, resp.reason, resp.msg, body)
        if resp.will_close:
            conn.close()
        else:
            self.pool.give(conn)
        return answer

    def close(self) -> None:
        self.pool.close()

"""The lean S3 path: signed GET, HEAD, DELETE and small PUTs over a bounded pool of keep-alive
connections.

boto3 costs a read-only process ~0.5 s to import and set up and ~2.6 ms of CPU per GET; this
path needs only the standard library (http.client, hmac, hashlib) and a small fraction of that
CPU. Objects are addressed path-style (``/<bucket>/<key>``).

Answers come back as Response objects; transport failures (refused, reset, timed out, cut short)
raise TemporaryStoreError naming the endpoint, and response_error() maps an HTTP error answer
onto the store error hierarchy the same way for every caller.

Each request has a deadline: that of the RetryingStore call it serves (retry.call_deadline()),
else request_timeout from its start. Its answer (status line, headers and body) is read through a
_Receiver that starts no receive past the deadline and lets none wait beyond it, so a server that
sends slowly (a byte within every read timeout) cannot hold a request, nor a caller, past it.
"""
from __future__ import annotations

import hashlib
import http.client
import io
import math
import os
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlparse

from imagefs.errors import StoreError, TemporaryStoreError
from imagefs.store.retry import call_deadline
from imagefs.store.sigv4 import EMPTY_SHA256, Credentials, Signer, uri_encode

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


def time_left(deadline: float) -> float:
    """Seconds until deadline (a time.monotonic() value); TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no complete answer by the request's deadline")
    return left


class _Timed(http.client.HTTPConnection):
    """A pool connection: the answer to each request is read against that request's deadline."""

    deadline = math.inf  # time.monotonic() by which the answer in progress must be read
    read_timeout = 5.0  # the socket's timeout between requests (each receive waits at most this)
    shortened = False  # the socket's timeout was cut below read_timeout to meet a deadline

    # http.client makes each answer with response_class(sock, ...), and the answer reads from
    # sock.makefile(): here a _Receiver makes that file.
    def response_class(  # type: ignore[assignment]
            self, sock: socket.socket, *args: Any, **kwargs: Any) -> http.client.HTTPResponse:
        return http.client.HTTPResponse(_Receiver(self, sock), *args, **kwargs)  # type: ignore[arg-type]

    def restore_timeout(self) -> None:
        """Back to read_timeout after a request that ended close to its deadline."""
        if self.shortened and self.sock is not None:
            self.sock.settimeout(self.read_timeout)
        self.shortened = False


class _TimedTLS(_Timed, http.client.HTTPSConnection):
    """The same over TLS."""


class _Receiver(io.RawIOBase):
    """A connection's socket as one answer reads it: a receive starts only before the request's
    deadline and waits at most min(read timeout, time left). Costs a clock read per receive; the
    socket's timeout is changed (a system call) only within the last read timeout before the
    deadline."""

    def __init__(self, conn: _Timed, sock: socket.socket) -> None:
        super().__init__()
        self._conn = conn
        self._sock = sock
        # What http.client would read from: it keeps the socket open until the answer is read,
        # even once the connection has let go of it (an answer that closes the connection).
        self._raw = sock.makefile("rb", buffering=0)

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(self)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int | None:
        conn = self._conn
        left = time_left(conn.deadline)
        if left < conn.read_timeout:
            self._sock.settimeout(left)
            conn.shortened = True
        return self._raw.readinto(buffer)

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


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
        self._idle: list[_Timed] = []
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None

    def take(self, deadline: float = math.inf) -> tuple[_Timed, bool]:
        """(connection, reused): the most recently returned idle one, else a new one."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        return self.connect(deadline), False

    def give(self, conn: _Timed) -> None:
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

    def connect(self, deadline: float = math.inf) -> _Timed:
        """A new connection, connected (so connection errors surface here), by deadline at the latest."""
        timeout = min(self.connect_timeout, time_left(deadline))
        conn: _Timed
        if self.https:
            conn = _TimedTLS(self.hostname, self.port, timeout=timeout, context=self._ssl_context())
        else:
            conn = _Timed(self.hostname, self.port, timeout=timeout)
        conn.read_timeout = self.read_timeout
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
    """Signed, body-less S3 requests (GET, HEAD) over a ConnectionPool.

    A request ends by the deadline of the RetryingStore call it serves, else request_timeout
    seconds after it started; one still unanswered then fails as a timeout (TemporaryStoreError)."""

    def __init__(self, endpoint: str, signer: Signer, credentials: Callable[[], Credentials], *,
                 max_idle: int = 32, connect_timeout: float = 3.0, read_timeout: float = 5.0,
                 request_timeout: float = 60.0) -> None:
        self.endpoint = endpoint
        self.signer = signer
        self.credentials = credentials
        self.request_timeout = request_timeout
        self.pool = ConnectionPool(endpoint, max_idle=max_idle, connect_timeout=connect_timeout,
                                   read_timeout=read_timeout)

    def request(self, method: str, path: str, what: str, headers: dict[str, str] | None = None,
                body: bytes | None = None) -> Response:
        """Send method for path (unencoded, e.g. /bucket/key), with body if given (a small PUT);
        transport failures are temporary."""
        encoded = uri_encode(self.pool.base_path + path, keep_slash=True)
        payload = EMPTY_SHA256 if body is None else hashlib.sha256(body).hexdigest()
        signed = self.signer.sign(self.credentials(), method, self.pool.host_header, encoded,
                                  payload_hash=payload)
        send = {**signed, **(headers or {})}
        if body is not None:
            send["content-length"] = str(len(body))
        try:
            return self._exchange(method, encoded, send, self._deadline(), body)
        except (OSError, http.client.HTTPException) as e:
            raise TemporaryStoreError(f"s3 {what}: {self.endpoint}{encoded}: {one_line(e)}") from None

    def _deadline(self) -> float:
        """When a request starting now must be answered by (time.monotonic())."""
        outer = call_deadline()
        return time.monotonic() + self.request_timeout if outer is None else outer

    def _exchange(self, method: str, path: str, headers: dict[str, str], deadline: float,
                  body: bytes | None = None) -> Response:
        conn, reused = self.pool.take(deadline)
        try:
            return self._once(conn, method, path, headers, deadline, body)
        except _STALE:
            if not reused:
                raise
        # The server closed an idle connection: others may be stale too, so retry on a new one.
        return self._once(self.pool.connect(deadline), method, path, headers, deadline, body)

    def _once(self, conn: _Timed, method: str, path: str, headers: dict[str, str],
              deadline: float, body: bytes | None = None) -> Response:
        """One request and its whole answer, by deadline; the connection goes back to the pool only
        after that (one past its deadline is closed: it may still be carrying the answer)."""
        conn.deadline = deadline
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except BaseException:
            conn.close()
            raise
        answer = Response(resp.status, resp.reason, resp.msg, body)
        if resp.will_close:
            conn.close()
        else:
            conn.restore_timeout()
            self.pool.give(conn)
        return answer

    def close(self) -> None:
        self.pool.close()

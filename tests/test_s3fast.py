"""The lean S3 read path: wire behaviour against a scripted HTTP server, and no boto3 in readers."""
from __future__ import annotations

import datetime
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from imagefs.errors import BlobNotFound, StoreError, StoreUnavailable, TemporaryStoreError
from imagefs.store.retry import RetryingStore
from imagefs.store.s3 import S3Store
from imagefs.store.s3fast import ConnectionPool
from tests.fixtures.seaweed import SeaweedServer, free_ports

Reply = tuple[int, dict[str, str], bytes]


@dataclass
class Script:
    """What the fake server answers (by method and path) and what it saw."""

    replies: dict[tuple[str, str], Callable[[dict[str, str]], Reply]] = field(default_factory=dict)
    # answers what replies does not name: (method, path, headers) -> reply
    default: Callable[[str, str, dict[str, str]], Reply] | None = None
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    connections: set[tuple[str, int]] = field(default_factory=set)
    close_after_reply: bool = False
    trickle: float = 0.0  # seconds between the bytes of a body (0: the body at once)


def _handler(script: Script) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _answer(self) -> None:
            headers = {k.lower(): v for k, v in self.headers.items()}
            script.seen.append((self.command, self.path, headers))
            script.connections.add(self.client_address)
            make = script.replies.get((self.command, self.path))
            if make:
                status, extra, body = make(headers)
            elif script.default:
                status, extra, body = script.default(self.command, self.path, headers)
            else:
                status, extra, body = 404, {}, b""
            self.send_response(status)
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "HEAD":
                pass
            elif script.trickle:
                self._trickle(body)
            else:
                self.wfile.write(body)
            if script.close_after_reply:  # drop the connection without saying so (a stale keep-alive)
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True

        def _trickle(self, body: bytes) -> None:
            """A byte at a time, each well within any read timeout: only a deadline stops it."""
            try:
                for i in range(len(body)):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(script.trickle)
            except OSError:  # the client gave up
                self.close_connection = True

        do_GET = do_HEAD = _answer

    return Handler


@contextmanager
def serve(script: Script) -> Iterator[str]:
    """A fake S3 endpoint answering as script says, on a free port; yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fake-s3", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def aws_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test/secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "tok")


@pytest.fixture
def fake(aws_keys: None) -> Iterator[tuple[Script, str]]:
    script = Script()
    with serve(script) as endpoint:
        yield script, endpoint


def ok(body: bytes, **headers: str) -> Callable[[dict[str, str]], Reply]:
    return lambda _h: (200, dict(headers), body)


def error(status: int, code: str = "", message: str = "") -> Callable[[dict[str, str]], Reply]:
    body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode() if code else b""
    return lambda _h: (status, {"Content-Type": "application/xml"}, body)


def test_get_sends_a_request_botocore_would_accept(fake: tuple[Script, str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import botocore.auth
    import botocore.credentials
    from botocore.awsrequest import AWSRequest

    script, endpoint = fake
    script.replies[("GET", "/bkt/pre/chunks/a%3Ab")] = ok(b"payload")
    with S3Store("bkt", "pre", endpoint=endpoint, region="eu-west-1") as store:
        assert store.get("chunks/a:b") == b"payload"
    method, path, headers = script.seen[0]
    when = datetime.datetime.strptime(headers["x-amz-date"], "%Y%m%dT%H%M%SZ")
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: when)
    request = AWSRequest(method=method, url=f"{endpoint}{path}", headers={})
    botocore.auth.S3SigV4Auth(botocore.credentials.Credentials("AKIDTEST", "test/secret", "tok"),
                              "s3", "eu-west-1").add_auth(request)
    assert headers["authorization"] == request.headers["Authorization"]
    assert headers["x-amz-security-token"] == "tok"


def test_connections_are_kept_alive(fake: tuple[Script, str]) -> None:
    script, endpoint = fake
    script.replies[("GET", "/bkt/k")] = ok(b"x" * 100_000)
    with S3Store("bkt", endpoint=endpoint) as store:
        for _ in range(5):
            assert len(store.get("k")) == 100_000
    assert len(script.seen) == 5 and len(script.connections) == 1


def test_a_stale_keep_alive_connection_is_replaced(fake: tuple[Script, str]) -> None:
    script, endpoint = fake
    script.replies[("GET", "/bkt/k")] = ok(b"v")
    script.close_after_reply = True
    with S3Store("bkt", endpoint=endpoint) as store:
        assert [store.get("k") for _ in range(3)] == [b"v"] * 3
    assert len(script.connections) == 3


def test_range_requests_and_servers_that_ignore_range(fake: tuple[Script, str]) -> None:
    script, endpoint = fake
    script.replies[("GET", "/bkt/ranged")] = lambda h: (206, {"Content-Range": "bytes 2-4/10"}, b"234")
    script.replies[("GET", "/bkt/whole")] = ok(b"0123456789")
    script.replies[("GET", "/bkt/past")] = error(416, "InvalidRange", "past the end")
    with S3Store("bkt", endpoint=endpoint) as store:
        assert store.get_range("ranged", 2, 3) == b"234"
        assert script.seen[-1][2]["range"] == "bytes=2-4"
        assert store.get_range("whole", 2, 3) == b"234"
        assert store.get_range("past", 50, 3) == b""


@pytest.mark.parametrize(("reply", "kind", "text", "head_kind"), [
    (error(503, "SlowDown", "Please reduce your request rate."), TemporaryStoreError, "SlowDown (HTTP 503)",
     TemporaryStoreError),
    (error(500, "InternalError", "We encountered\n an internal error."), TemporaryStoreError,
     "InternalError (HTTP 500): We encountered an internal error.", TemporaryStoreError),
    # A HEAD answer has no body, so only its status tells: a 400 is permanent there.
    (error(400, "RequestTimeout", "idle"), TemporaryStoreError, "RequestTimeout (HTTP 400)", StoreError),
    (error(403, "AccessDenied", "Access Denied"), StoreError, "s3 get k: AccessDenied (HTTP 403): Access Denied",
     StoreError),
    (error(429), TemporaryStoreError, "(HTTP 429)", TemporaryStoreError),
])
def test_error_answers_are_mapped(fake: tuple[Script, str], reply: Callable[[dict[str, str]], Reply],
                                  kind: type[StoreError], text: str, head_kind: type[StoreError]) -> None:
    script, endpoint = fake
    script.replies[("GET", "/bkt/k")] = reply
    script.replies[("HEAD", "/bkt/k")] = reply
    with S3Store("bkt", endpoint=endpoint) as store:
        with pytest.raises(kind) as info:
            store.get("k")
        assert text in str(info.value) and "\n" not in str(info.value)
        assert isinstance(info.value, TemporaryStoreError) == (kind is TemporaryStoreError)
        with pytest.raises(head_kind) as head:
            store.exists("k")
        assert isinstance(head.value, TemporaryStoreError) == (head_kind is TemporaryStoreError)


def test_not_found(fake: tuple[Script, str]) -> None:
    script, endpoint = fake
    script.replies[("GET", "/bkt/gone")] = error(404, "NoSuchKey", "The specified key does not exist.")
    with S3Store("bkt", endpoint=endpoint) as store:
        with pytest.raises(BlobNotFound):
            store.get("gone")
        with pytest.raises(BlobNotFound):
            store.get_range("gone", 0, 5)
        assert not store.exists("gone")
        with pytest.raises(BlobNotFound):
            store.get_range("gone", 0, 0)


def test_a_silent_server_times_out_as_temporary() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with S3Store("bkt", endpoint=endpoint, read_timeout=0.3) as store:
            start = time.monotonic()
            with pytest.raises(TemporaryStoreError, match="127.0.0.1"):
                store.get("k")
            assert time.monotonic() - start < 3
    finally:
        listener.close()


def test_a_body_sent_slowly_ends_at_the_request_timeout(fake: tuple[Script, str]) -> None:
    """Each byte comes well within the read timeout, so only the request's own deadline ends it
    (whole, the body would take 100 s)."""
    script, endpoint = fake
    script.replies[("GET", "/bkt/k")] = ok(b"x" * 500)
    script.trickle = 0.2
    with S3Store("bkt", endpoint=endpoint, read_timeout=5, request_timeout=1.0) as store:
        start = time.monotonic()
        with pytest.raises(TemporaryStoreError, match="127.0.0.1"):
            store.get("k")
        assert 1.0 <= time.monotonic() - start < 1.8
        script.trickle = 0
        assert store.get("k") == b"x" * 500  # the cut connection was not kept


def test_a_slow_answer_ends_by_the_retry_deadline(fake: tuple[Script, str]) -> None:
    """Under RetryingStore the attempt in progress ends by the call's deadline (longer than the
    request timeout here), and no attempt starts after it."""
    script, endpoint = fake
    script.replies[("GET", "/bkt/k")] = ok(b"x" * 500)
    script.trickle = 0.2
    store = RetryingStore(S3Store("bkt", endpoint=endpoint, read_timeout=5, request_timeout=60), deadline=1.5)
    with store:
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match="get k") as info:
            store.get("k")
        assert 1.5 <= time.monotonic() - start < 2.3
    assert isinstance(info.value.__cause__, TemporaryStoreError)
    assert len(script.seen) == 1


def test_headers_sent_slowly_end_at_the_request_timeout(aws_keys: None) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            while not stop.is_set():
                try:
                    conn.sendall(b"X")  # one long header line that never ends
                except OSError:
                    return
                time.sleep(0.1)

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with S3Store("bkt", endpoint=endpoint, read_timeout=5, request_timeout=1.0) as store:
            start = time.monotonic()
            with pytest.raises(TemporaryStoreError, match="127.0.0.1"):
                store.get("k")
            assert time.monotonic() - start < 1.8
    finally:
        stop.set()
        listener.close()
        thread.join(5)


def test_a_kept_connection_gets_its_read_timeout_back(fake: tuple[Script, str]) -> None:
    """A request that ran into the last read timeout before its deadline cut the socket's timeout;
    the connection goes back to the pool with the read timeout again."""
    script, endpoint = fake
    script.replies[("GET", "/bkt/k")] = ok(b"v")
    with S3Store("bkt", endpoint=endpoint, read_timeout=5, request_timeout=2) as store:
        assert store.get("k") == b"v"
        (conn,) = store._http.pool._idle
        assert conn.sock is not None and conn.sock.gettimeout() == 5
        assert store.get("k") == b"v" and len(script.connections) == 1


def test_a_closed_port_is_temporary() -> None:
    (port,) = free_ports(1)
    with S3Store("bkt", endpoint=f"http://127.0.0.1:{port}") as store:
        with pytest.raises(TemporaryStoreError, match=f"127.0.0.1:{port}"):
            store.exists("k")


def test_idle_connections_are_bounded(fake: tuple[Script, str]) -> None:
    script, endpoint = fake
    pool = ConnectionPool(endpoint, max_idle=2, connect_timeout=1, read_timeout=1)
    taken = [pool.take() for _ in range(5)]
    assert [reused for _, reused in taken] == [False] * 5  # nothing idle yet: five new connections
    for c, _ in taken:
        pool.give(c)
    assert len(pool._idle) == 2
    assert pool.take()[1] is True
    pool.close()
    assert pool._idle == []


def test_host_header_and_default_ports() -> None:
    assert ConnectionPool("https://s3.eu-west-1.amazonaws.com", max_idle=1, connect_timeout=1,
                          read_timeout=1).host_header == "s3.eu-west-1.amazonaws.com"
    assert ConnectionPool("http://[::1]:9000/base/", max_idle=1, connect_timeout=1,
                          read_timeout=1).host_header == "[::1]:9000"


READER = """
import json, sys
from imagefs.store.factory import open_store
from imagefs.store.s3 import LEAN_PUT_MAX
store = open_store(sys.argv[1])
if sys.argv[2] == "big":
    store.put("big", bytes(LEAN_PUT_MAX + 1))
if sys.argv[2] == "small":
    store.put("probe", b"written")
    store.delete("gone")  # not there: no error
out = [store.get("probe").decode(), store.exists("probe"), store.get_range("probe", 1, 3).decode()]
print(json.dumps([out, sorted(m for m in ("boto3", "botocore") if m in sys.modules)]))
"""


def test_readers_and_small_writes_never_import_boto3(s3_server: SeaweedServer) -> None:
    """Reads, small documents (a mount's lease) and deletes go over the lean client; a big body
    (a chunk, an index) over boto3."""
    url = s3_server.url_for(s3_server.new_bucket_name(), "lean")
    runs = [subprocess.run([sys.executable, "-c", READER, url, mode], capture_output=True, text=True,
                           timeout=60) for mode in ("small", "read", "big")]
    for res in runs:
        assert res.returncode == 0, res.stderr
    assert json.loads(runs[0].stdout) == [["written", True, "rit"], []]
    assert json.loads(runs[1].stdout) == [["written", True, "rit"], []]
    assert json.loads(runs[2].stdout) == [["written", True, "rit"], ["boto3", "botocore"]]

"""The control socket of a mount daemon: one JSON request line in, one JSON reply line out.

Requests: {"op": "ping"}, {"op": "stats"}, {"op": "trace"},
{"op": "prefetch", "chunks": [[digest, size], ...]}. Replies carry "ok" and either the answer
or "error".
"""
from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any, Awaitable, Callable

import trio

from imagefs.fs.errors import MountError

log = logging.getLogger(__name__)

MAX_REQUEST = 64 << 20
Handler = Callable[[dict[str, Any]], Awaitable[Any]]


async def serve(path: str, handler: Handler, *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on a unix socket at path until cancelled; the socket file is removed at the end."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    try:
        task_status.started()
        await trio.serve_listeners(lambda s: _answer(s, handler), [trio.SocketListener(sock)])
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


async def _answer(stream: trio.abc.Stream, handler: Handler) -> None:
    async with stream:
        try:
            request = json.loads(await _read_line(stream))
            reply = {"ok": True, "result": await handler(request)}
        except Exception as e:  # a bad request must not take the daemon down
            log.warning("control request failed: %s", e)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        try:
            await stream.send_all(json.dumps(reply, default=str).encode() + b"\n")
        except trio.BrokenResourceError:
            pass


async def _read_line(stream: trio.abc.Stream) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        data = await stream.receive_some(65536)
        if not data:
            break
        buf += data
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too large")
    return bytes(buf)


def request(path: str, op: str, timeout: float = 10.0, **args: Any) -> Any:
    """Send one request to the daemon listening at path and return its result."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            data = _recv_all(sock)
        except OSError as e:
            raise MountError(f"cannot reach the mount daemon at {path}: {e.strerror or e}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise MountError(f"the mount daemon at {path} sent a malformed reply") from None
    if not reply.get("ok"):
        raise MountError(f"the mount daemon refused {op}: {reply.get('error')}")
    return reply.get("result")


def _recv_all(sock: socket.socket) -> bytes:
    parts = []
    while True:
        data = sock.recv(1 << 20)
        if not data:
            return b"".join(parts)
        parts.append(data)

"""Live relay of the container's stdout/stderr, watching for the first byte and the ready line."""
from __future__ import annotations

import errno
import os
import re
import selectors
import time
from collections.abc import Callable

from runner.timings import Timings

Sink = Callable[[bytes], None]
_MAX_LINE = 64 * 1024
_DRAIN_AFTER_EXIT_S = 2.0


def fd_sink(fd: int) -> Sink:
    """Write everything to fd; once the reader is gone (EPIPE), keep draining but drop the bytes."""
    broken = False

    def write(data: bytes) -> None:
        nonlocal broken
        view = memoryview(data)
        while view and not broken:
            try:
                view = view[os.write(fd, view):]
            except BrokenPipeError:
                broken = True
    return write


class ReadyWatcher:
    """Finds the first complete output line (on either stream) that matches a pattern."""

    def __init__(self, pattern: str | None) -> None:
        self._regex = re.compile(pattern) if pattern is not None else None
        self._partial: dict[int, bytes] = {}
        self.matched = self._regex is None

    def feed(self, stream: int, data: bytes) -> bool:
        """True when this chunk completed the first matching line."""
        if self.matched or self._regex is None:
            return False
        buf = self._partial.get(stream, b"") + data
        *lines, rest = buf.split(b"\n")
        self._partial[stream] = rest[-_MAX_LINE:]
        return self._scan(lines)

    def finish(self, stream: int) -> bool:
        """The stream ended: its last, unterminated line counts too."""
        rest = self._partial.pop(stream, b"")
        return bool(rest) and not self.matched and self._scan([rest])

    def _scan(self, lines: list[bytes]) -> bool:
        assert self._regex is not None
        for line in lines:
            if self._regex.search(line.decode("utf-8", "replace")):
                self.matched = True
                return True
        return False


def relay(streams: dict[int, Sink], pidfd: int, on_exit: Callable[[], None], timings: Timings,
          watcher: ReadyWatcher) -> None:
    """Copy each fd in streams to its sink until the process behind pidfd exits and the fds reach EOF.

    on_exit() runs once when pidfd becomes readable (the process ended; it should reap it).
    """
    sel = selectors.DefaultSelector()
    for fd in streams:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    sel.register(pidfd, selectors.EVENT_READ)
    open_fds, deadline = set(streams), None
    try:
        while open_fds and (deadline is None or time.monotonic() < deadline):
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            for key, _ in sel.select(timeout):
                if key.fd == pidfd:
                    sel.unregister(pidfd)
                    on_exit()
                    deadline = time.monotonic() + _DRAIN_AFTER_EXIT_S
                elif not _pump(key.fd, streams[key.fd], timings, watcher):
                    sel.unregister(key.fd)
                    open_fds.discard(key.fd)
        if deadline is None:
            _wait_readable(pidfd)
            on_exit()
    finally:
        sel.close()


def _pump(fd: int, sink: Sink, timings: Timings, watcher: ReadyWatcher) -> bool:
    """Move what is available; False at EOF."""
    try:
        data = os.read(fd, 65536)
    except OSError as exc:
        if exc.errno == errno.EAGAIN:
            return True
        raise
    if not data:
        if watcher.finish(fd):
            timings.mark("ready")
        return False
    timings.mark("first_output")
    if watcher.feed(fd, data):
        timings.mark("ready")
    sink(data)
    return True


def _wait_readable(fd: int) -> None:
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        sel.select()

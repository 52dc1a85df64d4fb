"""Live relay of the container's stdout/stderr, watching for the first byte and the ready line."""
from __future__ import annotations

import errno
import os
import re
import selectors
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

from runner.timings import Timings

Sink = Callable[[bytes], None]
# --ready-regex sees the first _MAX_LINE bytes of each line: a long line cannot make a search slow.
_MAX_LINE = 4 * 1024
# The most CPU time one search (over the lines of one read) may take; past it the watcher gives up.
MATCH_BUDGET_S = 1.0
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


class _MatchTimeout(Exception):
    """A regex search ran past its budget (SIGVTALRM interrupted it)."""


class ReadyWatcher:
    """Finds the first output line (on either stream) that matches a pattern.

    The pattern is tried on each line without its newline, cut to its first 4 KiB (_MAX_LINE),
    decoded as UTF-8. Each search is bounded in time: a pattern that backtracks catastrophically is
    interrupted after MATCH_BUDGET_S of CPU time by SIGVTALRM (re checks for signals while it
    matches; signals that arrive meanwhile are handled too); the watcher then gives up, says so
    through warn, and the run goes on without a ready mark. The bound needs the main thread and a
    free ITIMER_VIRTUAL (SIGALRM is left to others); elsewhere only the line cut applies.
    """

    def __init__(self, pattern: str | None, warn: Callable[[str], None] | None = None) -> None:
        self._regex = re.compile(pattern) if pattern is not None else None
        self._warn = warn
        self._partial: dict[int, bytes] = {}
        self.matched = self._regex is None
        self.gave_up = False

    def feed(self, stream: int, data: bytes) -> bool:
        """True when this chunk completed the first matching line."""
        if self.matched or self.gave_up:
            return False
        pieces = data.split(b"\n")
        pieces[0] = self._partial.get(stream, b"") + pieces[0][:_MAX_LINE]
        self._partial[stream] = pieces.pop()[:_MAX_LINE]
        return self._scan([piece[:_MAX_LINE] for piece in pieces])

    def finish(self, stream: int) -> bool:
        """The stream ended: its last, unterminated line counts too."""
        rest = self._partial.pop(stream, b"")
        return bool(rest) and not self.matched and not self.gave_up and self._scan([rest])

    def _scan(self, lines: list[bytes]) -> bool:
        assert self._regex is not None
        if not lines:
            return False
        texts = [line.decode("utf-8", "replace") for line in lines]
        try:
            self.matched = _search_any(self._regex, texts, MATCH_BUDGET_S)
        except _MatchTimeout:
            self.gave_up = True
            if self._warn is not None:
                self._warn(f"--ready-regex took over {MATCH_BUDGET_S:g} s to match the output: "
                           "no longer watching for ready (the run goes on)")
        return self.matched


def _search_any(regex: re.Pattern[str], texts: list[str], budget_s: float) -> bool:
    """Whether regex matches in any of texts; _MatchTimeout if that takes over budget_s of CPU."""
    if threading.current_thread() is not threading.main_thread() or signal.getitimer(signal.ITIMER_VIRTUAL)[0]:
        return any(regex.search(text) for text in texts)
    old = signal.signal(signal.SIGVTALRM, _raise_timeout)
    try:
        signal.setitimer(signal.ITIMER_VIRTUAL, budget_s)
        return any(regex.search(text) for text in texts)
    finally:
        try:
            signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        finally:
            signal.signal(signal.SIGVTALRM, old)


def _raise_timeout(signum: int, frame: FrameType | None) -> None:
    raise _MatchTimeout()


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

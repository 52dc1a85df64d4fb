"""SIGINT/SIGTERM/SIGHUP handling during a run: abort setup, forward to the container, defer in cleanup."""
from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType

_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(Exception):
    """A signal arrived before the container was running."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum}")
        self.signum = signum


class SignalRouter:
    """While setting up: raise Interrupted. While the container runs: forward the signal to its init
    (a second signal sends SIGKILL: an init without handlers ignores SIGTERM). Afterwards: remember only.

    Handlers are installed only in the main thread; elsewhere the router does nothing.
    """

    def __init__(self) -> None:
        self._target: int | None = None
        self._deferred = False
        self._forwarded = 0
        self.received: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> SignalRouter:
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def forward_to(self, pid: int) -> None:
        self._target = pid

    def defer(self) -> None:
        """Stop raising or forwarding (the container is gone, or cleanup has begun)."""
        self._target = None
        self._deferred = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum
        if self._target is not None:
            self._forwarded += 1
            os.kill(self._target, signum if self._forwarded == 1 else signal.SIGKILL)
        elif not self._deferred:
            self._deferred = True
            raise Interrupted(signum)

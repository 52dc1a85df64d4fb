"""A forked guard process that tears a container down if the runner dies before doing it itself.

The runner forks the guard before it creates anything and keeps the write end of a pipe to it. It
writes `pid N` for each runtime process it starts and `done` once it has cleaned up. If the pipe closes
without `done` (the runner exited or was killed, even with SIGKILL), the guard waits for the noted
runtime processes to finish and runs the teardown itself. The guard lives in its own session, so a
terminal's ^C reaches only the runner, which forwards it to the container.
"""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from runner.procs import ProcessRef

_WAIT_FOR_RUNTIME_S = 30.0


class Guard:
    def __init__(self, pid: int, write_fd: int) -> None:
        self.pid = pid
        self._fd: int | None = write_fd

    @classmethod
    def start(cls, teardown: Callable[[], None]) -> Guard:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                _guard_main(read_fd, teardown)
            finally:
                os._exit(0)
        os.close(read_fd)
        os.set_inheritable(write_fd, False)
        return cls(pid, write_fd)

    def note_process(self, ref: ProcessRef) -> None:
        """Tell the guard about a runtime process to wait for before tearing down."""
        self._send(f"pid {ref.pid} {ref.start_time}\n".encode())

    def disarm(self) -> None:
        """The runner cleaned up: let the guard exit without doing anything, and reap it."""
        if self._fd is None:
            return
        self._send(b"done\n")
        os.close(self._fd)
        self._fd = None
        os.waitpid(self.pid, 0)

    def _send(self, data: bytes) -> None:
        if self._fd is not None:
            os.write(self._fd, data)


def _guard_main(read_fd: int, teardown: Callable[[], None]) -> None:
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _isolate_fds(read_fd)
    message = b""
    while chunk := os.read(read_fd, 4096):
        message += chunk
    if b"done\n" in message:
        return
    refs = []
    for line in message.decode().splitlines():
        words = line.split()
        if len(words) == 3 and words[0] == "pid":
            refs.append(ProcessRef(int(words[1]), int(words[2])))
    _wait_gone(refs)
    teardown()


def _isolate_fds(keep: int) -> None:
    """Drop every inherited descriptor but `keep` and stderr; stdin and stdout become /dev/null."""
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.closerange(3, keep)
    os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))


def _wait_gone(refs: list[ProcessRef]) -> None:
    deadline = time.monotonic() + _WAIT_FOR_RUNTIME_S
    while any(r.alive() for r in refs) and time.monotonic() < deadline:
        time.sleep(0.01)

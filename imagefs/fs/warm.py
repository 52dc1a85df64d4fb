"""Warming the kernel's name caches from a start-up profile.

A start-up waits for each name it looks up and each directory it lists for the first time: the
kernel asks the daemon, which answers in tens of microseconds, but the round trip (two context
switches, a wake-up on a busy host) costs the container a hundred or more. `import torch` makes
about 1,900 lookups (a third of them for names that do not exist) and lists about 140 directories.
The answers never change (the image is immutable) and the kernel keeps them (long entry timeouts,
negative entries too, cached listings), so the daemon has them asked, in profile order, as soon as
the mount is up, by a worker process (a thread of the daemon would wait for the GIL between its
system calls): the container, which starts a few hundred milliseconds later and runs its own code
between lookups, then finds them in the kernel's caches.

plan() is pure: it keeps the entries whose directory part the image resolves through directories
alone (ImageIndex.resolve), so that the kernel's walk of the path never follows a symlink (which could lead out of the
mount), and drops the rest (a profile recorded on another image, or a hostile one). replay() has
warm_worker.py make the system calls.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

import trio

from imagefs.index import ImageIndex
from imagefs.profile import NAME_LIST, NAME_LOOKUP

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "warm_worker.py")
STREAMS = 4  # lookups the worker keeps in flight (threads taking every fourth entry)
PATH_MAX = 4096  # longer paths are not replayed (the kernel would refuse them anyway)


@dataclass
class WarmStats:
    total: int = 0  # entries of the profile
    planned: int = 0  # of those, the ones this image resolves safely
    done: int = 0  # asked of the kernel (found or not)
    seconds: float = 0.0
    running: bool = False

    def as_dict(self) -> dict[str, object]:
        return {"total": self.total, "planned": self.planned, "done": self.done,
                "seconds": round(self.seconds, 3), "running": self.running}


def plan(index: ImageIndex, names: list[tuple[str, str]]) -> list[tuple[str, bytes]]:
    """(kind, path relative to the image root) of each entry safe to replay, in order.
    ImageIndex.resolve never follows a symlink (a name under anything but a directory is not
    found), so a directory it finds is reached through directories alone."""
    out: list[tuple[str, bytes]] = []

    def is_dir(rel: bytes) -> bool:
        ino = index.resolve(rel)
        return ino is not None and index.inode(ino).is_dir

    for kind, path in names:
        rel = path.encode("utf-8", "surrogateescape").strip(b"/")
        if len(rel) > PATH_MAX or (rel and not all(map(_plain_name, rel.split(b"/")))):
            continue
        if kind == NAME_LIST:
            if is_dir(rel):
                out.append((kind, rel or b"."))
        elif kind == NAME_LOOKUP and rel and is_dir(rel.rpartition(b"/")[0]):
            out.append((kind, rel))
    return out


def _plain_name(name: bytes) -> bool:
    return name not in (b"", b".", b"..")


async def replay(mountpoint: str, entries: list[tuple[str, bytes]], stats: WarmStats) -> None:
    """Look up and list the entries through the mount, in order, in a process of its own (a
    thread of the daemon would wait for the GIL between its system calls, which the event loop
    holds while it serves them); stopped when the caller is cancelled (unmount)."""
    start = time.monotonic()
    stats.running = True
    try:
        done = await trio.run_process(
            [sys.executable, "-I", "-S", WORKER, mountpoint, str(STREAMS)], stdin=encode(entries),
            capture_stdout=True, stderr=subprocess.DEVNULL, check=False, deliver_cancel=_kill)
        if done.returncode != 0:
            raise ValueError(f"the name worker exited with status {done.returncode}")
        stats.done = int(done.stdout)
    finally:
        stats.seconds = time.monotonic() - start
        stats.running = False


async def _kill(process: trio.Process) -> None:
    """On cancel (unmount) kill the worker at once: it keeps no state, and a TERM may wait on
    a lookup the daemon, now stopping, no longer answers (trio's default waits 5 s for that)."""
    process.kill()


def encode(entries: list[tuple[str, bytes]]) -> bytes:
    """The worker's input: each entry as its kind (one byte), its path, a NUL."""
    return b"".join(kind.encode() + rel + b"\0" for kind, rel in entries)

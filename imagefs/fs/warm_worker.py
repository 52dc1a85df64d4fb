"""Looks up and lists names through a mount for imagefs.fs.warm.

Run by path, as ``python -I -S warm_worker.py MOUNTPOINT [STREAMS]``, so that it starts in
milliseconds (it needs only the standard library). It reads NUL-terminated entries from stdin,
each a kind byte (l: look the path up, d: list the directory) and a path relative to the mount's
root, and does them in order, as STREAMS threads taking every STREAMS-th entry (the daemon then
finds the next request waiting when it has answered one), and prints how many it did. It stops early if the mount goes
away; a name that does not exist is the expected answer to many lookups, not an error.
"""
import errno
import os
import sys
import threading

GONE = {errno.ENOTCONN, errno.ENODEV, errno.ESTALE, errno.EIO}


def main() -> int:
    root = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    streams = max(1, int(sys.argv[2])) if len(sys.argv) > 2 else 1
    entries = [e for e in sys.stdin.buffer.read().split(b"\0") if e]
    done = [0] * streams
    gone = threading.Event()

    def work(k: int) -> None:
        for entry in entries[k::streams]:
            if gone.is_set():
                return
            kind, rel = entry[:1], entry[1:]
            try:
                if kind == b"l":
                    os.stat(rel, dir_fd=root, follow_symlinks=False)
                elif kind == b"d":
                    fd = os.open(rel, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=root)
                    try:
                        os.listdir(fd)
                    finally:
                        os.close(fd)
                else:
                    continue
            except OSError as e:
                if e.errno in GONE:
                    gone.set()
                    return
            done[k] += 1

    threads = [threading.Thread(target=work, args=(k,)) for k in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(sum(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())

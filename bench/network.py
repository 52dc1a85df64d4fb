"""Emulated networks: a network namespace joined to the host by a veth pair whose two ends are
rate-limited with tc (tbf), plus a delay proxy (bench.delayproxy) that holds every byte for the
profile's one-way delay in each direction. This machine's kernel has no netem qdisc
("Specified qdisc kind is unknown"), hence the proxy for delay; tbf is built in.
The store server runs inside the namespace; everything is torn down on exit, Ctrl-C included (the
context manager's finally), and a namespace left by a killed run is removed by the next one
(names carry the creating PID)."""
from __future__ import annotations

import os
import re
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Profile:
    name: str
    rate: str | None  # tc rate, e.g. "10gbit"
    delay_ms: float  # one way, applied on each side (round trip = 2 x delay)


PROFILES = {
    "loopback": Profile("loopback", None, 0.0),
    "zonal": Profile("zonal", "10gbit", 0.25),
    "regional": Profile("regional", "1gbit", 5.0),
}
PREFIX = "csbench"


@dataclass(frozen=True)
class Netns:
    name: str
    host_if: str
    ns_if: str
    host_addr: str
    ns_addr: str

    def exec_prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = (["ip", "netns", "exec", ns] if ns else []) + list(args)
    subprocess.run(cmd, check=True, capture_output=True)


def _shape(dev: str, p: Profile, ns: str | None = None) -> None:
    if p.rate:
        burst = "10mb" if p.rate.startswith("10g") else "1mb"
        _ip("tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", p.rate, "burst", burst,
            "latency", "50ms", ns=ns)


def remove_stale() -> None:
    """Namespaces (and their veths) left by benchmark runs whose process is gone."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for name in re.findall(rf"^({PREFIX}-(\d+))", out, re.M):
        if not os.path.exists(f"/proc/{name[1]}"):
            subprocess.run(["ip", "netns", "del", name[0]], capture_output=True)
            subprocess.run(["ip", "link", "del", f"csh{name[1]}"], capture_output=True)


@contextmanager
def namespace(profile: Profile) -> Iterator[Netns]:
    """A namespace reachable at ns_addr from the host through an emulated link."""
    remove_stale()
    pid = os.getpid()
    n = Netns(f"{PREFIX}-{pid}", f"csh{pid}", f"csn{pid}", "10.213.0.1", "10.213.0.2")
    try:
        _ip("ip", "netns", "add", n.name)
        _ip("ip", "link", "add", n.host_if, "type", "veth", "peer", "name", n.ns_if)
        _ip("ip", "link", "set", n.ns_if, "netns", n.name)
        _ip("ip", "addr", "add", f"{n.host_addr}/30", "dev", n.host_if)
        _ip("ip", "link", "set", n.host_if, "up")
        _ip("ip", "addr", "add", f"{n.ns_addr}/30", "dev", n.ns_if, ns=n.name)
        _ip("ip", "link", "set", n.ns_if, "up", ns=n.name)
        _ip("ip", "link", "set", "lo", "up", ns=n.name)
        _shape(n.host_if, profile)
        _shape(n.ns_if, profile, ns=n.name)
        yield n
    finally:
        subprocess.run(["ip", "link", "del", n.host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", n.name], capture_output=True)

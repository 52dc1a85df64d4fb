"""A real Debian bootstrap from the host's configured apt mirror."""
from __future__ import annotations

import glob
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable

from imagefs.builder.spec import SpecError


def apt_mirror(suite: str = "bookworm") -> str:
    """The Debian mirror the host's apt sources use for suite (deb822 or one-line format)."""
    files = sorted(glob.glob("/etc/apt/sources.list.d/*.sources")) + ["/etc/apt/sources.list"]
    for path in files:
        try:
            text = Path(path).read_text()
        except OSError:
            continue
        for block in text.split("\n\n"):
            if re.search(rf"^Suites:.*\b{suite}\b", block, re.M):
                m = re.search(r"^URIs:\s*(\S+)", block, re.M)
                if m and "security" not in m.group(1):
                    return m.group(1)
        m = re.search(rf"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+{suite}\s", text, re.M)
        if m:
            return m.group(1)
    return "http://deb.debian.org/debian"


def debootstrap(suite: str, variant: str, packages: list[str], target: Path,
                log: Callable[[bytes], None] = lambda b: None) -> None:
    """Bootstrap suite into target (which must not exist); SpecError with the log tail on failure."""
    if shutil.which("debootstrap") is None:
        raise SpecError("debootstrap is not installed (apt-get install debootstrap)")
    cmd = ["debootstrap", f"--variant={variant}"]
    if packages:
        cmd.append("--include=" + ",".join(packages))
    cmd += [suite, str(target), apt_mirror(suite)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        log(line)
        tail = (tail + [line.decode(errors="replace").rstrip()])[-20:]
    if proc.wait() != 0:
        raise SpecError(f"debootstrap {suite} failed:\n" + "\n".join("    " + t for t in tail))
    for deb in (target / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()

"""Build the realistic test root filesystems the benchmarks and slow tests use, once, cached.

debootstrap minbase bookworm with python3 and pip from the host's apt mirror ("base"), then the
same plus the torch 2.13 CPU wheel from the host's local wheel directory ("torch"), and that plus
one extra small pip package ("torch-plus"). Builds go to a temp dir and are renamed into place,
so an interrupted build never leaves a half rootfs that looks finished.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

from imagefs.builder.debian import apt_mirror

CACHE = Path(os.environ.get("COLDSTART_BENCH_CACHE", "/var/cache/coldstart-bench"))
# Wheels pip in the chroot may take (the torch CPU wheel on this project's machines); where the
# directory is missing, pip takes everything from PyPI.
WHEELS = os.environ.get("COLDSTART_WHEELS", "/opt/wheels")
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
TORCH_SPEC = "torch==2.13.0"
EXTRA_PACKAGE = "six==1.16.0"


def _run(cmd: list[str], **kw: object) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload]


def _chroot_pip(root: Path, *args: str) -> None:
    shutil.copyfile(CA_BUNDLE, root / "etc/ssl/certs/ca-certificates.crt")
    wheels = root / "tmp/wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    for whl in glob.glob(os.path.join(WHEELS, "*.whl")):
        shutil.copy(whl, wheels)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/root", "PIP_ROOT_USER_ACTION": "ignore",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_CACHE_DIR": "1"}
    _run([shutil.which("chroot") or "/usr/sbin/chroot", str(root), "python3", "-m", "pip", "install", "--break-system-packages",
          "--find-links", "/tmp/wheels", *args], env=env)
    shutil.rmtree(wheels)


def _finish(tmp: Path, dest: Path) -> Path:
    tmp.rename(dest)
    return dest


def build_base() -> Path:
    dest = CACHE / "base"
    if dest.exists():
        return dest
    tmp = CACHE / "base.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _run(["debootstrap", "--variant=minbase", "--include=python3,python3-pip,ca-certificates",
          "bookworm", str(tmp), apt_mirror()], stdout=subprocess.DEVNULL)
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (tmp / junk).glob("*.deb"):
            p.unlink()
    return _finish(tmp, dest)


def _derive(name: str, parent: Path, *pip_args: str) -> Path:
    dest = CACHE / name
    if dest.exists():
        return dest
    tmp = CACHE / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _run(["cp", "-a", str(parent), str(tmp)])
    _chroot_pip(tmp, *pip_args)
    return _finish(tmp, dest)


def build_torch() -> Path:
    return _derive("torch", build_base(), TORCH_SPEC)


def build_torch_plus() -> Path:
    return _derive("torch-plus", build_torch(), EXTRA_PACKAGE)


def build_busybox() -> Path:
    """busybox-static with its applet links and minimal /etc: the smallest useful image."""
    dest = CACHE / "busybox"
    if dest.exists():
        return dest
    tmp = CACHE / "busybox.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for d in ("bin", "etc", "tmp", "root"):
        (tmp / d).mkdir(parents=True)
    os.chmod(tmp / "tmp", 0o1777)
    shutil.copy2("/bin/busybox", tmp / "bin/busybox")
    applets = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True, check=True).stdout.split()
    for applet in applets:
        if applet != "busybox":
            (tmp / "bin" / applet).symlink_to("busybox")
    (tmp / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    (tmp / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
    return _finish(tmp, dest)


BUILDERS = {"busybox": build_busybox, "base": build_base, "torch": build_torch, "torch-plus": build_torch_plus}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("which", choices=sorted(BUILDERS), nargs="+")
    for name in ap.parse_args().which:
        print(BUILDERS[name]())


if __name__ == "__main__":
    main()

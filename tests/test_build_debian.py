"""One real build on a debootstrap base: debian_slim + apt_install + pip_install over the network,
and packages that do not exist. Slow (a real Debian bootstrap), but CI runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.fixtures.runner import needs_runc

pytestmark = [pytest.mark.slow, needs_runc]
CA = "/etc/ssl/certs/ca-certificates.crt"


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("debian-build")
    e = dict(os.environ, COLDSTART_STORE=f"file://{tmp}/store", COLDSTART_RUN_DIR=str(tmp / "run"),
             COLDSTART_CACHE=str(tmp / "cache"), COLDSTART_CA_BUNDLE=CA)
    yield tmp, e
    subprocess.run([sys.executable, "-m", "tools.cli", "umount", "--all"], env=e, capture_output=True)


def cs(env, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    tmp, e = env
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          env=e, cwd=tmp, timeout=timeout)


def spec(env, body: str) -> str:
    tmp, _ = env
    path = tmp / "spec.py"
    path.write_text("from imagefs import Image\n" + body)
    return str(path)


def test_debian_slim_apt_and_pip(env) -> None:
    s = spec(env, "app = (Image.debian_slim(python_version='3.11').apt_install('curl')\n"
                  "       .pip_install('six==1.16.0').cmd(['python3', '-c', 'import six; print(six.__version__)']))\n")
    r = cs(env, "build", s, "--tag", "app:1", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)["app"]
    assert [st["cached"] for st in out["steps"]] == [False] * 4
    run = cs(env, "run", "app:1")
    assert run.stdout.strip() == "1.16.0", run.stderr
    curl = cs(env, "run", "app:1", "--", "curl", "--version")
    assert curl.stdout.startswith("curl "), curl.stderr
    again = cs(env, "build", s, "--tag", "app:1", "--json")
    assert all(st["cached"] for st in json.loads(again.stdout)["app"]["steps"])


@pytest.mark.parametrize("step,needle", [
    ("apt_install('no-such-package-coldstart')", "Unable to locate package"),
    ("pip_install('no-such-package-coldstart==0.0.1')", "No matching distribution"),
])
def test_missing_package_fails_the_step(env, step: str, needle: str) -> None:
    s = spec(env, f"app = Image.debian_slim(python_version='3.11').{step}\n")
    r = cs(env, "build", s, "--tag", "bad:1")
    assert r.returncode == 6 and needle in r.stderr, r.stderr[-3000:]
    assert cs(env, "inspect", "bad:1").returncode == 2

"""Import of docker://REF from a real local registry (Debian's docker-registry), through skopeo."""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagefs.errors import InvalidSource
from imagefs.importers import manifests, open_source
from imagefs.store.local import LocalStore
from imagefs.writer import write_image
from tests.fixtures.cli import coldstart
from tests.fixtures.registry import Registry, dir_, free_port, make_tar, reg, symlink, whiteout, write_oci_layout

CONFIG = {"Env": ["PATH=/bin"], "Cmd": ["/bin/app"], "Labels": {"source": "registry-test"}}
TARS = [make_tar([dir_("etc"), reg("etc/conf", b"v1"), reg("bin/app", b"#!/bin/sh\n", mode=0o755),
                  reg("old", b"old")]),
        make_tar([reg("etc/conf", b"v2"), whiteout("old"), symlink("bin/sh", "app")])]


def image_id(tmp_path: Path, spec: str, **kw: bool) -> tuple[str, list[str] | None]:
    store = LocalStore(tmp_path / "store", fsync=False)
    with open_source(spec, **kw) as imp:
        digest, _ = write_image(store, imp.tree, imp.config)
        return digest, imp.config.cmd


@pytest.fixture
def pushed(registry: Registry, tmp_path: Path) -> tuple[str, Path]:
    layout = tmp_path / "layout"
    write_oci_layout(layout, TARS, CONFIG, ref="v1", compression=["gzip", "zstd"])
    return registry.push(layout, "v1", "coldstart/app:v1"), layout


def test_registry_image_equals_the_layout_it_was_pushed_from(tmp_path, pushed):
    ref, layout = pushed
    from_registry, cmd = image_id(tmp_path / "a", f"docker://{ref}", tls_verify=False)
    from_layout, _ = image_id(tmp_path / "b", f"oci:{layout}:v1")
    assert from_registry == from_layout
    assert cmd == ["/bin/app"]


def test_tls_verification_is_on_by_default(pushed):
    ref, _ = pushed
    with pytest.raises(InvalidSource, match=f"docker://{ref}: .*") as exc:
        with open_source(f"docker://{ref}"):
            pass
    assert "\n" not in str(exc.value)


def test_a_missing_tag_is_one_line(registry):
    with pytest.raises(InvalidSource, match="docker://.*coldstart/nothing:here: ") as exc:
        with open_source(f"docker://{registry.address}/coldstart/nothing:here", tls_verify=False):
            pass
    assert "\n" not in str(exc.value) and "level=fatal" not in str(exc.value)


def test_an_unreachable_registry_is_one_line():
    ref = f"127.0.0.1:{free_port()}/coldstart/app:v1"
    with pytest.raises(InvalidSource, match=f"docker://{ref}: .*(connection refused|connect)") as exc:
        with open_source(f"docker://{ref}", tls_verify=False):
            pass
    assert "\n" not in str(exc.value)


@pytest.fixture
def stalled_registry() -> Iterator[str]:
    """A loopback port that accepts connections and never answers: a registry that hangs."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for conn in held:
        conn.close()


def test_a_registry_that_never_answers_times_out_and_moves_no_tag(tmp_path, monkeypatch,
                                                                   stalled_registry):
    store, cache = f"file://{tmp_path}/store", tmp_path / "cache"
    (tmp_path / "layer.tar").write_bytes(TARS[0])
    assert coldstart("import", str(tmp_path / "layer.tar"), "app:1", store=store, cache=cache).returncode == 0
    before = coldstart("images", "--json", store=store, cache=cache).stdout
    monkeypatch.setenv("COLDSTART_PULL_TIMEOUT", "2")
    started = time.monotonic()
    source = f"docker://{stalled_registry}/coldstart/app:v1"
    done = coldstart("import", source, "app:1", "--tls-verify", "false", store=store, cache=cache, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 2 and elapsed < 2 + 15
    assert done.stderr.strip().splitlines() == [
        f"coldstart: error: {source}: registry {stalled_registry} did not deliver the image within 2 s"]
    assert coldstart("images", "--json", store=store, cache=cache).stdout == before


def test_the_pull_timeout_parameter_bounds_skopeo(tmp_path, stalled_registry):
    started = time.monotonic()
    message = f"registry {stalled_registry} did not deliver the image within 1 s"
    with pytest.raises(InvalidSource, match=message):
        manifests.pull_to_layout(f"{stalled_registry}/x:1", str(tmp_path), tls_verify=False, timeout=1)
    assert time.monotonic() - started < 1 + 10


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "nan"])
def test_a_bad_pull_timeout_setting_is_one_line(monkeypatch, value):
    monkeypatch.setenv("COLDSTART_PULL_TIMEOUT", value)
    message = f"^COLDSTART_PULL_TIMEOUT must be a number of seconds > 0, not '{value}'$"
    with pytest.raises(InvalidSource, match=message):
        with open_source("docker://127.0.0.1:1/coldstart/app:v1", tls_verify=False):
            pass


def test_registry_host_names_the_registry():
    assert manifests.registry_host("127.0.0.1:5000/a/b:1") == "127.0.0.1:5000"
    assert manifests.registry_host("quay.io/a/b@sha256:" + "0" * 64) == "quay.io"
    assert manifests.registry_host("localhost/a") == "localhost"
    assert manifests.registry_host("library/debian:12") == manifests.registry_host("debian") == "docker.io"

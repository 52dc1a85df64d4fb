"""Import of docker://REF from a real local registry (Debian's docker-registry), through skopeo."""
from __future__ import annotations

from pathlib import Path

import pytest

from imagefs.errors import InvalidSource
from imagefs.importers import open_source
from imagefs.store.local import LocalStore
from imagefs.writer import write_image
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

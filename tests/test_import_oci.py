"""Import of OCI image layouts (made by umoci, and written by hand) and docker-save archives: the
files that come out of an export match what the layers say, and broken layouts fail clearly."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from imagefs.errors import InvalidSource
from imagefs.export import export_image
from imagefs.images import load_index
from imagefs.importers import open_source
from imagefs.importers import manifests
from imagefs.importers.spool import Expect, spool
from imagefs.reader import ChunkReader
from imagefs.store.local import LocalStore
from imagefs.writer import write_image
from tests.fixtures.registry import (add_blob, add_image, dir_, make_tar, named, reg, sha256, symlink, whiteout,
                                     write_docker_archive, write_index, write_oci_layout)
from tests.fixtures.rootfs import make_rich_tree
from tests.treecmp import diff, snapshot

CONFIG = {"Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"], "Entrypoint": ["/bin/app"], "Cmd": ["--serve"],
          "WorkingDir": "/srv", "User": "1000:1000", "Labels": {"org.example.team": "runtime"}}
LOWER = make_tar([dir_("srv"), reg("srv/app.conf", b"port=80\n"), reg("bin/app", b"#!/bin/sh\n", mode=0o755),
                  reg("tmp/junk", b"junk"), reg("var/cache/a", b"a")])
MIDDLE = make_tar([reg("srv/app.conf", b"port=8080\n"), whiteout("tmp/junk"), whiteout("var/cache/"),
                   reg("var/cache/b", b"b"), symlink("bin/run", "app")])
UPPER = make_tar([reg("srv/data", os.urandom(200_000))])
REF = manifests.REF_ANNOTATION


def store_image(tmp_path: Path, spec: str, **kw: bool) -> tuple[LocalStore, str]:
    store = LocalStore(tmp_path / "store", fsync=False)
    with open_source(spec, **kw) as imp:
        image_id, _ = write_image(store, imp.tree, imp.config)
    return store, image_id


def export(tmp_path: Path, spec: str, name: str = "out") -> Path:
    store, image_id = store_image(tmp_path, spec)
    out = tmp_path / name
    export_image(load_index(store, image_id), ChunkReader(store), out)
    return out


def fails(spec: str, match: str) -> str:
    with pytest.raises(InvalidSource, match=match) as exc:
        with open_source(spec):
            pass
    text = str(exc.value)
    assert "\n" not in text
    return text


def blob_path(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":")[1]


# -- umoci ------------------------------------------------------------------------------------------

def umoci(*args: str | Path) -> None:
    subprocess.run(["umoci", *map(str, args)], check=True, capture_output=True)


@pytest.fixture
def umoci_layout(tmp_path: Path) -> tuple[Path, Path]:
    """An image made by umoci in two layers (the second removes and changes files), and umoci's own
    unpack of it as the reference tree."""
    if shutil.which("umoci") is None:
        pytest.skip("umoci is not installed")
    layout, bundle = tmp_path / "layout", tmp_path / "bundle"
    umoci("init", "--layout", layout)
    umoci("new", "--image", f"{layout}:t")
    umoci("unpack", "--image", f"{layout}:t", bundle)
    make_rich_tree(bundle / "rootfs")
    umoci("repack", "--image", f"{layout}:t", bundle)
    rootfs = bundle / "rootfs"
    (rootfs / "etc/group").unlink()
    shutil.rmtree(rootfs / "home")
    (rootfs / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (rootfs / "etc/new").write_bytes(os.urandom(100_000))
    umoci("repack", "--image", f"{layout}:t", bundle)
    umoci("config", "--image", f"{layout}:t", "--config.env", "FOO=bar", "--config.cmd", "sh",
          "--config.workingdir", "/etc", "--config.user", "1:2", "--config.label", "a=b")
    reference = tmp_path / "reference"
    umoci("unpack", "--image", f"{layout}:t", reference)
    return layout, reference / "rootfs"


def test_umoci_layout_exports_the_same_tree_umoci_unpacks(tmp_path, umoci_layout):
    layout, reference = umoci_layout
    out = export(tmp_path, f"oci:{layout}:t")
    assert diff(snapshot(reference), snapshot(out)) == []
    assert not (out / "etc/group").exists() and not (out / "home").exists()
    assert (out / "etc/passwd").read_text() == "root:x:0:0::/root:/bin/sh\n"
    assert os.stat(out / "bin/sh").st_ino == os.stat(out / "bin/busybox").st_ino


def test_umoci_config_becomes_the_image_config(umoci_layout):
    layout, _ = umoci_layout
    with open_source(f"oci:{layout}:t") as imp:
        config = imp.config
    assert "FOO=bar" in config.env
    assert (config.cmd, config.working_dir, config.user, config.labels) == (["sh"], "/etc", "1:2", {"a": "b"})


# -- hand-written layouts ---------------------------------------------------------------------------

def test_layers_in_every_compression_apply_in_order(tmp_path):
    layout = tmp_path / "layout"
    write_oci_layout(layout, [LOWER, MIDDLE, UPPER], CONFIG, compression=["zstd", "tar", "gzip"])
    with open_source(f"oci:{layout}") as imp:
        assert imp.config.env == CONFIG["Env"]
        assert (imp.config.entrypoint, imp.config.cmd) == (["/bin/app"], ["--serve"])
        assert (imp.config.working_dir, imp.config.user) == ("/srv", "1000:1000")
        assert imp.config.labels == {"org.example.team": "runtime"}
    out = export(tmp_path, f"oci:{layout}:latest")
    assert (out / "srv/app.conf").read_bytes() == b"port=8080\n"
    assert os.listdir(out / "tmp") == [] and os.listdir(out / "var/cache") == ["b"]
    assert os.readlink(out / "bin/run") == "app" and os.stat(out / "bin/app").st_mode & 0o777 == 0o755
    assert (out / "srv/data").stat().st_size == 200_000


def test_the_image_named_by_ref_is_chosen(tmp_path):
    layout = tmp_path / "layout"
    one = add_image(layout, [make_tar([reg("which", b"one")])])
    two = add_image(layout, [make_tar([reg("which", b"two")])])
    write_index(layout, [named(one, "one"), named(two, "two")])
    assert (export(tmp_path, f"oci:{layout}:two") / "which").read_bytes() == b"two"
    fails(f"oci:{layout}:three", r"no image named 'three' \(names: one, two\)")
    fails(f"oci:{layout}", r"holds 2 images; name one as oci:DIR:REF \(names: one, two\)")


def _multi_platform(layout: Path) -> None:
    def plat(arch: str, os_name: str = "linux") -> dict:
        desc = add_image(layout, [make_tar([reg("arch", arch.encode())])])
        return {**desc, "platform": {"os": os_name, "architecture": arch}}

    nested = write_index(layout, [plat("unknown", "unknown"), plat("arm64"), plat("amd64"), plat("s390x")],
                         name="nested")
    write_index(layout, [named(nested, "multi")])


@pytest.mark.parametrize(("host", "expected"), [("arm64", b"arm64"), ("s390x", b"s390x"), ("riscv64", b"amd64")])
def test_an_image_index_gives_the_host_platform_else_amd64(tmp_path, monkeypatch, host, expected):
    layout = tmp_path / "layout"
    _multi_platform(layout)
    monkeypatch.setattr(manifests, "host_arch", lambda: host)
    with open_source(f"oci:{layout}:multi") as imp:
        node = imp.tree.get((b"arch",))
        assert node is not None and node.source is not None
        with open(node.source.path, "rb") as f:
            f.seek(node.source.offset)
            assert f.read(node.source.size) == expected


def test_an_index_without_a_usable_platform_is_invalid(tmp_path, monkeypatch):
    layout = tmp_path / "layout"
    desc = add_image(layout, [make_tar([reg("x", b"x")])])
    nested = write_index(layout, [{**desc, "platform": {"os": "windows", "architecture": "amd64"}}], name="n")
    write_index(layout, [nested])
    fails(f"oci:{layout}", r"no image for linux/.* \(platforms: windows/amd64")


# -- broken layouts ---------------------------------------------------------------------------------

@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "layout"
    return root, write_oci_layout(root, [LOWER, MIDDLE], CONFIG)


def test_a_missing_layer_blob_names_its_digest(layout):
    root, manifest = layout
    digest = manifest["layers"][1]["digest"]
    blob_path(root, digest).unlink()
    fails(f"oci:{root}", f"layer {digest}: blob missing from the layout")


def test_a_layer_that_does_not_match_its_digest_is_refused(layout):
    root, manifest = layout
    digest = manifest["layers"][0]["digest"]
    data = bytearray(blob_path(root, digest).read_bytes())
    data[-10] ^= 0xFF  # inside the gzip trailer: decompresses, but is not the blob the manifest named
    blob_path(root, digest).write_bytes(bytes(data))
    fails(f"oci:{root}", f"layer {digest}: (digest mismatch|corrupt or truncated gzip)")


def test_a_layer_swapped_for_another_valid_one_is_refused(layout):
    root, manifest = layout
    first, second = (d["digest"] for d in manifest["layers"])
    shutil.copy(blob_path(root, second), blob_path(root, first))
    text = fails(f"oci:{root}", f"layer {first}: digest mismatch")
    assert second in text


def test_a_wrong_size_or_diff_id_is_refused(tmp_path):
    root = tmp_path / "layout"
    layer = add_blob(root, gzip.compress(LOWER), "application/vnd.oci.image.layer.v1.tar+gzip")
    config = add_blob(root, json.dumps({"config": {}, "rootfs": {"type": "layers",
                                                                   "diff_ids": [sha256(MIDDLE)]}}).encode())
    for layer_desc, message in (({**layer, "size": layer["size"] + 1}, "descriptor says"),
                                (layer, "config diff_id is " + sha256(MIDDLE))):
        manifest = add_blob(root, json.dumps({"schemaVersion": 2, "config": config, "layers": [layer_desc]}).encode())
        write_index(root, [manifest])
        fails(f"oci:{root}", message)


def test_a_tampered_manifest_and_a_hostile_digest_are_refused(layout):
    root, _ = layout
    index = json.loads((root / "index.json").read_text())
    manifest = blob_path(root, index["manifests"][0]["digest"])
    manifest.write_bytes(manifest.read_bytes() + b" ")
    fails(f"oci:{root}", "manifest sha256:[0-9a-f]{64}: (digest mismatch|blob is)")
    index["manifests"][0]["digest"] = "sha256:../../../../etc/passwd"
    (root / "index.json").write_text(json.dumps(index))
    fails(f"oci:{root}", "invalid digest")


def test_not_a_layout(tmp_path):
    fails(f"oci:{tmp_path / 'nowhere'}", "is not an OCI image layout")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/index.json").write_text("{not json")
    fails(f"oci:{tmp_path / 'bad'}", "index.json: not valid JSON")


# -- docker save archives ---------------------------------------------------------------------------

def test_docker_archive_gives_the_same_image_as_the_layout(tmp_path):
    tars = [LOWER, MIDDLE, LOWER, UPPER]  # a repeated layer is a symlink in the archive, as docker saves it
    write_oci_layout(tmp_path / "layout", tars, CONFIG, compression="tar")
    write_docker_archive(tmp_path / "saved.tar", tars, CONFIG)
    (tmp_path / "saved.tar.gz").write_bytes(gzip.compress((tmp_path / "saved.tar").read_bytes()))
    _, from_layout = store_image(tmp_path / "a", f"oci:{tmp_path / 'layout'}")
    _, from_archive = store_image(tmp_path / "b", f"docker-archive:{tmp_path / 'saved.tar'}")
    _, from_gzip = store_image(tmp_path / "c", f"docker-archive:{tmp_path / 'saved.tar.gz'}:example/app:1")
    assert from_layout == from_archive == from_gzip
    out = export(tmp_path, f"docker-archive:{tmp_path / 'saved.tar'}")
    assert (out / "tmp/junk").read_bytes() == b"junk"  # the repeated LOWER layer brings it back


def test_docker_archive_errors(tmp_path):
    archive = tmp_path / "saved.tar"
    write_docker_archive(archive, [LOWER], CONFIG, tags=("a:1",))
    fails(f"docker-archive:{archive}:b:2", r"no image tagged 'b:2' \(tags: a:1\)")
    (tmp_path / "plain.tar").write_bytes(LOWER)
    fails(f"docker-archive:{tmp_path / 'plain.tar'}", "manifest.json manifest.json is missing")
    write_docker_archive(archive, [LOWER], {**CONFIG, "Env": "PATH=/bin"})
    fails(f"docker-archive:{archive}", "malformed Env")
    def saved(layer: str) -> bytes:
        config = {"rootfs": {"type": "layers", "diff_ids": [sha256(UPPER)]}}
        return make_tar([reg("c.json", json.dumps(config).encode()), reg("l/layer.tar", LOWER),
                         reg("manifest.json", json.dumps([{"Config": "c.json", "Layers": [layer]}]).encode())])

    archive.write_bytes(saved("l/layer.tar"))
    fails(f"docker-archive:{archive}", "layer l/layer.tar: uncompressed layer hashes to")
    archive.write_bytes(saved("l/missing.tar"))
    fails(f"docker-archive:{archive}", "layer l/missing.tar is missing")


# -- hostile layouts --------------------------------------------------------------------------------

@pytest.mark.timeout(30)  # the bug this guards against is an open() that never returns
@pytest.mark.parametrize(("blob", "what", "swap"), [
    ("config", "config", "fifo"), ("layer", "layer", "fifo"), ("manifest", "manifest", "fifo"),
    ("config", "config", "/dev/zero"), ("layer", "layer", "/dev/null"),
])
def test_a_blob_that_is_a_fifo_or_a_device_is_refused_without_blocking(layout, blob, what, swap):
    root, manifest = layout
    index = json.loads((root / "index.json").read_text())
    digest = {"config": manifest["config"]["digest"], "layer": manifest["layers"][1]["digest"],
              "manifest": index["manifests"][0]["digest"]}[blob]
    path = blob_path(root, digest)
    path.unlink()
    if swap == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to(swap)
    kind = "a FIFO" if swap == "fifo" else "a character device"
    fails(f"oci:{root}", f"{what} {digest}: blob in the layout is {kind}, not a regular file")


def test_a_layer_blob_longer_than_its_descriptor_is_not_read_to_the_end(tmp_path):
    root = tmp_path / "layout"
    manifest = write_oci_layout(root, [LOWER], compression="tar")
    digest, size = manifest["layers"][0]["digest"], manifest["layers"][0]["size"]
    with open(blob_path(root, digest), "r+b") as f:
        f.truncate(1 << 30)  # sparse: costs nothing to write or to skip
    fails(f"oci:{root}", f"layer {digest}: blob is larger than its descriptor's {size} bytes")
    with open(blob_path(root, digest), "rb") as f:
        with pytest.raises(InvalidSource, match=f"larger than its descriptor's {size} bytes"):
            spool(f, str(tmp_path / "spooled.tar"), "layer", Expect(digest, size))
        assert f.tell() == size + 1  # one byte past the descriptor, not the rest of the gigabyte
    assert (tmp_path / "spooled.tar").stat().st_size <= size


def test_a_layer_blob_shorter_than_its_descriptor_is_refused(tmp_path):
    (tmp_path / "short.tar").write_bytes(LOWER)
    with open(tmp_path / "short.tar", "rb") as f, pytest.raises(InvalidSource) as exc:
        spool(f, str(tmp_path / "spooled.tar"), "layer", Expect(size=len(LOWER) + 512))
    assert str(exc.value) == f"layer: blob is {len(LOWER)} bytes, its descriptor says {len(LOWER) + 512}"
    root = tmp_path / "layout"
    manifest = write_oci_layout(root, [LOWER], compression="tar")
    digest = manifest["layers"][0]["digest"]
    blob_path(root, digest).write_bytes(LOWER[:-1024])  # ends on a tar block: still a readable tar
    fails(f"oci:{root}", f"layer {digest}: digest mismatch")


def test_json_nested_too_deeply_is_one_line(tmp_path):
    deep = b"[" * 200_000 + b"]" * 200_000
    (tmp_path / "layout").mkdir()
    (tmp_path / "layout/index.json").write_bytes(deep)
    fails(f"oci:{tmp_path / 'layout'}", "index.json: not valid JSON: nested too deeply")
    archive = tmp_path / "saved.tar"
    archive.write_bytes(make_tar([reg("manifest.json", deep)]))
    fails(f"docker-archive:{archive}", "manifest.json: not valid JSON: nested too deeply")
    manifest = [{"Config": "c.json", "Layers": ["layer.tar"]}]
    archive.write_bytes(make_tar([reg("c.json", b'{"a": ' + deep + b"}"), reg("layer.tar", LOWER),
                                  reg("manifest.json", json.dumps(manifest).encode())]))
    fails(f"docker-archive:{archive}", "config: not valid JSON: nested too deeply")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("platform", "linux/amd64", "'platform' is not an object with string os and architecture"),
    ("platform", {"os": "linux", "architecture": 64}, "'platform' is not an object with string os"),
    ("annotations", ["latest"], "'annotations' is not an object of strings"),
    ("annotations", {REF: 1}, "'annotations' is not an object of strings"),
    ("size", "512", "'size' is not a byte count: '512'"),
    ("size", -1, "'size' is not a byte count: '-1'"),
    ("size", True, "'size' is not a byte count: 'True'"),
])
def test_an_index_descriptor_with_a_mistyped_field_is_one_line(tmp_path, field, value, message):
    root = tmp_path / "layout"
    mips = add_image(root, [make_tar([reg("x", b"x")])])
    write_index(root, [{**mips, "platform": {"os": "linux", "architecture": "mips"}}, {**mips, field: value}])
    fails(f"oci:{root}", re.escape(f"{root}/index.json: manifests[1]: {message}"))


@pytest.mark.parametrize(("where", "what"), [("config", "config descriptor"), ("layers", "layer descriptor")])
def test_a_manifest_descriptor_with_a_mistyped_field_is_one_line(tmp_path, where, what):
    root = tmp_path / "layout"
    manifest = write_oci_layout(root, [LOWER])
    bad = {**(manifest["config"] if where == "config" else manifest["layers"][0]), "size": "big"}
    manifest = {**manifest, where: bad if where == "config" else [bad]}
    write_index(root, [add_blob(root, json.dumps(manifest).encode())])
    fails(f"oci:{root}", f"{what}: 'size' is not a byte count: 'big'")

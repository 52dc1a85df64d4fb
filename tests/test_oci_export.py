"""Export of a stored image as an OCI image layout: our importer reads it back to the same tree and
config, umoci unpacks it to the same files, skopeo accepts it, and the output is deterministic."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from imagefs.export import export_image
from imagefs.images import load_index
from imagefs.importers import open_source
from imagefs.importers.rootfs import import_rootfs
from imagefs.index import ImageConfig
from imagefs.oci_export import OCI_LAYER_GZIP, REF_ANNOTATION, config_doc, write_oci_layout
from imagefs.reader import ChunkReader
from imagefs.store.local import LocalStore
from imagefs.writer import write_image
from tests.treecmp import diff, snapshot

CONFIG = ImageConfig(env=["PATH=/usr/bin:/bin", "LANG=C.UTF-8"], entrypoint=["/bin/sh"], cmd=["-c", "echo hi"],
                     working_dir="/home", user="1000:1000", labels={"org.example.team": "runtime"})


@pytest.fixture
def stored(rich_tree: Path, tmp_path: Path) -> tuple[LocalStore, str]:
    store = LocalStore(tmp_path / "store", fsync=False)
    image_id, _ = write_image(store, import_rootfs(str(rich_tree)), CONFIG)
    return store, image_id


def _layout(store: LocalStore, image_id: str, where: Path, ref: str = "v1") -> Path:
    write_oci_layout(load_index(store, image_id), ChunkReader(store), where, ref)
    return where


def _blob(layout: Path, digest: str) -> bytes:
    return (layout / "blobs" / "sha256" / digest.split(":")[1]).read_bytes()


def test_round_trip_through_our_importer(stored: tuple[LocalStore, str], rich_tree: Path, tmp_path: Path) -> None:
    store, image_id = stored
    layout = _layout(store, image_id, tmp_path / "layout")
    with open_source(f"oci:{layout}:v1") as imp:  # checks every digest and the diff_id
        again, _ = write_image(store, imp.tree, imp.config)
    export_image(load_index(store, image_id), ChunkReader(store), tmp_path / "a")
    export_image(load_index(store, again), ChunkReader(store), tmp_path / "b")
    assert diff(snapshot(tmp_path / "a"), snapshot(tmp_path / "b")) == []
    assert diff(snapshot(rich_tree), snapshot(tmp_path / "b")) == []
    assert load_index(store, again).config == CONFIG
    assert again == image_id  # same tree and config: the same image ID


def test_layer_and_manifest_shape(stored: tuple[LocalStore, str], tmp_path: Path) -> None:
    store, image_id = stored
    layout = _layout(store, image_id, tmp_path / "layout")
    index = json.loads((layout / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["annotations"] == {REF_ANNOTATION: "v1"}
    manifest = json.loads(_blob(layout, entry["digest"]))
    assert [layer["mediaType"] for layer in manifest["layers"]] == [OCI_LAYER_GZIP]
    config = json.loads(_blob(layout, manifest["config"]["digest"]))
    assert config["config"]["Entrypoint"] == ["/bin/sh"] and config["config"]["User"] == "1000:1000"
    assert len(config["rootfs"]["diff_ids"]) == 1
    listing = subprocess.run(["tar", "tvzf", "-"], input=_blob(layout, manifest["layers"][0]["digest"]),
                             capture_output=True, check=True).stdout.decode(errors="replace")
    assert " ./\n" in listing and "bin/sh link to bin/busybox" in listing


def test_deterministic_and_refs_kept(stored: tuple[LocalStore, str], tmp_path: Path) -> None:
    store, image_id = stored
    index, reader = load_index(store, image_id), ChunkReader(store)
    first = write_oci_layout(index, reader, tmp_path / "layout", "v1")
    second = write_oci_layout(index, reader, tmp_path / "layout", "v2")
    third = write_oci_layout(index, reader, tmp_path / "layout", "v1")
    assert first.manifest_digest == second.manifest_digest == third.manifest_digest
    refs = [m["annotations"][REF_ANNOTATION] for m in json.loads((tmp_path / "layout/index.json").read_text())["manifests"]]
    assert sorted(refs) == ["v1", "v2"]
    assert first.total_bytes > first.layer_bytes > 0 and first.tar_bytes > first.layer_bytes


def test_config_keeps_empty_entrypoint_but_not_missing_one() -> None:
    assert "Entrypoint" not in config_doc(ImageConfig(), [])["config"]
    assert config_doc(ImageConfig(entrypoint=[]), [])["config"]["Entrypoint"] == []
    assert config_doc(ImageConfig(), ["sha256:x"])["rootfs"] == {"type": "layers", "diff_ids": ["sha256:x"]}


@pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is not installed")
def test_umoci_unpacks_the_same_tree(stored: tuple[LocalStore, str], rich_tree: Path, tmp_path: Path) -> None:
    store, image_id = stored
    layout = _layout(store, image_id, tmp_path / "layout")
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:v1", str(tmp_path / "bundle")],
                   check=True, capture_output=True)
    assert diff(snapshot(rich_tree), snapshot(tmp_path / "bundle" / "rootfs")) == []


@pytest.mark.skipif(shutil.which("skopeo") is None, reason="skopeo is not installed")
def test_skopeo_accepts_the_layout(stored: tuple[LocalStore, str], tmp_path: Path) -> None:
    store, image_id = stored
    layout = _layout(store, image_id, tmp_path / "layout")
    out = subprocess.run(["skopeo", "inspect", f"oci:{layout}:v1"], check=True, capture_output=True, text=True)
    doc = json.loads(out.stdout)
    assert doc["Labels"] == CONFIG.labels and doc["Env"] == CONFIG.env and len(doc["Layers"]) == 1

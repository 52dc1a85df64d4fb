"""Import a rootfs, export it again, and compare every entry with the original."""
import os
import subprocess

import pytest

from imagefs.export import export_image
from imagefs.images import load_index
from imagefs.importers.rootfs import import_rootfs
from imagefs.reader import ChunkReader
from imagefs.store.local import LocalStore
from imagefs.writer import write_image
from tests.treecmp import diff, snapshot


def _round_trip(src, tmp_path):
    store = LocalStore(tmp_path / "store", fsync=False)
    image_id, stats = write_image(store, import_rootfs(src))
    out = tmp_path / "out"
    export_image(load_index(store, image_id), ChunkReader(store), out)
    return store, image_id, stats, out


def test_rich_tree_round_trip(rich_tree, tmp_path):
    _, _, stats, out = _round_trip(rich_tree, tmp_path)
    assert diff(snapshot(rich_tree), snapshot(out)) == []
    assert os.getxattr(out / "bin/ping", "security.capability").hex().startswith("01000002")
    assert os.stat(out / "bin/sh").st_ino == os.stat(out / "bin/busybox").st_ino


def test_export_refuses_a_non_empty_target(rich_tree, tmp_path):
    store = LocalStore(tmp_path / "store", fsync=False)
    image_id, _ = write_image(store, import_rootfs(rich_tree))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/x").write_text("keep me")
    with pytest.raises(Exception, match="not empty"):
        export_image(load_index(store, image_id), ChunkReader(store), tmp_path / "busy")
    assert (tmp_path / "busy/x").read_text() == "keep me"


def test_symlink_out_of_root_is_not_followed_on_export(rich_tree, tmp_path):
    _, _, _, out = _round_trip(rich_tree, tmp_path)
    assert os.readlink(out / "escape") == "/etc/../../outside"
    assert not (tmp_path / "outside").exists()


@pytest.mark.slow
def test_debian_rootfs_round_trip(debian_rootfs, tmp_path):
    store, image_id, stats, out = _round_trip(debian_rootfs, tmp_path)
    assert stats.files > 3000
    assert diff(snapshot(debian_rootfs), snapshot(out)) == []
    # The exported tree is a working system.
    r = subprocess.run(["chroot", str(out), "python3", "-c", "import json, ssl; print('ok')"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "ok", r.stderr

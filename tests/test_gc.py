"""gc, leases and fsck: orphans are reclaimed, tagged data never is, imports and gc keep apart."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from imagefs import chunks as blobs
from imagefs import gc as gcmod
from imagefs.gc import GcDeferred, fsck, gc, import_lease, lease
from imagefs.images import parse_ref, set_tag
from imagefs.importers.rootfs import import_rootfs
from imagefs.store.local import LocalStore
from imagefs.writer import write_image


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store", fsync=False)


def _image(store, tree_dir, tag=None):
    image_id, _ = write_image(store, import_rootfs(tree_dir))
    if tag:
        set_tag(store, parse_ref(tag), image_id)
    return image_id


def test_gc_keeps_tagged_and_young_deletes_orphans(store, rich_tree, tmp_path):
    kept = _image(store, rich_tree, "keep:1")
    (rich_tree / "home/extra.bin").write_bytes(os.urandom(2_000_000))
    orphan = _image(store, rich_tree)
    assert gc(store, grace=3600).deleted_indexes == []  # young orphans survive the grace period
    rep = gc(store, grace=0)
    assert rep.deleted_indexes == [orphan] and rep.deleted_chunks >= 1
    assert store.exists(blobs.index_key(kept))
    assert fsck(store, verify_chunks=True).errors == []


def test_gc_removes_torn_temp_files_of_killed_writers(store, rich_tree):
    _image(store, rich_tree, "keep:1")
    torn = store.root / "chunks" / "ab" / ".tmp.abcdef.1234"
    torn.parent.mkdir(parents=True, exist_ok=True)
    torn.write_bytes(b"half a chunk")
    assert gc(store, grace=3600).deleted_temp_files == 0 and torn.exists()  # could be a live write
    assert gc(store, grace=0).deleted_temp_files == 1 and not torn.exists()
    assert fsck(store).errors == []


def test_gc_dry_run_deletes_nothing(store, rich_tree):
    orphan = _image(store, rich_tree)
    rep = gc(store, grace=0, dry_run=True)
    assert rep.deleted_indexes == [orphan]
    assert store.exists(blobs.index_key(orphan))


def test_gc_defers_while_an_import_runs(store, rich_tree):
    _image(store, rich_tree)
    with import_lease(store):
        with pytest.raises(GcDeferred):
            gc(store, grace=0)
    assert gc(store, grace=0).deleted_chunks > 0


def test_import_waits_for_a_running_gc(store, monkeypatch):
    with lease(store, "gc"):
        with pytest.raises(GcDeferred):
            with import_lease(store, wait=0):
                pass


def test_stale_lease_of_dead_process_is_ignored(store):
    doc = gcmod._lease_doc("import")
    doc["pid"] = 2 ** 22 + 12345  # no such process
    store.put("leases/import-dead", json.dumps(doc).encode())
    assert gcmod.live_leases(store, "import") == []
    doc = gcmod._lease_doc("import")
    doc["host"], doc["heartbeat"] = "elsewhere", time.time() - 10 * gcmod.LEASE_TIMEOUT
    store.put("leases/import-old", json.dumps(doc).encode())
    assert gcmod.live_leases(store, "import") == []


def test_fsck_reports_missing_and_corrupt_chunks(store, rich_tree):
    _image(store, rich_tree, "x:1")
    chunk_keys = sorted(i.key for i in store.list("chunks/"))
    store.delete(chunk_keys[0])
    blob = bytearray(store.get(chunk_keys[-1]))
    blob[-1] ^= 0x55
    store.put(chunk_keys[-1], bytes(blob))
    rep = fsck(store, verify_chunks=True)
    assert any("needs missing chunk" in e for e in rep.errors)
    assert any("corrupt blob" in e for e in rep.errors)


def test_import_killed_mid_way_leaves_store_consistent(tmp_path):
    """kill -9 of an import: no tag, fsck clean, gc reclaims the orphan chunks."""
    src = tmp_path / "big"
    src.mkdir()
    for i in range(40):
        (src / f"f{i:02d}").write_bytes(os.urandom(3_000_000))
    url = f"file://{tmp_path}/store"
    env = dict(os.environ, COLDSTART_STORE=url)
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "import", str(src), "big:1", "--workers", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    store = LocalStore(tmp_path / "store", fsync=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum(1 for _ in store.list("chunks/")) < 5:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not store.exists("tags/big/1")
    assert list(store.list("index/")) == []
    rep = fsck(store)
    assert rep.errors == [] and rep.orphan_chunks >= 5
    assert gc(store, grace=0).deleted_chunks == rep.orphan_chunks
    assert list(store.list("chunks/")) == []

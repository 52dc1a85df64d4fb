"""gc, leases and fsck: orphans are reclaimed, tagged data never is, imports and gc keep apart."""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from imagefs import chunks as blobs
from imagefs import leases
from imagefs.errors import StoreError
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


def _age(store, key, seconds):
    """Make the store's time stamp of key that much older (a lease nobody refreshed)."""
    path = store.root / key
    t = path.stat().st_mtime - seconds
    os.utime(path, (t, t))


def test_stale_lease_of_dead_process_is_ignored(store):
    doc = leases._lease_doc("import")
    doc["pid"] = 2 ** 22 + 12345  # no such process
    store.put("leases/import-dead", json.dumps(doc).encode())
    assert leases.live_leases(store, "import") == []
    doc = leases._lease_doc("import")
    doc["pid_start"] = "1"  # this pid, but a process started at another time: the pid was reused
    store.put("leases/import-reused", json.dumps(doc).encode())
    assert leases.live_leases(store, "import") == []
    doc = leases._lease_doc("import")
    doc["host"] = "elsewhere"
    store.put("leases/import-old", json.dumps(doc).encode())
    _age(store, "leases/import-old", 10 * leases.LEASE_TIMEOUT)
    assert leases.live_leases(store, "import") == []
    gc(store, grace=0)
    assert [i.key for i in store.list("leases/")] == []  # gc removed the stale ones


def test_liveness_never_compares_the_hosts_clocks(store):
    """Another host whose clock is far behind: its fresh lease is live (the store's stamp is what
    counts, against the stamp of the reader's own lease). This host's stopped or slow process:
    live as long as it exists, however old its lease."""
    doc = leases._lease_doc("import")
    doc["host"], doc["heartbeat"], doc["started"] = "elsewhere", 1.0, 1.0
    store.put("leases/import-skewed", json.dumps(doc).encode())
    with lease(store, "gc") as key:
        assert [d["host"] for d in leases.live_leases(store, "import", key)] == ["elsewhere"]
    store.delete("leases/import-skewed")
    store.put("leases/import-stopped", json.dumps(leases._lease_doc("import")).encode())
    _age(store, "leases/import-stopped", 10 * leases.LEASE_TIMEOUT)
    with pytest.raises(GcDeferred):
        gc(store, grace=0)


def test_gc_keeps_the_image_of_a_mount_after_its_tag_moved(store, rich_tree):
    old = _image(store, rich_tree, "app:1")
    (rich_tree / "home/new.bin").write_bytes(os.urandom(100_000))
    new = _image(store, rich_tree, "app:1")  # a re-import: app:1 moved on, a container runs the old
    held = leases.MountLease(store, old)
    assert held.take() and len(list(store.list("leases/mount-"))) == 1
    held.refresh()
    rep = gc(store, grace=0)
    assert rep.deleted_indexes == [] and store.exists(blobs.index_key(old))
    held.release()
    assert list(store.list("leases/")) == []
    assert gc(store, grace=0).deleted_indexes == [old] and store.exists(blobs.index_key(new))
    assert fsck(store, verify_chunks=True).errors == []


def test_a_mount_lease_released_while_it_is_written_is_removed(store):
    held = leases.MountLease(store, "a" * 64)
    put = store.put

    def slow_put(key, data):  # the daemon stops while the lease is on its way to the store
        held.release()
        put(key, data)
    store.put = slow_put
    assert not held.take()
    assert list(store.list("leases/")) == []


def test_a_corrupt_tag_stops_gc_and_fsck_reports_it(store, rich_tree):
    image_id = _image(store, rich_tree, "app:1")
    store.put("tags/app/1", b'{"image": "' + image_id[:20].encode())  # cut in half
    with pytest.raises(StoreError, match="gc stopped: tag app:1 in the store is corrupt"):
        gc(store, grace=0)
    assert store.exists(blobs.index_key(image_id)) and len(list(store.list("chunks/"))) > 0
    assert any("tag app:1 in the store is corrupt" in e for e in fsck(store).errors)


def test_fsck_reports_a_tag_whose_profile_is_missing(store, rich_tree):
    image_id = _image(store, rich_tree)
    store.put("tags/app/1", json.dumps({"image": image_id, "profile": "f" * 64}).encode())
    assert fsck(store).errors == [f"tag app:1 names missing profile {'f' * 64}"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to read as another user")
def test_a_folder_the_listing_cannot_read_stops_gc(rich_tree):
    """gc as a user who cannot read one index folder: the listing fails, nothing is deleted
    (a listing that left the folder out would have swept the tagged image's chunks)."""
    top = Path(tempfile.mkdtemp(prefix="gc-eacces-", dir="/tmp"))  # not below pytest's 0700 folders
    try:
        top.chmod(0o755)
        store = LocalStore(top / "store", fsync=False)
        image_id = _image(store, rich_tree, "app:1")
        for path in [store.root, *store.root.rglob("*")]:
            os.chmod(path, 0o777 if path.is_dir() else 0o644)
        os.chmod(store.root / "index" / image_id[:2], 0o700)
        before = sorted(i.key for i in store.list("chunks/"))
        script = ("import sys\nfrom imagefs.gc import gc\nfrom imagefs.store.local import LocalStore\n"
                  "try:\n    gc(LocalStore(sys.argv[1], fsync=False), grace=0)\n"
                  "except Exception as e:\n    print(type(e).__name__, e)\n    sys.exit(3)\n")
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable,
                            "-c", script, str(store.root)], capture_output=True, text=True)
        assert r.returncode == 3 and "StoreError listing" in r.stdout, (r.stdout, r.stderr)
        assert sorted(i.key for i in store.list("chunks/")) == before
    finally:
        shutil.rmtree(top)


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

"""The coldstart command line, run as a user would: a subprocess, exit codes, one-line errors."""
import json
import os
import subprocess
import sys

import pytest


def cs(*args, store=None, check=True, env=None):
    e = dict(os.environ, **(env or {}))
    if store:
        e["COLDSTART_STORE"] = store
    r = subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True, env=e,
                       timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"coldstart {' '.join(args)} exited {r.returncode}: {r.stderr}")
    return r


@pytest.fixture
def store(tmp_path):
    return f"file://{tmp_path}/store"


def test_import_inspect_images_export_rm(rich_tree, tmp_path, store):
    out = json.loads(cs("import", str(rich_tree), "rich:v1", "--json", store=store).stdout)
    assert out["ref"] == "rich:v1" and len(out["image"]) == 64 and out["new_chunks"] >= 1
    again = json.loads(cs("import", str(rich_tree), "rich:v2", "--json", store=store).stdout)
    assert again["image"] == out["image"] and again["new_chunks"] == 0
    rows = json.loads(cs("images", "--json", store=store).stdout)
    assert [r["ref"] for r in rows] == ["rich:v1", "rich:v2"]
    rep = json.loads(cs("inspect", "rich:v1", "--json", store=store).stdout)
    assert rep["entries"]["file"] >= 6 and rep["chunks"] >= 1 and rep["shared_chunks"] == 0  # both tags name one image
    human = cs("inspect", out["image"][:12], store=store).stdout
    assert "rich:v1" in human and "chunks" in human
    cs("export", "rich:v1", str(tmp_path / "out"), "--json", store=store)
    assert (tmp_path / "out/bin/busybox").read_bytes() == (rich_tree / "bin/busybox").read_bytes()
    cs("rm", "rich:v1", "rich:v2", "--json", store=store)
    assert json.loads(cs("images", "--json", store=store).stdout) == []
    gc_rep = json.loads(cs("gc", "--grace", "0", "--json", store=store).stdout)
    assert gc_rep["deleted_indexes"] == [out["image"]]
    assert json.loads(cs("fsck", "--json", store=store).stdout)["errors"] == []


def test_inspect_of_one_image_is_not_stopped_by_another_images_trouble(rich_tree, tmp_path, store):
    good = json.loads(cs("import", str(rich_tree), "good:1", "--json", store=store).stdout)["image"]
    (rich_tree / "home/other.bin").write_bytes(os.urandom(50_000))
    bad = json.loads(cs("import", str(rich_tree), "bad:1", "--json", store=store).stdout)["image"]
    (tmp_path / "store" / "index" / bad[:2] / bad).unlink()
    rep = json.loads(cs("inspect", "good:1", "--json", store=store).stdout)
    assert rep["image"] == good and rep["tags"] == ["good:1"]
    bad_gc = cs("gc", "--grace", "nan", store=store, check=False)
    assert bad_gc.returncode != 0 and "grace must be a number of seconds >= 0" in bad_gc.stderr


def test_store_flag_beats_environment(rich_tree, tmp_path):
    cs("import", str(rich_tree), "a:1", "--store", f"file://{tmp_path}/s1", store=f"file://{tmp_path}/s2")
    assert (tmp_path / "s1/tags/a/1").exists() and not (tmp_path / "s2/tags").exists()


@pytest.mark.parametrize("args,code,msg", [
    (["import", "/nonexistent/dir", "x:1"], 2, "not a directory, a file"),
    (["import", "/tmp", "Bad Name:1"], 2, "invalid image name"),
    (["inspect", "nothere:1"], 2, "no image tagged nothere:1"),
    (["export", "nothere:1", "/tmp/x-never"], 2, "no image tagged"),
    (["rm", "nothere:1"], 2, "no image tagged"),
])
def test_errors_are_one_line(args, code, msg, store):
    r = cs(*args, store=store, check=False)
    assert r.returncode == code, r.stderr
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_unknown_store_scheme(store):
    r = cs("images", store="ftp://x/y", check=False)
    assert r.returncode == 1 and "unknown store URL scheme" in r.stderr


def test_unwritable_store_is_a_clear_error(rich_tree):
    r = cs("import", str(rich_tree), "x:1", store="file:///proc/nope/store", check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stderr.startswith("coldstart: error:")


@pytest.mark.parametrize("blob,why", [
    (b"\0garbage", "not valid JSON"),
    (b"\xff\xfe\xfa", "not valid JSON"),
    (b"[1]", "no valid image ID"),
    (b'{"image": "nope"}', "no valid image ID"),
])
def test_a_corrupt_tag_is_a_one_line_error(rich_tree, tmp_path, store, blob, why):
    from imagefs.store.local import LocalStore

    cs("import", str(rich_tree), "app:1", store=store)
    LocalStore(tmp_path / "store", fsync=False).put("tags/app/1", blob)
    for args in (["inspect", "app:1"], ["export", "app:1", str(tmp_path / "out")]):
        r = cs(*args, store=store, check=False)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip() == f"coldstart: error: tag app:1 in the store is corrupt ({why})"
    assert json.loads(cs("images", "--json", store=store).stdout) == []
    cs("rm", "app:1", store=store)  # the way out: a corrupt tag can still be removed
    assert cs("inspect", "app:1", store=store, check=False).returncode == 2
    assert not (tmp_path / "store/tags/app/1").exists()

"""The start-up working set guessed for images without a profile (imagefs.guess): pure tests on a
small Python-like image, then a real mount that prefetches the guess."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from imagefs.fs import mounts
from imagefs.guess import find_executable, guess, imported_modules, resolve_path
from imagefs.images import load_index, parse_ref, set_tag
from imagefs.importers.rootfs import import_rootfs
from imagefs.index import ImageIndex
from imagefs.store.local import LocalStore
from imagefs.writer import write_image
from tests.fixtures.cli import coldstart
from tests.fixtures.runner import make_busybox_root, needs_runc

SITE = "usr/local/lib/python3.11/dist-packages"


def make_python_root(root: Path) -> Path:
    files = {
        "usr/bin/python3.11": 3000,
        "etc/ld.so.cache": 100,
        "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2": 200,
        "usr/lib/x86_64-linux-gnu/libc.so.6": 2000,
        "usr/lib/x86_64-linux-gnu/libcurl.so.4": 500,  # not a start-up library
        "usr/lib/python3.11/os.py": 100,
        "usr/lib/python3.11/__pycache__/os.cpython-311.pyc": 100,
        "usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc": 100,
        "usr/lib/python3.11/test/__pycache__/test_os.cpython-311.pyc": 100,
        "usr/lib/python3.11/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so": 100,
        f"{SITE}/distutils-precedence.pth": 10,
        f"{SITE}/mypkg/__init__.py": 10,
        f"{SITE}/mypkg/sub/__pycache__/a.cpython-311.pyc": 100,
        f"{SITE}/mypkg/__pycache__/__init__.cpython-311.pyc": 100,
        f"{SITE}/mypkg/lib/libbig.so": 5000,
        f"{SITE}/mypkg/_C.cpython-311-x86_64-linux-gnu.so": 1000,
        f"{SITE}/mypkg-1.0.dist-info/entry_points.txt": 10,
        f"{SITE}/mypkg.libs/libgfortran.so.5": 700,
        f"{SITE}/otherpkg/__pycache__/__init__.cpython-311.pyc": 100,
        f"{SITE}/single.py": 10,
    }
    for rel, size in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(os.urandom(size))
    (root / "usr/bin/python3").symlink_to("python3.11")
    (root / "bin").symlink_to("usr/bin")
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/py").symlink_to("../../bin/./python3")
    (root / "usr/bin/loop").symlink_to("loop")
    return root


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> ImageIndex:
    base = tmp_path_factory.mktemp("guess")
    store = LocalStore(base / "store", fsync=False)
    image_id, _ = write_image(store, import_rootfs(make_python_root(base / "root")))
    return load_index(store, image_id)


def test_paths_resolve_through_symlinks_like_the_kernel(index: ImageIndex) -> None:
    for path in (b"/bin/python3", b"/usr/local/bin/py", b"/usr/bin/../bin/python3"):
        found = resolve_path(index, path)
        assert found is not None and found[1] == b"/usr/bin/python3.11", path
    assert resolve_path(index, b"/usr/bin/loop") is None  # a symlink loop ends, unresolved
    assert resolve_path(index, b"/nope/python") is None
    assert find_executable(index, b"python3", "/nowhere:/bin") == (index.resolve("/usr/bin/python3.11"),
                                                                    b"/usr/bin/python3.11")
    assert find_executable(index, b"python3", "/usr/local/bin") is None
    assert find_executable(index, b"python3", "/bin", ) is not None


def test_imported_modules_of_a_command_line() -> None:
    assert imported_modules(["python3", "-c", "import torch, numpy.linalg as la\nfrom json import x\nfrom . import y"]) \
        == ["torch", "numpy", "json"]
    assert imported_modules(["python3", "-m", "http.server"]) == ["http"]
    assert imported_modules(["python3", "-u", "-mpip", "list"]) == ["pip"]
    assert imported_modules(["python3", "-c", "import ("]) == []  # not Python: nothing
    assert imported_modules(["python3", "app.py", "-c", "import torch"]) == []  # a script's own imports are unread


def test_python_guess_is_runtime_then_stdlib_then_imported_packages(index: ImageIndex) -> None:
    g = guess(index, ["python3", "-c", "import mypkg.sub; import single"], "/usr/bin")
    files = [f.decode() for f in g.files]
    assert g.executable == b"/usr/bin/python3.11" and files[0] == "/usr/bin/python3.11"
    pos = {f: i for i, f in enumerate(files)}
    site = "/" + SITE
    runtime = ["/etc/ld.so.cache", "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
               "/usr/lib/x86_64-linux-gnu/libc.so.6"]
    stdlib = ["/usr/lib/python3.11/__pycache__/os.cpython-311.pyc",
              "/usr/lib/python3.11/lib-dynload/_json.cpython-311-x86_64-linux-gnu.so",
              "/usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc"]
    package = [f"{site}/mypkg/__pycache__/__init__.cpython-311.pyc", f"{site}/mypkg/sub/__pycache__/a.cpython-311.pyc",
               f"{site}/mypkg.libs/libgfortran.so.5", f"{site}/mypkg/_C.cpython-311-x86_64-linux-gnu.so",
               f"{site}/mypkg/lib/libbig.so"]  # compiled modules, package roots first; then libraries by size
    order = runtime + stdlib + [f"{site}/distutils-precedence.pth", f"{site}/mypkg-1.0.dist-info/entry_points.txt"] + package
    assert [pos[f] for f in order] == sorted(pos[f] for f in order), files
    assert f"{site}/single.py" in pos
    for never in ("/usr/lib/x86_64-linux-gnu/libcurl.so.4", "/usr/lib/python3.11/os.py",
                  "/usr/lib/python3.11/test/__pycache__/test_os.cpython-311.pyc",
                  f"{site}/otherpkg/__pycache__/__init__.cpython-311.pyc"):
        assert never not in pos, never
    digests = [d for d, _ in g.chunks]
    assert len(digests) == len(set(digests)) and set(digests) <= set(index.chunks)


def test_guess_stops_at_the_budget_and_knows_what_it_cannot_guess(index: ImageIndex) -> None:
    whole = guess(index, ["python3", "-c", "import mypkg"])
    small = guess(index, ["python3", "-c", "import mypkg"], budget=sum(n for _, n in whole.chunks[:1]))
    assert small.chunks == whole.chunks[:1]
    assert guess(index, []).chunks == [] and guess(index, ["no-such-program"]).executable is None
    sh = guess(index, ["/usr/lib/x86_64-linux-gnu/libc.so.6"])  # not Python: the binary and the runtime
    assert sh.files[0] == b"/usr/lib/x86_64-linux-gnu/libc.so.6"
    assert not any(b"python3.11/" in f for f in sh.files)


# -- a real mount ------------------------------------------------------------------------------------
def _wait(pred, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.root
def test_mount_prefetches_the_guess_when_there_is_no_profile(tmp_path: Path, mounter) -> None:  # type: ignore[no-untyped-def]
    root = make_python_root(tmp_path / "root")
    store = LocalStore(tmp_path / "store", fsync=False)
    image_id, _ = write_image(store, import_rootfs(root))
    want = guess(load_index(store, image_id), ["python3", "-c", "import mypkg"])
    info = mounter.mount(store.url, image_id, guess_argv=["python3", "-c", "import mypkg"])
    stats = lambda: mounts.read_stats(info.mountpoint)["fetch"]  # noqa: E731
    _wait(lambda: stats()["by_kind"]["prefetch"]["chunks"] == len(want.chunks))
    libbig = Path(info.mountpoint, SITE, "mypkg/lib/libbig.so")
    assert libbig.read_bytes() == (root / SITE / "mypkg/lib/libbig.so").read_bytes()
    assert stats()["by_kind"]["demand"]["chunks"] == 0


@needs_runc
def test_run_of_an_image_without_profile_prefetches_its_guess(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """coldstart run hands the container's command to the mount, which prefetches its guess."""
    root = make_busybox_root(tmp_path / "root")
    (root / "data").write_bytes(os.urandom(300_000))
    store = LocalStore(tmp_path / "store", fsync=False)
    image_id, _ = write_image(store, import_rootfs(root))
    set_tag(store, parse_ref("plain:1"), image_id)
    monkeypatch.setenv("COLDSTART_RUN_DIR", str(tmp_path / "run"))  # here and in the CLI

    def cs(*args: str) -> subprocess.CompletedProcess[str]:
        return coldstart(*args, store=store.url, cache=tmp_path / "cache")

    try:
        r = cs("run", "plain:1", "--", "/bin/sh", "-c", "echo ready")
        assert r.returncode == 0 and "ready" in r.stdout, r.stderr
        mnts = [m for m in mounts.list_mounts() if m.get("image") == image_id]
        assert mnts, "the mount lingers after the run"
        fetched = mounts.read_stats(mnts[0]["mountpoint"])["fetch"]["by_kind"]["prefetch"]["chunks"]
        assert fetched >= 1  # /bin/busybox, the guessed executable
    finally:
        cs("umount", "--all")

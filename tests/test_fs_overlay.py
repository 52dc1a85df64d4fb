"""Writable containers: overlayfs with the image mount as its lower layer."""
from __future__ import annotations

import errno
import os
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imagefs.fs import mounts
from imagefs.store.local import LocalStore
from tests.fixtures.mount import Mounter, store_image
from tests.fixtures.rootfs import CAP_NET_RAW
from tests.test_fs_ops import make_tree
from tests.treecmp import diff, snapshot

pytestmark = pytest.mark.root


@contextmanager
def overlay(lower: str, base: Path) -> Iterator[Path]:
    """An overlayfs over lower with its own upper and work dirs; always unmounted."""
    upper, work, merged = base / "upper", base / "work", base / "merged"
    for d in (upper, work, merged):
        d.mkdir(parents=True)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(merged)], check=True,
                   capture_output=True)
    try:
        yield merged
    finally:
        if subprocess.run(["umount", str(merged)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(merged)], capture_output=True)
        assert not mounts.is_mounted(str(merged))


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, LocalStore, str]:
    src = make_tree(tmp_path / "src")
    store = LocalStore(tmp_path / "store", fsync=False)
    return src, store, store_image(store, src)


def test_overlay_writes_stay_in_their_upper_layer(mounter: Mounter,
                                                  image: tuple[Path, LocalStore, str]) -> None:
    src, store, image_id = image
    lower = mounter.mount(store.url, image_id).mountpoint
    want = snapshot(src)
    with overlay(lower, mounter.base / "ov1") as one, overlay(lower, mounter.base / "ov2") as two:
        (one / "new.txt").write_text("created in a container\n")
        with open(one / "etc/passwd", "a") as f:
            f.write("extra:x:2:2::/:/bin/sh\n")
        (one / "bin/ls").unlink()
        (one / "home/data.txt").unlink()
        (one / "newdir").mkdir()
        os.rename(one / "etc/group", one / "etc/group.old")
        # Directories from the image move by copy (EXDEV without redirect_dir), as mv does.
        subprocess.run(["mv", str(one / "many"), str(one / "renamed")], check=True)
        assert (one / "etc/passwd").read_text().endswith("extra:x:2:2::/:/bin/sh\n")
        assert not (one / "bin/ls").exists() and not (one / "many").exists()
        assert (one / "etc/group.old").read_bytes() == (src / "etc/group").read_bytes()
        assert (one / "renamed/f007").read_text() == "file 7\n"
        assert not diff(want, snapshot(lower))  # the image does not change
        assert not diff(want, snapshot(two))  # nor does another container's view
        assert (Path(one.parent, "upper/etc/passwd")).exists()  # the change went to the upper


def test_overlay_shows_setuid_and_xattrs_of_the_image(mounter: Mounter,
                                                      image: tuple[Path, LocalStore, str]) -> None:
    _src, store, image_id = image
    lower = mounter.mount(store.url, image_id).mountpoint
    with overlay(lower, mounter.base / "ov") as merged:
        assert os.lstat(merged / "bin/suid").st_mode & stat.S_ISUID
        assert os.getxattr(merged / "bin/ping", "security.capability") == CAP_NET_RAW
        assert os.getxattr(merged / "bin/ping", "user.note") == b"has a capability"
        os.chmod(merged / "bin/ping", 0o750)  # metadata copy-up keeps the xattrs
        os.utime(merged / "bin/suid")  # and the setuid bit
        upper = merged.parent / "upper"
        assert os.getxattr(upper / "bin/ping", "security.capability") == CAP_NET_RAW
        assert os.getxattr(upper / "bin/ping", "user.note") == b"has a capability"
        assert stat.S_IMODE(os.lstat(upper / "bin/suid").st_mode) == 0o4755
        assert os.lstat(Path(lower, "bin/ping")).st_mode & 0o777 == 0o644
        res = subprocess.run(["chroot", str(merged), "/bin/sh", "-c", "echo hi > /tmp/x; busybox cat /tmp/x"],
                             capture_output=True, text=True)
        assert res.stdout == "hi\n", res.stderr


def test_image_without_xattrs_answers_them_in_the_kernel(mounter: Mounter, tmp_path: Path) -> None:
    """An image that holds no xattr at all says so once (ENOSYS); after that the kernel answers
    getxattr itself, so overlayfs's trusted.overlay.* questions cost no round trip, and copy-up
    and whiteouts still work."""
    src = tmp_path / "plain"
    for i in range(50):
        (src / "pkg").mkdir(parents=True, exist_ok=True)
        (src / "pkg" / f"m{i}.py").write_text(f"x = {i}\n")
    store = LocalStore(tmp_path / "store", fsync=False)
    info = mounter.mount(store.url, store_image(store, src))
    with overlay(info.mountpoint, mounter.base / "ov") as merged:
        for i in range(50):
            assert (merged / "pkg" / f"m{i}.py").read_text() == f"x = {i}\n"
        with pytest.raises(OSError) as e:
            os.getxattr(merged / "pkg/m1.py", "user.anything")
        assert e.value.errno in (errno.EOPNOTSUPP, errno.ENODATA)
        (merged / "pkg/m2.py").write_text("changed\n")  # copy-up
        (merged / "pkg/m3.py").unlink()  # whiteout
        assert (merged / "pkg/m2.py").read_text() == "changed\n" and not (merged / "pkg/m3.py").exists()
        assert (Path(info.mountpoint) / "pkg/m2.py").read_text() == "x = 2\n"
    with pytest.raises(OSError) as e:
        os.listxattr(Path(info.mountpoint) / "pkg/m4.py")
    assert e.value.errno == errno.EOPNOTSUPP
    ops = mounts.read_stats(info.mountpoint)["fuse"]["ops"]
    assert ops["getxattr"]["count"] <= 1 and ops.get("listxattr", {"count": 0})["count"] <= 1, ops

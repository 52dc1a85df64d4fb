"""What a build step's overlay leaves in its upper directory is what the child image gets: the
runner's overlay pins redirect_dir and metacopy off whatever the host's module defaults are, and
an upper directory that has them anyway is refused, never applied wrong."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from imagefs.builder.diff import apply_upper
from imagefs.errors import InvalidSource, UnsafeInput
from imagefs.importers.rootfs import import_rootfs
from runner.mounts import mount_overlay, unmount

pytestmark = pytest.mark.root


def _content(tree, *parts: bytes) -> bytes:  # type: ignore[no-untyped-def]
    src = tree.get(parts).source
    buf = bytearray(src.size)
    f = src.open()
    try:
        f.readinto(memoryview(buf))
    finally:
        f.close()
    return bytes(buf)


def _dirs(tmp: Path) -> dict[str, Path]:
    d = {name: tmp / name for name in ("lower", "upper", "work", "merged")}
    for path in d.values():
        path.mkdir()
    (d["lower"] / "bin").mkdir()
    (d["lower"] / "bin" / "tool").write_text("#!/bin/sh\necho real\n")
    (d["lower"] / "d").mkdir()
    (d["lower"] / "d" / "x").write_text("data\n")
    return d


def _step(merged: Path) -> None:
    """`chmod +x /bin/tool; mv /d /e` in a step (mv copies where the overlay refuses the rename
    of a lower directory with EXDEV, as it does with redirect_dir off)."""
    os.chmod(merged / "bin" / "tool", 0o755)
    subprocess.run(["mv", str(merged / "d"), str(merged / "e")], check=True)


def test_runner_overlay_upper_applies_in_full(tmp_path: Path) -> None:
    d = _dirs(tmp_path)
    mount_overlay(d["lower"], d["upper"], d["work"], d["merged"], volatile=False)
    try:
        _step(d["merged"])
    finally:
        unmount(d["merged"])
    tree = import_rootfs(str(d["lower"]))
    apply_upper(tree, d["upper"])
    assert _content(tree, b"bin", b"tool") == b"#!/bin/sh\necho real\n"
    assert tree.get((b"bin", b"tool")).mode & 0o777 == 0o755
    assert tree.get((b"d",)) is None and sorted(tree.get((b"e",)).children) == [b"x"]
    assert _content(tree, b"e", b"x") == b"data\n"


@pytest.mark.parametrize("feature", ["metacopy=on", "redirect_dir=on"])
def test_upper_with_metacopy_or_redirect_is_refused(tmp_path: Path, feature: str) -> None:
    d = _dirs(tmp_path)
    opts = f"lowerdir={d['lower']},upperdir={d['upper']},workdir={d['work']},{feature}"
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(d["merged"])], check=True)
    try:
        _step(d["merged"])
    finally:
        unmount(d["merged"])
    tree = import_rootfs(str(d["lower"]))
    with pytest.raises(InvalidSource, match="redirect_dir=off,metacopy=off"):
        apply_upper(tree, d["upper"])


def test_a_too_deep_upper_directory_is_unsafe(tmp_path: Path) -> None:
    """A step that made directories 300 deep (`mkdir -p a/a/...`): a clear error, not a crash."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    (upper / "/".join(["a"] * 300)).mkdir(parents=True)
    with pytest.raises(UnsafeInput, match="deeper than 256 directories"):
        apply_upper(import_rootfs(str(lower)), upper)

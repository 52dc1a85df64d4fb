"""Import of tar files (and two-layer layouts) into a BuildTree: formats, metadata, whiteouts, and
every kind of hostile or broken input, each with a clear one-line error or a documented handling."""
from __future__ import annotations

import base64
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from imagefs.errors import ExportError, ImageFSError, InvalidSource, UnsafeInput
from imagefs.export import export_image
from imagefs.images import load_index, parse_ref, read_tag, set_tag
from imagefs.importers import Imported, open_source
from imagefs.importers.rootfs import import_rootfs
from imagefs.reader import ChunkReader
from imagefs.store.local import LocalStore
from imagefs.tree import Node
from imagefs.writer import write_image
from tests.fixtures.registry import (compress, device, dir_, hardlink, make_tar, reg, symlink, whiteout,
                                     write_oci_layout)

CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")


def write_tar(tmp_path: Path, members: list, kind: str = "tar", name: str = "layer.tar",
              fmt: int = tarfile.PAX_FORMAT) -> Path:
    path = tmp_path / name
    path.write_bytes(compress(make_tar(members, fmt=fmt), kind))
    return path


@contextmanager
def imported(path: Path | str) -> Iterator[Imported]:
    with open_source(str(path)) as imp:
        yield imp


def node_at(imp: Imported, path: str | bytes) -> Node:
    parts = tuple(p for p in os.fsencode(path).split(b"/") if p)
    node = imp.tree.get(parts)
    assert node is not None, f"{path!r} missing from the tree"
    return node


def content(node: Node) -> bytes:
    if node.source is None:
        return b""
    reader = node.source.open()
    try:
        buf = bytearray(node.source.size)
        view, done = memoryview(buf), 0
        while done < len(buf):
            n = reader.readinto(view[done:])
            assert n, "source ended early"
            done += n
        return bytes(buf)
    finally:
        reader.close()


def names(imp: Imported, path: str = "") -> set[bytes]:
    node = node_at(imp, path) if path else imp.tree.root
    assert node.children is not None
    return set(node.children)


def store_and_export(tmp_path: Path, spec: str | Path) -> Path:
    store = LocalStore(tmp_path / "store", fsync=False)
    with open_source(str(spec)) as imp:
        image_id, _ = write_image(store, imp.tree, imp.config)
    out = tmp_path / "out"
    export_image(load_index(store, image_id), ChunkReader(store), out)
    return out


def one_line_error(exc: pytest.ExceptionInfo[ImageFSError]) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


# -- formats and metadata ---------------------------------------------------------------------------

BASIC = [dir_("etc", mode=0o750, uid=1, gid=2), reg("etc/hosts", b"127.0.0.1 localhost\n"),
         reg("bin/tool", b"\x7fELF" + bytes(5000), mode=0o4755, uid=1000, gid=100),
         symlink("bin/sh", "tool"), reg("empty")]


@pytest.mark.parametrize("kind", ["tar", "gzip", "zstd"])
def test_compression_is_told_by_magic_bytes_not_by_name(tmp_path, kind):
    misleading = {"tar": "layer.tar.gz", "gzip": "layer.zst", "zstd": "layer.tar"}[kind]
    with imported(write_tar(tmp_path, BASIC, kind, misleading)) as imp:
        assert names(imp) == {b"etc", b"bin", b"empty"}
        assert content(node_at(imp, "etc/hosts")) == b"127.0.0.1 localhost\n"
        tool = node_at(imp, "bin/tool")
        assert (tool.mode, tool.uid, tool.gid) == (stat.S_IFREG | 0o4755, 1000, 100)
        assert content(tool) == b"\x7fELF" + bytes(5000)
        etc = node_at(imp, "etc")
        assert (etc.mode, etc.uid, etc.gid) == (stat.S_IFDIR | 0o750, 1, 2)
        assert node_at(imp, "bin").mode == stat.S_IFDIR | 0o755  # implied parent
        assert node_at(imp, "bin/sh").target == b"tool"
        assert node_at(imp, "empty").size == 0


def test_pax_mtime_keeps_nanoseconds_and_ustar_whole_seconds(tmp_path):
    exact = reg("exact", b"x")
    exact[0].pax_headers = {"mtime": "1700000000.123456789"}
    with imported(write_tar(tmp_path, [exact, reg("plain", b"y", mtime=1_600_000_000)])) as imp:
        assert node_at(imp, "exact").mtime_ns == 1_700_000_000_123_456_789
        assert node_at(imp, "plain").mtime_ns == 1_600_000_000 * 10**9


def test_devices_and_fifos_are_metadata_only(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("import must never create device nodes or fifos")

    monkeypatch.setattr(os, "mknod", refuse)
    monkeypatch.setattr(os, "mkfifo", refuse)
    members = [device("dev/null", tarfile.CHRTYPE, 1, 3), device("dev/sda", tarfile.BLKTYPE, 8, 0, 0o660),
               device("run/fifo", tarfile.FIFOTYPE, 0, 0, 0o600)]
    with imported(write_tar(tmp_path, members)) as imp:
        null, sda, fifo = (node_at(imp, p) for p in ("dev/null", "dev/sda", "run/fifo"))
        assert (null.mode, null.rdev) == (stat.S_IFCHR | 0o666, os.makedev(1, 3))
        assert (sda.mode, sda.rdev) == (stat.S_IFBLK | 0o660, os.makedev(8, 0))
        assert fifo.mode == stat.S_IFIFO | 0o600
    assert not any(p.is_char_device() or p.is_block_device() or p.is_fifo() for p in tmp_path.rglob("*"))


def test_xattrs_and_capabilities_from_schily_and_libarchive_records(tmp_path):
    ping = reg("bin/ping", b"\x7fELF ping", mode=0o755)
    ping[0].pax_headers = {"SCHILY.xattr.security.capability": CAP_NET_RAW.decode("utf-8", "surrogateescape"),
                           "SCHILY.xattr.user.note": "caf\u00e9"}
    other = reg("bin/other", b"x")
    value = base64.b64encode(b"\x00\xffbinary").decode().rstrip("=")  # libarchive writes no padding
    other[0].pax_headers = {"LIBARCHIVE.xattr.user.with%20space": value}
    path = write_tar(tmp_path, [ping, other])
    with imported(path) as imp:
        assert node_at(imp, "bin/ping").xattrs == {b"security.capability": CAP_NET_RAW,
                                                    b"user.note": "caf\u00e9".encode()}
        assert node_at(imp, "bin/other").xattrs == {b"user.with space": b"\x00\xffbinary"}
    out = store_and_export(tmp_path, path)
    assert os.getxattr(out / "bin/ping", "security.capability") == CAP_NET_RAW


def test_bad_libarchive_base64_is_invalid_source(tmp_path):
    bad = reg("f", b"x")
    bad[0].pax_headers = {"LIBARCHIVE.xattr.user.x": "not base64!"}
    with pytest.raises(InvalidSource, match="f: bad xattr record") as exc:
        with imported(write_tar(tmp_path, [bad])):
            pass
    one_line_error(exc)


def test_hardlinks_are_one_node_and_one_inode_after_export(tmp_path):
    members = [reg("bin/busybox", b"busybox" * 1000, mode=0o755), hardlink("bin/sh", "bin/busybox"),
               hardlink("/usr/bin/env", "/bin/busybox")]
    path = write_tar(tmp_path, members)
    with imported(path) as imp:
        assert node_at(imp, "bin/sh") is node_at(imp, "bin/busybox") is node_at(imp, "usr/bin/env")
    out = store_and_export(tmp_path, path)
    assert os.stat(out / "bin/sh").st_ino == os.stat(out / "bin/busybox").st_ino
    assert os.stat(out / "bin/sh").st_nlink == 3


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_non_utf8_names_round_trip_byte_exact(tmp_path, fmt):
    latin1 = b"caf\xe9"
    members = [reg(b"dir/" + latin1, b"latin-1 name"), symlink(b"link", latin1), hardlink(b"hard\xff", b"dir/" + latin1)]
    path = write_tar(tmp_path, members, fmt=fmt)
    with imported(path) as imp:
        assert names(imp, "dir") == {latin1}
        assert node_at(imp, "link").target == latin1
        assert node_at(imp, b"hard\xff") is node_at(imp, b"dir/" + latin1)
    out = store_and_export(tmp_path, path)
    assert os.listdir(os.fsencode(out / "dir")) == [latin1]
    assert (out / os.fsdecode(b"dir/" + latin1)).read_bytes() == b"latin-1 name"


def test_root_entry_sets_root_metadata(tmp_path):
    with imported(write_tar(tmp_path, [dir_(".", mode=0o700, uid=5), reg("./a", b"1")])) as imp:
        assert (imp.tree.root.mode, imp.tree.root.uid) == (stat.S_IFDIR | 0o700, 5)
        assert names(imp) == {b"a"}


def test_sparse_members_get_a_sparse_spool_of_their_own(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    size, pieces = 3 << 20, {0: b"head" * 1024, 1 << 20: b"middle" * 1000}
    with open(src / "sparse", "wb") as f:
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
        f.truncate(size)
    expected = (src / "sparse").read_bytes()
    for fmt in (["--format=gnu"], ["--format=posix", "--sparse-version=1.0"],
                ["--format=posix", "--sparse-version=0.1"]):
        layer = tmp_path / "sparse.tar"
        subprocess.run(["tar", "--sparse", "--hole-detection=raw", *fmt, "-cf", layer, "-C", src, "sparse"],
                       check=True)
        with imported(layer) as imp:
            node = node_at(imp, "sparse")
            assert node.size == size and content(node) == expected, fmt
            assert not node.source.path.endswith(b".tar")


def _sparse_tar(tmp_path: Path, sparse_map: str, real_size: int) -> Path:
    """A PAX 0.1 sparse member with the given map and size over 512 stored bytes, then a file."""
    ti = tarfile.TarInfo("sparse")
    ti.size = 512
    ti.pax_headers = {"GNU.sparse.map": sparse_map, "GNU.sparse.size": str(real_size), "GNU.sparse.name": "sparse"}
    return write_tar(tmp_path, [(ti, b"A" * 512), reg("after", b"ok")], name="sparse.tar")


@pytest.mark.parametrize("sparse_map, real_size, message", [
    ("0,-100,0,612", 1000, "sparse map outside the file"),
    ("2000,512", 1000, "sparse map outside the file"),
    ("0,512", 1 << 40, "sparse file of 1099511627776 bytes"),  # a header of a few bytes, a TiB of holes
    ("0,512", 1 << 62, "sparse file of"),
])
def test_hostile_sparse_maps_and_sizes_are_invalid(tmp_path, sparse_map, real_size, message):
    with pytest.raises(InvalidSource, match=message):
        with imported(_sparse_tar(tmp_path, sparse_map, real_size)):
            pass


# -- whiteouts and layers ---------------------------------------------------------------------------

def two_layers(tmp_path: Path, lower: list, upper: list) -> str:
    write_oci_layout(tmp_path / "layout", [make_tar(lower), make_tar(upper)])
    return f"oci:{tmp_path / 'layout'}"


def test_whiteouts_hide_lower_entries(tmp_path):
    lower = [reg("a", b"a"), reg("d/x", b"x"), reg("d/y", b"y"), reg("gone/deep/f", b"f")]
    upper = [whiteout("a"), whiteout("d/x"), whiteout("gone"), whiteout("never-was")]
    with imported(two_layers(tmp_path, lower, upper)) as imp:
        assert names(imp) == {b"d"}
        assert names(imp, "d") == {b"y"}


def test_opaque_directory_hides_lower_content_but_keeps_its_own_layer(tmp_path):
    lower = [reg("d/old", b"old"), reg("d/sub/deep", b"deep"), reg("keep/x", b"x")]
    upper = [reg("d/before", b"b"), dir_("d/sub"), whiteout("d/"), reg("d/sub/after", b"a")]
    with imported(two_layers(tmp_path, lower, upper)) as imp:
        assert names(imp, "d") == {b"before", b"sub"}
        assert names(imp, "d/sub") == {b"after"}
        assert names(imp, "keep") == {b"x"}


@pytest.mark.parametrize("order", ["whiteout first", "entry first"])
def test_whiteout_never_hides_an_entry_of_its_own_layer(tmp_path, order):
    upper = [whiteout("f"), reg("f", b"new")]
    if order == "entry first":
        upper.reverse()
    with imported(two_layers(tmp_path, [reg("f", b"old")], upper)) as imp:
        assert names(imp) == {b"f"}
        assert content(node_at(imp, "f")) == b"new"


def test_whiteout_markers_are_never_entries_of_the_image(tmp_path):
    members = [reg("a", b"a"), whiteout("a"), whiteout("d/"), whiteout("e/x"), reg(".wh..wh.aufs", b"aufs")]
    with imported(write_tar(tmp_path, members)) as imp:
        assert names(imp) == {b"a", b"d", b"e"}  # a marker's directory is implied, as containerd does
        assert names(imp, "d") == names(imp, "e") == set()


def test_a_later_layer_replaces_and_merges(tmp_path):
    lower = [dir_("d", mode=0o700), reg("d/keep", b"k"), reg("f", b"old"), reg("x/inside", b"i")]
    upper = [dir_("d", mode=0o755, uid=7), reg("f", b"new"), reg("x", b"now a file")]
    with imported(two_layers(tmp_path, lower, upper)) as imp:
        d = node_at(imp, "d")
        assert (d.mode, d.uid, set(d.children or {})) == (stat.S_IFDIR | 0o755, 7, {b"keep"})
        assert content(node_at(imp, "f")) == b"new"
        assert content(node_at(imp, "x")) == b"now a file"


# -- documented handling of odd entries --------------------------------------------------------------

def test_absolute_names_lose_their_leading_slash(tmp_path):
    with imported(write_tar(tmp_path, [reg("/abs/file", b"a"), symlink("/abs/link", "/etc/passwd")])) as imp:
        assert content(node_at(imp, "abs/file")) == b"a"
        assert node_at(imp, "abs/link").target == b"/etc/passwd"  # a target is data: kept as written


def test_symlinks_pointing_outside_are_kept_as_data(tmp_path):
    members = [symlink("evil", "/etc"), symlink("up", "../../../.."), reg("after", b"ok")]
    with imported(write_tar(tmp_path, members)) as imp:
        assert node_at(imp, "evil").target == b"/etc"
        assert node_at(imp, "up").target == b"../../../.."


def test_duplicate_entries_later_one_wins(tmp_path):
    members = [reg("f", b"first"), reg("f", b"second", mode=0o600), dir_("d"), reg("d/a", b"a"),
               dir_("d", mode=0o711), reg("d/b", b"b"), dir_("gone"), reg("gone/x", b"x"), reg("gone", b"file")]
    with imported(write_tar(tmp_path, members)) as imp:
        assert content(node_at(imp, "f")) == b"second"
        assert node_at(imp, "f").mode == stat.S_IFREG | 0o600
        assert node_at(imp, "d").mode == stat.S_IFDIR | 0o711 and names(imp, "d") == {b"a", b"b"}
        assert content(node_at(imp, "gone")) == b"file"


# -- rejected entries -------------------------------------------------------------------------------

UNSAFE = {
    "dotdot": ([reg("../evil", b"x")], "../evil: path escapes the root"),
    "dotdot inside": ([reg("a/../../evil", b"x")], "path escapes the root"),
    "through symlink": ([symlink("evil", "/etc"), reg("evil/passwd", b"x")],
                        "evil/passwd: path goes through the symlink evil"),
    "through relative symlink": ([dir_("a"), symlink("a/up", "../.."), reg("a/up/x", b"x")],
                                 "path goes through the symlink a/up"),
    "through symlink to dir": ([dir_("real"), symlink("alias", "real"), reg("alias/x", b"x")],
                               "goes through the symlink alias"),
    "under a file": ([reg("f", b"x"), reg("f/x", b"x")], "f/x: path is below the non-directory f"),
    "hardlink missing": ([hardlink("h", "nowhere")], "h: hardlink target nowhere is missing"),
    "hardlink dotdot": ([hardlink("h", "../etc/passwd")], "hardlink target ../etc/passwd escapes the root"),
    "hardlink absolute outside": ([hardlink("h", "/etc/passwd")], "hardlink target /etc/passwd is missing"),
    "hardlink to dir": ([dir_("d"), hardlink("h", "d")], "hardlink target d is a directory"),
    "hardlink to root": ([hardlink("h", "/")], "h: hardlink target / is the root directory"),
    "hardlink through symlink": ([symlink("evil", "/etc"), hardlink("h", "evil/passwd")],
                                 "h: hardlink target evil/passwd goes through the symlink evil"),
    "whiteout through symlink": ([symlink("evil", "/etc"), whiteout("evil/passwd")],
                                 "goes through the symlink evil"),
    "root as file": ([reg(".", b"x")], "the image root must be a directory"),
    "bad whiteout": ([reg(".wh...", b"")], "invalid whiteout name"),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_entries_are_rejected(tmp_path, case):
    members, message = UNSAFE[case]
    with pytest.raises(UnsafeInput) as exc:
        with imported(write_tar(tmp_path, members)):
            pass
    assert message in one_line_error(exc)


def test_an_entry_through_a_symlink_of_a_lower_layer_is_rejected(tmp_path):
    with pytest.raises(UnsafeInput, match="passwd: path goes through the symlink evil"):
        with imported(two_layers(tmp_path, [symlink("evil", "/etc")], [reg("evil/passwd", b"root::0:0")])):
            pass


def _pax_symlink(name: str, target: str):  # type: ignore[no-untyped-def]
    """A symlink whose target is a PAX linkpath record (which may hold a NUL)."""
    ti, data = symlink(name, "x")
    ti.pax_headers = {"linkpath": target}
    return ti, data


def test_unsupported_entry_type_and_empty_symlink_are_invalid(tmp_path):
    odd = reg("volume", b"")
    odd[0].type = b"V"
    for members, message in (([odd], "unsupported tar entry type"), ([symlink("s", "")], "empty target"),
                             ([_pax_symlink("s", "/etc/passwd\0ignored")], "symlink target contains NUL"),
                             ([symlink("s", "t" * 4096)], "symlink target longer than 4095 bytes")):
        with pytest.raises(InvalidSource, match=message):
            with imported(write_tar(tmp_path, members)):
                pass
    with imported(write_tar(tmp_path, [symlink("s", "t" * 4095)])) as imp:  # the longest Linux takes
        assert node_at(imp, "s").target == b"t" * 4095


def test_names_no_filesystem_can_hold_and_too_deep_trees_are_unsafe(tmp_path):
    """A name longer than 255 bytes, a path deeper than 256 directories: refused at import, so
    neither a mount nor an export of the image meets them."""
    for members, message in (([reg("n" * 256, b"x")], "name longer than 255 bytes"),
                             ([reg("/".join(["a"] * 257), b"x")], "deeper than 256 directories")):
        with pytest.raises(UnsafeInput, match=message):
            with imported(write_tar(tmp_path, members)):
                pass
    deepest = "/".join(["a"] * 255 + ["f"])  # 256 components: allowed, and it exports
    out = store_and_export(tmp_path, write_tar(tmp_path, [reg("n" * 255, b"y"), reg(deepest, b"x")]))
    assert (out / ("n" * 255)).read_bytes() == b"y"
    assert (out / deepest).read_bytes() == b"x"


def test_a_too_deep_rootfs_is_unsafe(tmp_path):
    top = tmp_path / "rootfs"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY)
    for _ in range(300):  # made through directory fds: the path outgrows nothing here, but keep it so
        os.mkdir("a", dir_fd=fd)
        sub = os.open("a", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = sub
    os.close(fd)
    with pytest.raises(UnsafeInput, match="deeper than 256 directories"):
        import_rootfs(str(top))


# -- broken streams ---------------------------------------------------------------------------------

def _corrupt(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0x55 for b in data[mid:mid + 64]) + data[mid + 64:]


def _broken(kind: str) -> bytes:
    tar = make_tar([reg(f"f{i}", os.urandom(20_000)) for i in range(10)])
    return {
        "truncated gzip": lambda: compress(tar, "gzip")[:-100],
        "corrupt gzip": lambda: _corrupt(compress(tar, "gzip")),
        "gzip with garbage after": lambda: compress(tar, "gzip") + b"garbage!",
        "truncated zstd": lambda: compress(tar, "zstd")[:-100],
        "corrupt zstd": lambda: compress(tar, "zstd")[:10] + b"\xff" * 50 + compress(tar, "zstd")[60:],
        "truncated tar": lambda: tar[:len(tar) // 2],
        "tar cut at a member boundary": lambda: tar[:_member_offset(tar, 5)],  # f0..f4 whole, no end marker
        "corrupt tar header": lambda: tar[:512 * 41] + b"\x01" * 512 + tar[512 * 42:],
        "not a tar": lambda: b"hello, this is not an archive\n" * 100,
        "empty file": lambda: b"",
        "xz": lambda: b"\xfd7zXZ\x00" + bytes(100),
    }[kind]()


def _member_offset(tar: bytes, n: int) -> int:
    """Where the header of the n-th member of tar starts."""
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        return t.getmembers()[n].offset


BROKEN = ["truncated gzip", "corrupt gzip", "gzip with garbage after", "truncated zstd", "corrupt zstd",
          "truncated tar", "tar cut at a member boundary", "corrupt tar header", "not a tar", "empty file", "xz"]


@pytest.mark.parametrize("kind", BROKEN)
def test_broken_streams_are_invalid_source(tmp_path, kind):
    path = tmp_path / "broken.tar"
    path.write_bytes(_broken(kind))
    with pytest.raises(InvalidSource) as exc:
        with imported(path):
            pass
    assert str(path) in one_line_error(exc)


def test_a_failed_import_moves_no_tag(tmp_path):
    store = LocalStore(tmp_path / "store", fsync=False)
    good, bad = write_tar(tmp_path, BASIC, name="good.tar"), tmp_path / "bad.tar.gz"
    bad.write_bytes(_broken("truncated gzip"))

    def import_and_tag(spec: Path, tag: str) -> None:
        with open_source(str(spec)) as imp:
            image_id, _ = write_image(store, imp.tree, imp.config)
        set_tag(store, parse_ref(tag), image_id)

    import_and_tag(good, "app:1")
    before = read_tag(store, parse_ref("app:1"))["image"]
    with pytest.raises(InvalidSource):
        import_and_tag(bad, "app:1")
    with pytest.raises(UnsafeInput):
        import_and_tag(write_tar(tmp_path, UNSAFE["through symlink"][0], name="evil.tar"), "app:2")
    assert read_tag(store, parse_ref("app:1"))["image"] == before
    assert [info.key for info in store.list("tags/")] == ["tags/app/1"]


def test_spool_files_live_exactly_as_long_as_the_context(tmp_path):
    with imported(write_tar(tmp_path, BASIC, "gzip")) as imp:
        spool = node_at(imp, "etc/hosts").source.path
        assert os.path.exists(spool)
    assert not os.path.exists(spool)
    with pytest.raises(InvalidSource):
        with imported(tmp_path / "missing.tar"):
            pass


@pytest.mark.root
def test_an_export_that_fails_is_an_export_error(tmp_path):
    """A full disk (a 256 KiB tmpfs) while writing a 1 MiB file: ExportError naming the target."""
    store = LocalStore(tmp_path / "store", fsync=False)
    with imported(write_tar(tmp_path, [reg("big", os.urandom(1 << 20))])) as imp:
        image_id, _ = write_image(store, imp.tree, imp.config)
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        with pytest.raises(ExportError, match=f"export to {small}/out: .*No space left"):
            export_image(load_index(store, image_id), ChunkReader(store), small / "out")
    finally:
        subprocess.run(["umount", str(small)], check=True)

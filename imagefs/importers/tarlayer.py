"""Apply one layer, an uncompressed tar spooled on disk, onto a BuildTree with OCI whiteouts.

Nothing is extracted: each entry becomes a Node, and a regular file's content is a RangeSource into
the spool (sparse members get a sparse spool file of their own). See imagefs.importers.layers for
how each kind of hostile entry is handled.
"""
from __future__ import annotations

import base64
import binascii
import os
import stat
import tarfile
import tempfile
from decimal import ROUND_FLOOR, Decimal, InvalidOperation
from typing import BinaryIO
from urllib.parse import unquote_to_bytes

from imagefs.errors import InvalidSource, UnsafeInput
from imagefs.tree import BuildTree, Node, RangeSource, normalise

# The largest file a sparse member may declare: its holes are chunked like data (about 1.4 GB/s
# here), so a header of a few bytes must not buy hours of work. Images rarely hold sparse files
# at all; a `lastlog` for a large uid is the usual one, and far smaller than this.
MAX_SPARSE_SIZE = 64 << 30
PATH_MAX = 4096  # a symlink target must fit, with its NUL, in what readlink and the kernel take
WHITEOUT = b".wh."
OPAQUE = b".wh..wh..opq"
AUFS_META = b".wh..wh."  # aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): skipped
COPY_PIECE = 1 << 20

_KIND = {
    tarfile.REGTYPE: stat.S_IFREG, tarfile.AREGTYPE: stat.S_IFREG, tarfile.CONTTYPE: stat.S_IFREG,
    tarfile.GNUTYPE_SPARSE: stat.S_IFREG, tarfile.DIRTYPE: stat.S_IFDIR,
    tarfile.SYMTYPE: stat.S_IFLNK, tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
    tarfile.FIFOTYPE: stat.S_IFIFO,
}


def raw(text: str) -> bytes:
    """A name as tarfile decoded it (utf-8, surrogateescape), back to its exact bytes."""
    return text.encode("utf-8", "surrogateescape")


def show(name: bytes) -> str:
    """A name for a one-line message: undecodable bytes and control characters escaped."""
    text = name.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


class Layer:
    """One spooled layer being applied; `what` names it in messages."""

    def __init__(self, tree: BuildTree, spool: str, workdir: str, what: str) -> None:
        self.tree, self.spool, self.workdir, self.what = tree, spool, workdir, what
        self.spool_b = os.fsencode(spool)
        self.spool_size = os.path.getsize(spool)

    def fail(self, cls: type[Exception], name: bytes, reason: str) -> Exception:
        return cls(f"{self.what}: {show(name) or '/'}: {reason}")

    def apply(self) -> None:
        """Whiteouts first, against the lower layers only; then this layer's entries in order."""
        members = self._members()
        entries = [(m, self._parts(m.name)) for m in members]
        for _, parts in entries:
            if _is_whiteout(parts):
                self._whiteout(parts)
        for m, parts in entries:
            if parts and parts[-1].startswith(WHITEOUT):
                self._dir_of(parts, create=True)  # implied parents; never through a symlink
            elif m.islnk():
                self._hardlink(m, parts)
            else:
                self._place(parts, self._node(m, parts))

    def _members(self) -> list[tarfile.TarInfo]:
        try:
            with tarfile.open(self.spool, "r:", encoding="utf-8", errors="surrogateescape") as tar:
                members = tar.getmembers()
                end = tar.offset
        except (tarfile.TarError, EOFError, ValueError, OverflowError) as e:
            raise InvalidSource(f"{self.what}: not a valid tar archive: {e}") from None
        self._check_tail(end)
        return members

    def _check_tail(self, end: int) -> None:
        """After the last member comes the end-of-archive marker (zero blocks) and only zero
        padding: nothing at all there is an archive cut at a member boundary (which tar itself
        would read without a word), anything else a corrupt header."""
        if self.spool_size - end < tarfile.BLOCKSIZE:
            raise InvalidSource(f"{self.what}: truncated tar: no end-of-archive marker after the last entry")
        with open(self.spool, "rb") as f:
            f.seek(end)
            while piece := f.read(COPY_PIECE):
                if piece.count(0) != len(piece):
                    raise InvalidSource(f"{self.what}: corrupt tar: invalid header at offset {end}")

    def _parts(self, name: str) -> tuple[bytes, ...]:
        try:
            return normalise(raw(name))
        except UnsafeInput as e:
            raise self.fail(UnsafeInput, raw(name), str(e).partition(": ")[0]) from None

    def _whiteout(self, parts: tuple[bytes, ...]) -> None:
        """Hide a name, or with the opaque marker everything, that lower layers had in a directory."""
        parent = self.tree.get(parts[:-1])
        name = parts[-1]
        if parent is None or not parent.is_dir or parent.children is None:
            return
        if name == OPAQUE:
            parent.children.clear()
            return
        hidden = name[len(WHITEOUT):]
        if hidden in (b"", b".", b".."):
            raise self.fail(UnsafeInput, b"/".join(parts), "invalid whiteout name")
        parent.children.pop(hidden, None)

    def _dir_of(self, parts: tuple[bytes, ...], *, create: bool, entry: bytes | None = None,
                role: str = "path") -> Node | None:
        """The directory to hold parts[-1], never going through a symlink or a non-directory.

        Messages name entry (default: the path itself) and call the walked path `role`."""
        node = self.tree.root
        for i, name in enumerate(parts[:-1]):
            assert node.children is not None
            child = node.children.get(name)
            if child is None:
                if not create:
                    return None
                child = node.children[name] = Node(mode=stat.S_IFDIR | 0o755, children={})
            elif stat.S_ISLNK(child.mode) or not child.is_dir:
                what = "goes through the symlink" if stat.S_ISLNK(child.mode) else "is below the non-directory"
                raise self.fail(UnsafeInput, b"/".join(parts) if entry is None else entry,
                                f"{role} {what} {show(b'/'.join(parts[:i + 1]))}")
            node = child
        return node

    def _place(self, parts: tuple[bytes, ...], node: Node) -> None:
        """Later entries win; a directory over a directory keeps what is inside (tar semantics)."""
        if not parts and not node.is_dir:
            raise self.fail(UnsafeInput, b"", "the image root must be a directory")
        self._dir_of(parts, create=True)
        self.tree.put(parts, node)

    def _hardlink(self, m: tarfile.TarInfo, parts: tuple[bytes, ...]) -> None:
        """The same Node under a second name; the target must already be in the tree."""
        target, entry = raw(m.linkname), b"/".join(parts)
        role = f"hardlink target {show(target)}"
        try:
            tparts = normalise(target)
        except UnsafeInput:
            raise self.fail(UnsafeInput, entry, f"{role} escapes the root") from None
        if not tparts:
            raise self.fail(UnsafeInput, entry, f"{role} is the root directory")
        found = self._dir_of(tparts, create=False, entry=entry, role=role)
        node = found.children.get(tparts[-1]) if found and found.children is not None else None
        if node is None:
            raise self.fail(UnsafeInput, entry, f"{role} is missing")
        if node.is_dir:
            raise self.fail(UnsafeInput, entry, f"{role} is a directory")
        self._place(parts, node)

    def _node(self, m: tarfile.TarInfo, parts: tuple[bytes, ...]) -> Node:
        kind = _KIND.get(m.type)
        if kind is None:
            raise self.fail(InvalidSource, b"/".join(parts), f"unsupported tar entry type {m.type!r}")
        node = Node(mode=kind | (m.mode & 0o7777), uid=self._id(m.uid, parts), gid=self._id(m.gid, parts),
                    mtime_ns=self._mtime(m, parts), xattrs=self._xattrs(m, parts))
        if kind == stat.S_IFDIR:
            node.children = {}
        elif kind == stat.S_IFREG:
            node.source = self._content(m, parts) if m.size else None
        elif kind == stat.S_IFLNK:
            node.target = raw(m.linkname)
            if not node.target:
                raise self.fail(InvalidSource, b"/".join(parts), "symlink with an empty target")
            if b"\0" in node.target:
                raise self.fail(InvalidSource, b"/".join(parts), "symlink target contains NUL")
            if len(node.target) >= PATH_MAX:
                raise self.fail(InvalidSource, b"/".join(parts), f"symlink target longer than {PATH_MAX - 1} bytes")
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            node.rdev = self._rdev(m, parts)  # metadata only: no device node is ever made here
        return node

    def _id(self, value: int, parts: tuple[bytes, ...]) -> int:
        if not 0 <= value < 1 << 32:
            raise self.fail(InvalidSource, b"/".join(parts), f"owner id {value} out of range")
        return value

    def _mtime(self, m: tarfile.TarInfo, parts: tuple[bytes, ...]) -> int:
        value = mtime_ns(m)
        if not -(1 << 63) <= value < 1 << 63:
            raise self.fail(InvalidSource, b"/".join(parts), "mtime out of range")
        return value

    def _rdev(self, m: tarfile.TarInfo, parts: tuple[bytes, ...]) -> int:
        try:
            return os.makedev(m.devmajor, m.devminor)
        except (OverflowError, ValueError):
            raise self.fail(InvalidSource, b"/".join(parts), "device number out of range") from None

    def _xattrs(self, m: tarfile.TarInfo, parts: tuple[bytes, ...]) -> dict[bytes, bytes]:
        try:
            return xattrs_of(m.pax_headers)
        except ValueError as e:
            raise self.fail(InvalidSource, b"/".join(parts), f"bad xattr record: {e}") from None

    def _content(self, m: tarfile.TarInfo, parts: tuple[bytes, ...]) -> RangeSource:
        stored = sum(n for _, n in m.sparse) if m.sparse is not None else m.size
        if m.offset_data + stored > self.spool_size:
            raise self.fail(InvalidSource, b"/".join(parts), "truncated tar: file data ends early")
        if m.sparse is None:
            return RangeSource(self.spool_b, m.offset_data, m.size)
        return self._sparse(m, parts)

    def _sparse(self, m: tarfile.TarInfo, parts: tuple[bytes, ...]) -> RangeSource:
        """Copy the data blocks to a file of their own at their offsets, leaving the holes as holes."""
        assert m.sparse is not None
        entry = b"/".join(parts)
        if not 0 <= m.size <= MAX_SPARSE_SIZE:
            raise self.fail(InvalidSource, entry, f"sparse file of {m.size} bytes (at most {MAX_SPARSE_SIZE})")
        if any(offset < 0 or length < 0 or offset + length > m.size for offset, length in m.sparse):
            raise self.fail(InvalidSource, entry, "sparse map outside the file")
        fd, path = tempfile.mkstemp(prefix="sparse-", dir=self.workdir)
        try:
            with open(self.spool, "rb") as src, os.fdopen(fd, "wb") as dst:
                src.seek(m.offset_data)
                for offset, length in m.sparse:
                    dst.seek(offset)
                    _copy(src, dst, length)
                dst.truncate(m.size)
        except OSError as e:
            raise self.fail(InvalidSource, entry, f"cannot spool the sparse file: {e.strerror}") from None
        return RangeSource(os.fsencode(path), 0, m.size)


def _copy(src: BinaryIO, dst: BinaryIO, length: int) -> None:
    while length:
        piece = src.read(min(length, COPY_PIECE))
        if not piece:
            raise EOFError("spool ended early")
        dst.write(piece)
        length -= len(piece)


def _is_whiteout(parts: tuple[bytes, ...]) -> bool:
    return bool(parts) and parts[-1].startswith(WHITEOUT) and (
        parts[-1] == OPAQUE or not parts[-1].startswith(AUFS_META))


def mtime_ns(m: tarfile.TarInfo) -> int:
    """Nanoseconds: PAX mtime keeps its fraction exactly (tarfile's float would round it)."""
    text = m.pax_headers.get("mtime")
    if text is not None:
        try:
            seconds = Decimal(text)
        except InvalidOperation:
            return 0  # as tarfile reads it
        if not seconds.is_finite() or abs(seconds) >= 1 << 40:
            return 1 << 63  # out of range, and never turned into a huge int
        return int(seconds.scaleb(9).to_integral_value(ROUND_FLOOR))
    return int(m.mtime) * 10**9


def xattrs_of(pax: dict[str, str]) -> dict[bytes, bytes]:
    """SCHILY.xattr.NAME (raw value) and LIBARCHIVE.xattr.NAME (URL-encoded name, base64 value)."""
    out: dict[bytes, bytes] = {}
    for key, value in pax.items():
        if key.startswith("SCHILY.xattr."):
            name, data = raw(key[len("SCHILY.xattr."):]), raw(value)
        elif key.startswith("LIBARCHIVE.xattr."):
            name, data = unquote_to_bytes(key[len("LIBARCHIVE.xattr."):]), _b64(value)
        else:
            continue
        if not name or b"\0" in name:
            raise ValueError(f"invalid xattr name {show(name)!r}")
        out[name] = data
    return out


def _b64(text: str) -> bytes:
    """libarchive writes base64 without '=' padding."""
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("LIBARCHIVE.xattr value is not base64") from None


def apply_layer(tree: BuildTree, spool: str, workdir: str, what: str) -> None:
    """Apply the layer tar at spool onto tree; workdir holds any extra spool files and must outlive it."""
    Layer(tree, spool, workdir, what).apply()

"""Write a stored image as an OCI image layout: one gzip layer holding the whole tree, a config with
the image's Env/Entrypoint/Cmd/WorkingDir/User/Labels and its diff_id, a manifest, and index.json
naming the manifest by ref (org.opencontainers.image.ref.name).

The layer is streamed straight from the index and the chunks (nothing is exported to disk first): a
PAX tar in tree order, so the first name of a hardlinked file carries its content and later names are
hardlink entries. Entries keep numeric uid/gid, mode (setuid, sticky), nanosecond mtimes (PAX mtime
when not whole seconds), xattrs (PAX SCHILY.xattr.*, security.capability included), symlink targets,
device numbers and fifos; names are bytes, written as PAX paths where they are not UTF-8. The root
directory is the entry "./". Sockets cannot be put in a tar and are left out. The output is
deterministic: the same image and compression level give the same digests.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import stat
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from imagefs.errors import InvalidSource
from imagefs.index import ROOT_INO, ImageConfig, ImageIndex, Inode
from imagefs.reader import ChunkReader, iter_file

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_ANNOTATION = "org.opencontainers.image.ref.name"
COPY_BUFFER = 1 << 20
_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}
_TAR_KIND = {stat.S_IFREG: tarfile.REGTYPE, stat.S_IFDIR: tarfile.DIRTYPE, stat.S_IFLNK: tarfile.SYMTYPE,
             stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE, stat.S_IFIFO: tarfile.FIFOTYPE}


@dataclass(frozen=True)
class OciImage:
    """What was written: the manifest's descriptor and the sizes a puller will fetch."""

    ref: str
    manifest_digest: str
    config_digest: str
    layer_digest: str
    diff_id: str
    layer_bytes: int  # compressed
    tar_bytes: int  # uncompressed
    total_bytes: int  # manifest + config + layer: what a pull downloads


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to `out`."""

    def __init__(self, out: BinaryIO) -> None:
        super().__init__()
        self.out, self.sha, self.size = out, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.out.write(view)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


class _FileContent(io.RawIOBase):
    """A regular file of the image as a readable stream (tarfile copies from it)."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        super().__init__()
        self.pieces, self.rest = pieces, memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        while not self.rest:
            piece = next(self.pieces, None)
            if piece is None:
                return 0
            self.rest = memoryview(piece)
        n = min(len(buf), len(self.rest))
        buf[:n] = self.rest[:n]
        self.rest = self.rest[n:]
        return n


def _text(name: bytes) -> str:
    """Bytes as tarfile's utf-8 + surrogateescape strings (it writes them back byte for byte)."""
    return name.decode("utf-8", "surrogateescape")


def _pax(node: Inode) -> dict[str, str]:
    out = {f"SCHILY.xattr.{_text(k)}": _text(v) for k, v in (node.xattrs or {}).items()}
    if node.mtime_ns % 10**9 or node.mtime_ns < 0:
        seconds, frac = divmod(node.mtime_ns, 10**9)
        out["mtime"] = f"{seconds}.{frac:09d}".rstrip("0").rstrip(".")
    return out


def _header(path: bytes, node: Inode) -> tarfile.TarInfo | None:
    """The tar header of one entry (None for a socket, which tar cannot hold)."""
    kind = _TAR_KIND.get(stat.S_IFMT(node.mode))
    if kind is None:
        return None
    ti = tarfile.TarInfo(_text(path.lstrip(b"/")))  # tarfile adds the '/' of a directory
    ti.type, ti.mode, ti.uid, ti.gid = kind, stat.S_IMODE(node.mode), node.uid, node.gid
    ti.mtime, ti.uname, ti.gname = node.mtime_ns // 10**9, "", ""
    ti.pax_headers = _pax(node)
    if kind == tarfile.REGTYPE:
        ti.size = node.size
    elif kind == tarfile.SYMTYPE:
        ti.linkname = _text(node.target)
    elif kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        ti.devmajor, ti.devminor = os.major(node.rdev), os.minor(node.rdev)
    return ti


def write_tar(index: ImageIndex, reader: ChunkReader, out: BinaryIO) -> None:
    """The image's tree as one PAX tar stream on out (which needs only write and tell)."""
    first: dict[int, str] = {}  # inode number -> first name written (hardlinks)
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        tar.copybufsize = COPY_BUFFER
        for path, ino in index.walk():
            node = index.inode(ino)
            ti = _header(b"." if ino == ROOT_INO else path, node)
            if ti is None:
                continue
            if ino in first and not node.is_dir:
                ti.type, ti.linkname, ti.size, ti.pax_headers = tarfile.LNKTYPE, first[ino], 0, {}
                tar.addfile(ti)
                continue
            first[ino] = ti.name
            content = None
            if ti.type == tarfile.REGTYPE:  # buffered: tarfile wants full reads
                content = io.BufferedReader(_FileContent(iter_file(reader, index, node)), COPY_BUFFER)
            tar.addfile(ti, content)


def _write_layer(index: ImageIndex, reader: ChunkReader, blobs: Path, level: int) -> tuple[str, int, str, int]:
    """Write the gzip layer into blobs/: (layer digest, compressed size, diff_id, tar size)."""
    fd, tmp = tempfile.mkstemp(prefix=".layer-", dir=blobs)
    try:
        with os.fdopen(fd, "wb") as f:
            packed = _Hashing(f)  # type: ignore[arg-type]
            with gzip.GzipFile(filename="", mode="wb", fileobj=packed, compresslevel=level, mtime=0) as gz:
                plain = _Hashing(gz)  # type: ignore[arg-type]
                write_tar(index, reader, plain)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, blobs / packed.digest.split(":")[1])
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return packed.digest, packed.size, plain.digest, plain.size


def _put_json(blobs: Path, doc: dict[str, Any], media_type: str) -> dict[str, Any]:
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(data).hexdigest()
    path = blobs / digest
    if not path.exists():
        tmp = blobs / f".{digest}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def config_doc(config: ImageConfig, diff_ids: list[str]) -> dict[str, Any]:
    """The OCI image config: the runtime fields that are set, and the layers' diff_ids."""
    keep_empty = ("Entrypoint", "Cmd")  # [] and null differ for these two
    wire = {k: v for k, v in config.to_wire().items() if v is not None and (v or k in keep_empty)}
    return {"architecture": _ARCH.get(platform.machine(), platform.machine()), "os": "linux",
            "config": wire, "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "coldstart export-oci"}]}


def _update_index(layout: Path, descriptor: dict[str, Any], ref: str) -> None:
    """index.json names the manifest by ref, replacing whatever that ref named before."""
    path = layout / "index.json"
    doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except ValueError as e:
            raise InvalidSource(f"{layout}: index.json is not JSON: {e}") from None
    kept = [m for m in doc.get("manifests", []) if (m.get("annotations") or {}).get(REF_ANNOTATION) != ref]
    doc["manifests"] = kept + [{**descriptor, "annotations": {REF_ANNOTATION: ref}}]
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    tmp = layout / ".index.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
    os.replace(tmp, path)


def write_oci_layout(index: ImageIndex, reader: ChunkReader, layout: str | os.PathLike[str],
                     ref: str = "latest", *, level: int = 6) -> OciImage:
    """Add the image to the OCI layout at `layout` (created if missing) under ref."""
    root = Path(layout)
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    layer, layer_size, diff_id, tar_size = _write_layer(index, reader, blobs, level)
    config = _put_json(blobs, config_doc(index.config, [diff_id]), OCI_CONFIG)
    manifest = _put_json(blobs, {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config,
                                 "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": layer, "size": layer_size}]},
                         OCI_MANIFEST)
    _update_index(root, manifest, ref)
    return OciImage(ref, manifest["digest"], config["digest"], layer, diff_id, layer_size, tar_size,
                    layer_size + config["size"] + manifest["size"])

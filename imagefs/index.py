"""The image index: the whole tree, each file's extents, and the OCI config. A pure model.

Inode numbers start at 1 (the root directory). Names are bytes, exactly as the source had them.
Extents are (chunk number, offset in chunk, length) in file order; chunk numbers index `chunks`.
"""
from __future__ import annotations

import bisect
import functools
import gc
import stat
from dataclasses import dataclass, field
from typing import Any, Iterator

import msgpack

from imagefs import chunks as blobs
from imagefs.chunks import Digest
from imagefs.errors import CorruptBlob

FORMAT_VERSION = 1
ROOT_INO = 1


@dataclass
class ImageConfig:
    """The parts of the OCI image config a runtime needs."""

    env: list[str] = field(default_factory=list)
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    working_dir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return {"Env": self.env, "Entrypoint": self.entrypoint, "Cmd": self.cmd,
                "WorkingDir": self.working_dir, "User": self.user, "Labels": self.labels}

    @classmethod
    def from_wire(cls, d: dict[str, Any] | None) -> "ImageConfig":
        d = d or {}
        return cls(env=list(d.get("Env") or []), entrypoint=d.get("Entrypoint"), cmd=d.get("Cmd"),
                   working_dir=d.get("WorkingDir") or "", user=d.get("User") or "",
                   labels=dict(d.get("Labels") or {}))


@dataclass(slots=True)
class Inode:
    mode: int  # st_mode with the file-type bits
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    rdev: int = 0
    target: bytes = b""  # symlink target
    xattrs: dict[bytes, bytes] | None = None
    extents: list[int] | None = None  # flat [chunk, offset, length, ...]
    nlink: int = 1
    _starts: list[int] | None = None  # file offset at which each extent starts (built on first read)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def extent_starts(self) -> list[int]:
        if self._starts is None:
            ext, pos, starts = self.extents or [], 0, []
            for i in range(2, len(ext), 3):
                starts.append(pos)
                pos += ext[i]
            self._starts = starts
        return self._starts

    def extent_end(self, offset: int) -> int:
        """The file offset where the extent holding byte offset ends."""
        starts, ext = self.extent_starts(), self.extents or []
        if not starts:
            return 0
        i = max(bisect.bisect_right(starts, offset) - 1, 0)
        return starts[i] + ext[3 * i + 2]

    def extents_for(self, offset: int, length: int) -> Iterator[tuple[int, int, int, int]]:
        """(chunk number, offset in chunk, length, offset in file) of the pieces covering a range."""
        ext, starts = self.extents or [], self.extent_starts()
        end = min(offset + length, self.size)
        i = max(bisect.bisect_right(starts, offset) - 1, 0)
        while i < len(starts) and starts[i] < end:
            c, coff, clen = ext[3 * i: 3 * i + 3]
            lo, hi = max(offset, starts[i]), min(end, starts[i] + clen)
            if hi > lo:
                yield c, coff + (lo - starts[i]), hi - lo, lo
            i += 1


@dataclass
class ImageIndex:
    inodes: list[Inode]  # inodes[0] is inode number 1, the root
    children: dict[int, dict[bytes, int]]  # directory inode -> name -> inode, names in tree order
    chunks: list[Digest]
    chunk_sizes: list[int]
    config: ImageConfig = field(default_factory=ImageConfig)
    parent_of: dict[int, int] = field(default_factory=dict)

    def inode(self, ino: int) -> Inode:
        return self.inodes[ino - 1]

    @functools.cached_property
    def size_of(self) -> dict[str, int]:
        """Each chunk's raw size by digest (built once; the index never changes once loaded)."""
        return dict(zip(self.chunks, self.chunk_sizes))

    def lookup(self, parent: int, name: bytes) -> int | None:
        return self.children.get(parent, {}).get(name)

    def resolve(self, path: bytes | str) -> int | None:
        """Inode of an absolute path inside the image (no symlink following)."""
        if isinstance(path, str):
            path = path.encode()
        ino: int | None = ROOT_INO
        for part in path.split(b"/"):
            if part and ino is not None:
                ino = self.lookup(ino, part)
        return ino

    def walk(self, ino: int = ROOT_INO, prefix: bytes = b"") -> Iterator[tuple[bytes, int]]:
        """(path, inode) for every entry below ino, depth first in tree order; the root as b'/'."""
        if ino == ROOT_INO and not prefix:
            yield b"/", ino
        for name, child in self.children.get(ino, {}).items():
            path = prefix + b"/" + name
            yield path, child
            if child in self.children:
                yield from self.walk(child, path)

    @property
    def file_bytes(self) -> int:
        return sum(i.size for i in self.inodes if i.is_reg)

    # -- wire format -------------------------------------------------------------------------
    def encode(self) -> bytes:
        rows = [[i.mode, i.uid, i.gid, i.mtime_ns, i.size, i.rdev, i.target, i.xattrs, i.extents]
                for i in self.inodes]
        dirents: list[Any] = []
        for parent, names in self.children.items():
            for name, child in names.items():
                dirents += (parent, name, child)
        doc = {"v": FORMAT_VERSION, "config": self.config.to_wire(),
               "chunks": [bytes.fromhex(d) for d in self.chunks], "chunk_sizes": self.chunk_sizes,
               "inodes": rows, "dirents": dirents}
        return msgpack.packb(doc, use_bin_type=True)

    @classmethod
    def decode(cls, data: bytes, digest: str = "?") -> "ImageIndex":
        """The index of an encoded one. The cyclic garbage collector is off meanwhile: the tens
        of thousands of objects a big tree makes would set it off again and again, to find
        nothing (measured on the 33k-inode torch index: 45 ms with it, 25 ms without)."""
        collecting = gc.isenabled()
        gc.disable()
        try:
            doc = msgpack.unpackb(data, raw=False, strict_map_key=False)
            return cls._from_doc(doc)
        except CorruptBlob:
            raise
        except Exception as e:  # any malformed structure is corruption, named by its digest
            raise CorruptBlob(digest, f"malformed image index: {e}") from None
        finally:
            if collecting:
                gc.enable()

    @classmethod
    def _from_doc(cls, doc: dict[str, Any]) -> "ImageIndex":
        if doc.get("v") != FORMAT_VERSION:
            raise CorruptBlob("?", f"unknown index version {doc.get('v')}")
        inodes = [Inode(*row) for row in doc["inodes"]]
        children: dict[int, dict[bytes, int]] = {}
        parent_of: dict[int, int] = {}
        for i, ino in enumerate(inodes, 1):
            if stat.S_ISDIR(ino.mode):
                children[i] = {}
                ino.nlink = 2
            else:
                ino.nlink = 0
        d = doc["dirents"]
        for k in range(0, len(d), 3):
            parent, name, child = d[k], d[k + 1], d[k + 2]
            children[parent][name] = child
            node = inodes[child - 1]
            if child in children:
                parent_of[child] = parent
                inodes[parent - 1].nlink += 1
            else:
                node.nlink += 1
        chunk_list = [Digest(c.hex()) for c in doc["chunks"]]
        return cls(inodes, children, chunk_list, list(doc["chunk_sizes"]),
                   ImageConfig.from_wire(doc["config"]), parent_of)


def encode_index(index: ImageIndex) -> tuple[Digest, bytes]:
    """(image ID, stored blob) of an index."""
    raw = index.encode()
    return blobs.digest_of(raw), blobs.encode(raw)

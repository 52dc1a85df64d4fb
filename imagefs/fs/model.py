"""The mounted image as a pure filesystem model: attributes, lookups, listings, xattrs and reads.

Nothing here knows about pyfuse3. Reads go through a ChunkSource (the fetcher in the daemon, a
dict in tests); failures are the domain errors of imagefs.fs.errors.
"""
from __future__ import annotations

import itertools
import os
import stat
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import trio

from imagefs.chunks import Digest
from imagefs.fs.errors import (AccessDenied, BadHandle, IsADirectory, NoAttribute, NoEntry,
                               NotADirectory, NotASymlink, ReadOnly)
from imagefs.fs.trace import AccessTrace
from imagefs.index import ImageIndex, Inode

BLOCK_SIZE = 4096
IO_BLOCK_SIZE = 128 * 1024  # st_blksize: a hint to readers to ask for big pieces
NAME_MAX = 255
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


class ChunkSource(Protocol):
    """Where chunk contents come from: verified, decompressed bytes by digest."""

    async def get(self, digest: Digest, size: int) -> bytes: ...

    def peek(self, digest: Digest) -> bytes | None:
        """The content if it is at hand (in memory) right now, without waiting."""

    def readahead(self, chunks: Sequence[tuple[Digest, int]]) -> None:
        """Start fetching these chunks in the background, if not already there."""


@dataclass(frozen=True, slots=True)
class Attr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class FSStats:
    block_size: int
    blocks: int
    files: int
    name_max: int


@dataclass(frozen=True, slots=True)
class Piece:
    """One part of a read: `length` bytes at `offset` of chunk number `chunk`, at `file_offset`."""

    chunk: int
    offset: int
    length: int
    file_offset: int


@dataclass(frozen=True)
class ReadaheadPolicy:
    """Sequential readers get a window that doubles from min_bytes up to max_bytes; others none."""

    min_bytes: int = 256 * 1024
    max_bytes: int = 32 * 1024 * 1024
    slack: int = 256 * 1024  # how far a read may start from the previous end and still count

    def window(self, streak: int) -> int:
        if streak <= 0 or self.max_bytes <= 0:
            return 0
        return min(self.max_bytes, self.min_bytes << min(streak - 1, 30))


@dataclass(slots=True)
class OpenFile:
    ino: int
    inode: Inode
    next_offset: int = 0
    streak: int = 0


@dataclass
class _Handles:
    files: dict[int, OpenFile] = field(default_factory=dict)
    counter: "itertools.count[int]" = field(default_factory=lambda: itertools.count(1))


class ImageFS:
    """A read-only filesystem over one image index."""

    def __init__(self, index: ImageIndex, source: ChunkSource, *, trace: AccessTrace | None = None,
                 readahead: ReadaheadPolicy = ReadaheadPolicy()) -> None:
        self.index = index
        self.source = source
        self.trace = trace
        self.readahead_policy = readahead
        self._handles = _Handles()
        self._listings: dict[int, list[tuple[bytes, int]]] = {}
        self._file_bytes = index.file_bytes

    # -- metadata ------------------------------------------------------------------------------
    def inode(self, ino: int) -> Inode:
        if not 1 <= ino <= len(self.index.inodes):
            raise NoEntry(f"no inode {ino}")
        return self.index.inodes[ino - 1]

    def getattr(self, ino: int) -> Attr:
        node = self.inode(ino)
        size = node.size if not node.is_dir else BLOCK_SIZE
        return Attr(ino=ino, mode=node.mode, nlink=node.nlink, uid=node.uid, gid=node.gid,
                    rdev=node.rdev, size=size, blocks=(size + 511) // 512, mtime_ns=node.mtime_ns)

    def lookup(self, parent: int, name: bytes) -> int:
        """The inode of name in directory parent; '.' and '..' included."""
        self._dir(parent)
        if name == b".":
            return parent
        if name == b"..":
            return self.index.parent_of.get(parent, parent)
        ino = self.index.children[parent].get(name)
        if ino is None:
            raise NoEntry(f"no {name!r} in directory {parent}")
        return ino

    def _dir(self, ino: int) -> Inode:
        node = self.inode(ino)
        if not node.is_dir:
            raise NotADirectory(f"inode {ino} is not a directory")
        return node

    def opendir(self, ino: int) -> int:
        self._dir(ino)
        return ino

    def readdir(self, ino: int, start: int) -> Iterator[tuple[bytes, int, int]]:
        """(name, inode, offset of the next entry) from position start on; no '.' or '..'."""
        listing = self._listings.get(ino)
        if listing is None:
            self._dir(ino)
            listing = self._listings[ino] = list(self.index.children[ino].items())
        for pos in range(start, len(listing)):
            name, child = listing[pos]
            yield name, child, pos + 1

    def readlink(self, ino: int) -> bytes:
        node = self.inode(ino)
        if not stat.S_ISLNK(node.mode):
            raise NotASymlink(f"inode {ino} is not a symbolic link")
        return node.target

    def getxattr(self, ino: int, name: bytes) -> bytes:
        value = (self.inode(ino).xattrs or {}).get(name)
        if value is None:
            raise NoAttribute(f"inode {ino} has no attribute {name!r}")
        return value

    def listxattr(self, ino: int) -> list[bytes]:
        return list(self.inode(ino).xattrs or ())

    def statfs(self) -> FSStats:
        blocks = (self._file_bytes + BLOCK_SIZE - 1) // BLOCK_SIZE
        return FSStats(BLOCK_SIZE, blocks, len(self.index.inodes), NAME_MAX)

    def access(self, ino: int, mode: int, uid: int, gids: set[int]) -> None:
        """Raise AccessDenied (or ReadOnly for W_OK) unless the caller may access ino as asked."""
        node = self.inode(ino)
        if mode & os.W_OK:
            raise ReadOnly("the image is read-only")
        want = mode & (os.R_OK | os.X_OK)
        if uid == 0:
            if want & os.X_OK and not (node.is_dir or node.mode & 0o111):
                raise AccessDenied(f"inode {ino} is not executable by anyone")
            return
        shift = 6 if uid == node.uid else 3 if node.gid in gids else 0
        if want & ~((node.mode >> shift) & 0o7):
            raise AccessDenied(f"uid {uid} may not access inode {ino} with mode {mode:o}")

    # -- file contents -------------------------------------------------------------------------
    def open(self, ino: int, flags: int) -> int:
        node = self.inode(ino)
        if flags & _WRITE_FLAGS:
            raise ReadOnly("the image is read-only")
        if node.is_dir:
            raise IsADirectory(f"inode {ino} is a directory")
        fh = next(self._handles.counter)
        self._handles.files[fh] = OpenFile(ino, node)
        if self.trace is not None:
            self.trace.file(ino)
        return fh

    def release(self, fh: int) -> None:
        self._handles.files.pop(fh, None)

    def pieces(self, inode: Inode, offset: int, size: int) -> list[Piece]:
        return [Piece(*p) for p in inode.extents_for(offset, size)] if inode.is_reg else []

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        """Up to size bytes at offset; short only at the end of the file."""
        handle = self._handles.files.get(fh)
        if handle is None:
            raise BadHandle(f"file handle {fh} is not open")
        pieces = self.pieces(handle.inode, offset, size)
        self._note_read(handle, pieces, offset, size)
        if not pieces:
            return b""
        data = await self._fetch(pieces)
        if len(pieces) == 1:
            p = pieces[0]
            return memoryview(data[0])[p.offset:p.offset + p.length]  # type: ignore[arg-type]
        return b"".join(memoryview(d)[p.offset:p.offset + p.length]  # type: ignore[arg-type]
                        for d, p in zip(data, pieces))

    async def _fetch(self, pieces: list[Piece]) -> list[bytes | None]:
        """The chunks of the pieces: those in memory at once, the others loaded concurrently."""
        chunks, sizes = self.index.chunks, self.index.chunk_sizes
        out = [self.source.peek(chunks[p.chunk]) for p in pieces]
        missing = [i for i, data in enumerate(out) if data is None]
        if len(missing) == 1:
            c = pieces[missing[0]].chunk
            out[missing[0]] = await self.source.get(chunks[c], sizes[c])
        elif missing:
            async def one(i: int) -> None:
                c = pieces[i].chunk
                out[i] = await self.source.get(chunks[c], sizes[c])

            async with trio.open_nursery() as nursery:
                for i in missing:
                    nursery.start_soon(one, i)
        return out

    def _note_read(self, handle: OpenFile, pieces: list[Piece], offset: int, size: int) -> None:
        """Trace first touches and start readahead for sequential readers."""
        if self.trace is not None:
            for p in pieces:
                self.trace.chunk(p.chunk, handle.ino, p.file_offset)
        slack = self.readahead_policy.slack
        sequential = offset != 0 and abs(offset - handle.next_offset) <= slack
        handle.streak = handle.streak + 1 if sequential else 0
        handle.next_offset = offset + size
        window = self.readahead_policy.window(handle.streak)
        if window and pieces:
            self._readahead(handle.inode, offset + size, window, {p.chunk for p in pieces})

    def _readahead(self, inode: Inode, start: int, window: int, skip: set[int]) -> None:
        wanted: list[tuple[Digest, int]] = []
        for chunk, _off, _n, _foff in inode.extents_for(start, window):
            if chunk not in skip:
                skip.add(chunk)
                wanted.append((self.index.chunks[chunk], self.index.chunk_sizes[chunk]))
        if wanted:
            self.source.readahead(wanted)

"""The mounted image as a pure filesystem model: attributes, lookups, listings, xattrs and reads.

Nothing here knows about pyfuse3. Reads go through a ChunkSource (the fetcher in the daemon, a
dict in tests); failures are the domain errors of imagefs.fs.errors.
"""
from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence, runtime_checkable

import trio

from imagefs.chunks import Content, Digest
from imagefs.fs.errors import (AccessDenied, BadHandle, FSError, IsADirectory, NoAttribute, NoEntry,
                               NotADirectory, NotASymlink, ReadOnly)
from imagefs.fs.trace import PROBE_PREFIX, AccessTrace
from imagefs.index import ImageIndex, Inode
from imagefs.tree import NAME_MAX

BLOCK_SIZE = 4096
IO_BLOCK_SIZE = 128 * 1024  # st_blksize: a hint to readers to ask for big pieces
PUSH_MAX = 256 * 1024  # files up to this size may be handed to the kernel whole when first opened
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT


Data = bytes | memoryview | bytearray


class ChunkSource(Protocol):
    """Where chunk contents come from: verified, decompressed bytes by digest."""

    async def get(self, digest: Digest, size: int) -> Content: ...

    def peek(self, digest: Digest) -> Content | None:
        """The content if it is at hand (in memory) right now, without waiting."""

    def readahead(self, chunks: Sequence[tuple[Digest, int]]) -> None:
        """Start fetching these chunks in the background, if not already there."""


@runtime_checkable
class PartSource(ChunkSource, Protocol):
    """A ChunkSource that can also hand out parts of chunks without loading them whole."""

    def peek_range(self, digest: Digest, offset: int, length: int) -> Data | None:
        """The part if it is at hand right now (memory, a verified file in the page cache)."""

    def peek_into(self, digest: Digest, offset: int, dst: memoryview) -> bool:
        """Copy the part at offset into dst if it is at hand right now; False if not."""

    async def get_range(self, digest: Digest, size: int, offset: int, length: int) -> Data: ...

    def planned(self, digest: Digest, offset: int, length: int) -> bool:
        """Whether this part is on its way without asking (a prefetch plan such as a profile's
        read-set pack holds it): reading it says nothing about what to read ahead."""


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
    # Chunks after one a read must wait for, in image order: files are stored in tree order, so
    # the next chunk often holds what is read next (the rest of a package, of a library).
    neighbors: int = 1

    def window(self, streak: int) -> int:
        if streak <= 0 or self.max_bytes <= 0:
            return 0
        return min(self.max_bytes, self.min_bytes << min(streak - 1, 30))


@dataclass(slots=True)
class ReadStream:
    """Where the last read of an inode ended, and how many reads in a row went on from there."""

    next_offset: int = 0
    streak: int = 0
    ahead_until: int = 0  # readahead has been asked for up to this file offset (in this streak)


@dataclass
class _Opens:
    """Opens the kernel announced (it may not: see FuseOps); a file handle is the inode number."""

    count: dict[int, int] = field(default_factory=dict)  # open handles of each inode
    pushed: set[int] = field(default_factory=set)  # inodes whose whole content was handed out


class ImageFS:
    """A read-only filesystem over one image index."""

    def __init__(self, index: ImageIndex, source: ChunkSource, *, trace: AccessTrace | None = None,
                 readahead: ReadaheadPolicy = ReadaheadPolicy(), push_max: int = PUSH_MAX) -> None:
        self.index = index
        self.push_max = push_max
        self.source = source
        self.trace = trace
        self.readahead_policy = readahead
        self._opens = _Opens()
        self._streams: dict[int, ReadStream] = {}
        self._listings: dict[int, list[tuple[bytes, int]]] = {}
        self._file_bytes = index.file_bytes
        self._parts = source if isinstance(source, PartSource) else None

    # -- metadata ------------------------------------------------------------------------------
    @functools.cached_property
    def has_xattrs(self) -> bool:
        """Whether any entry of the image has an xattr (asked once, at the first getxattr)."""
        return any(node.xattrs for node in self.index.inodes)

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
        if self.trace is not None and not (ino is None and name.startswith(PROBE_PREFIX)):
            self.trace.lookup(parent, name)  # (a health probe is no part of what a workload reads)
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
        if start == 0 and self.trace is not None:
            self.trace.listing(ino)
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
        """Check that ino may be read; the file handle is the inode number itself."""
        node = self.inode(ino)
        if flags & _WRITE_FLAGS:
            raise ReadOnly("the image is read-only")
        if node.is_dir:
            raise IsADirectory(f"inode {ino} is a directory")
        self._opens.count[ino] = self._opens.count.get(ino, 0) + 1
        if self.trace is not None:
            self.trace.file(ino)
        return ino

    def release(self, fh: int) -> None:
        left = self._opens.count.pop(fh, 0) - 1
        if left > 0:
            self._opens.count[fh] = left

    def contents_to_push(self, fh: int) -> Data | None:
        """The whole content of a small file just opened for the first time, if it is at hand.

        A caller may hand it to the kernel's page cache before the open completes, which spares
        the read: no read of the file can be in flight then, as no other handle is open (a read
        in flight holds the page the push would have to lock). Each inode is handed out once; the
        chunks are traced as if read.
        """
        ino = fh
        node = self.inode(ino)
        if (ino in self._opens.pushed or self._opens.count.get(ino) != 1
                or not node.is_reg or not 0 < node.size <= self.push_max):
            return None
        pieces = self.pieces(node, 0, node.size)
        if len(pieces) == 1:
            data = self._peek(pieces[0])
        else:
            out = bytearray(node.size)
            view = memoryview(out)
            ok = all(self._peek_into(p, view[p.file_offset:p.file_offset + p.length]) for p in pieces)
            data = out if ok else None
        if data is not None:
            self._opens.pushed.add(ino)
            if self.trace is not None:
                for p in pieces:
                    self.trace.read(p.chunk, p.offset, p.length, ino, p.file_offset)
        return data

    def pieces(self, inode: Inode, offset: int, size: int) -> list[Piece]:
        return [Piece(*p) for p in inode.extents_for(offset, size)] if inode.is_reg else []

    async def read(self, fh: int, offset: int, size: int) -> Data:
        """Up to size bytes at offset of the file whose handle (inode number) is fh; short only
        at the end of the file. No open is needed: the kernel may skip it (see FuseOps)."""
        got = await self.read_parts(fh, offset, size, join=True)
        return got[0] if got else b""

    async def read_parts(self, fh: int, offset: int, size: int, *, join: bool = False
                         ) -> tuple[Data, ...]:
        """What read returns, as one buffer per chunk the range crosses (views of the chunks
        where they are held in memory: no copy), or as one buffer with join."""
        if not 1 <= fh <= len(self.index.inodes):
            raise BadHandle(f"no file with handle {fh}")
        node = self.index.inodes[fh - 1]
        pieces = self.pieces(node, offset, size)
        self._note_read(fh, node, pieces, offset, size)
        if len(pieces) > 1 and join:
            return (await self._gather(pieces),)
        got: list[Data | None] = [self._peek(p) for p in pieces]
        missing = [i for i, d in enumerate(got) if d is None]
        if missing:  # most reads of a start-up find their chunk at hand: no coroutine for them
            await self._wait_all(pieces, missing, got.__setitem__)
        return tuple(got)  # type: ignore[arg-type]  # each None was filled, or _wait_all raised

    def _load_neighbors(self, chunk: int) -> None:
        """Chunk must be waited for: start loading the chunks after it in the background."""
        n = self.readahead_policy.neighbors
        last = min(chunk + n, len(self.index.chunks) - 1)
        if last > chunk:
            chunks, sizes = self.index.chunks, self.index.chunk_sizes
            self.source.readahead([(chunks[c], sizes[c]) for c in range(chunk + 1, last + 1)
                                   if not self._planned(Piece(c, 0, sizes[c], -1))])

    def _peek(self, p: Piece) -> Data | None:
        """The piece if it can be had without waiting (no copy when it is in memory)."""
        digest = self.index.chunks[p.chunk]
        if self._parts is not None:
            return self._parts.peek_range(digest, p.offset, p.length)
        data = self.source.peek(digest)
        return None if data is None else memoryview(data)[p.offset:p.offset + p.length]

    def _planned(self, p: Piece) -> bool:
        return self._parts is not None and self._parts.planned(self.index.chunks[p.chunk], p.offset, p.length)

    async def _wait_for(self, p: Piece) -> Data:
        if not self._planned(p):
            self._load_neighbors(p.chunk)
        digest, size = self.index.chunks[p.chunk], self.index.chunk_sizes[p.chunk]
        if self._parts is not None:
            return await self._parts.get_range(digest, size, p.offset, p.length)
        return memoryview(await self.source.get(digest, size))[p.offset:p.offset + p.length]

    async def _gather(self, pieces: list[Piece]) -> bytearray:
        """Several pieces, each copied once into one buffer; the missing ones loaded concurrently."""
        start = pieces[0].file_offset
        out = bytearray(pieces[-1].file_offset + pieces[-1].length - start)
        view = memoryview(out)
        slots = [view[p.file_offset - start:p.file_offset - start + p.length] for p in pieces]
        missing = [i for i, p in enumerate(pieces) if not self._peek_into(p, slots[i])]

        def put(i: int, data: Data) -> None:
            slots[i][:] = data

        if missing:
            await self._wait_all(pieces, missing, put)
        return out

    async def _wait_all(self, pieces: list[Piece], which: list[int],
                        put: Callable[[int, Data], None]) -> None:
        """Wait for pieces[i] for each i in which (not empty), concurrently; put(i, data) as each
        arrives."""
        if len(which) == 1:
            put(which[0], await self._wait_for(pieces[which[0]]))
            return
        errors: list[FSError] = []

        async def one(i: int) -> None:
            try:
                put(i, await self._wait_for(pieces[i]))
            except FSError as e:  # reported as itself, not wrapped in an exception group
                errors.append(e)

        async with trio.open_nursery() as nursery:
            for i in which:
                nursery.start_soon(one, i)
        if errors:
            raise errors[0]

    def _peek_into(self, p: Piece, dst: memoryview) -> bool:
        digest = self.index.chunks[p.chunk]
        if self._parts is not None:
            return self._parts.peek_into(digest, p.offset, dst)
        data = self.source.peek(digest)
        if data is None:
            return False
        dst[:] = memoryview(data)[p.offset:p.offset + p.length]
        return True

    def _note_read(self, ino: int, node: Inode, pieces: list[Piece], offset: int, size: int) -> None:
        """Trace first touches and start readahead for sequential readers (unless what they read
        was planned: a recorded start-up read just that much)."""
        if self.trace is not None:
            self.trace.file(ino)
            for p in pieces:
                self.trace.read(p.chunk, p.offset, p.length, ino, p.file_offset)
        stream = self._streams.get(ino)
        if stream is None:
            stream = self._streams[ino] = ReadStream()
        slack = self.readahead_policy.slack
        sequential = offset != 0 and abs(offset - stream.next_offset) <= slack
        stream.streak = stream.streak + 1 if sequential else 0
        stream.next_offset = offset + size
        if not sequential:
            stream.ahead_until = 0
        window = self.readahead_policy.window(stream.streak)
        # Only the part of the window past what this streak already asked for is new: a reader
        # going through a file from the host cache would otherwise re-check every chunk of a
        # 32 MiB window on each 1 MiB read.
        start, end = max(offset + size, stream.ahead_until), min(offset + size + window, node.size)
        if start < end and pieces and not all(self._planned(p) for p in pieces):
            stream.ahead_until = self._readahead(node, start, end - start, {p.chunk for p in pieces})

    def _readahead(self, inode: Inode, start: int, length: int, skip: set[int]) -> int:
        """Ask for the chunks under [start, start + length) of the file; returns the file offset
        where the last of them ends (the next window goes on from there)."""
        wanted: list[tuple[Digest, int]] = []
        last = start  # where the last piece asked for starts in the file
        for chunk, off, n, foff in inode.extents_for(start, length):
            last = foff
            if chunk not in skip and not self._planned(Piece(chunk, off, n, foff)):
                skip.add(chunk)
                wanted.append((self.index.chunks[chunk], self.index.chunk_sizes[chunk]))
        if wanted:
            self.source.readahead(wanted)
        return max(inode.extent_end(last), start + length)

"""The pyfuse3 adapter: translates kernel requests to the ImageFS model and its errors to errno.

The image is immutable, so the kernel may cache everything for long: entries, attributes, negative
lookups (an entry with inode 0), file pages, directory listings and symlink targets. Requests that
would only repeat what the kernel can know by itself are answered ENOSYS once, so that it stops
sending them: open/opendir (with the patched pyfuse3 of third_party/pyfuse3, which then hands
reads the inode number), flush, fsync, and getxattr/listxattr of an image without any xattr.
errno_for() is the only place where errors become errno; anything it does not know is a bug,
logged with the request and turned into EIO.
"""
from __future__ import annotations

import errno
import functools
import gc
import logging
import os
import time
from typing import Any, Awaitable, Callable, Sequence, TypeVar

import pyfuse3

from imagefs.fs.errors import (AccessDenied, BadHandle, ChunkUnavailable, IsADirectory, NoAttribute,
                               NoEntry, NotADirectory, NotASymlink, ReadOnly)
from imagefs.fs.metrics import OpMetrics
from imagefs.fs.model import Attr, Data, ImageFS

log = logging.getLogger(__name__)

CACHE_TIMEOUT = 24 * 3600.0  # seconds the kernel may keep entries and attributes
# Readahead requests the kernel may have in flight; 0 keeps its default (12). Measured on 1 GiB
# sequential reads (bench/fs_bench.py --only read, 3 repeats): 64 gave 295 MB/s from the store
# against 394 MB/s with 12, and no gain from the host cache (950 against 924 MB/s).
MAX_BACKGROUND = 0

# What the pyfuse3 build offers beyond the stock one (third_party/pyfuse3): with
# 'ino_without_open', reads and listings name the inode when the kernel skips open/opendir;
# with 'polling', the session loop can poll the device for a while after each reply; with
# 'read_parts', a read may be answered with a tuple of buffers (sent as one reply, unjoined).
PYFUSE3_FEATURES: frozenset[str] = getattr(pyfuse3, "coldstart_features", frozenset())

# Microseconds the daemon keeps polling the FUSE device after a reply before it sleeps. A caller
# that makes one request after another (an importer) sends the next within tens of µs; found by
# polling, it costs no wake-up of the daemon. Measured with the patched pyfuse3 (negative
# lookups in a loop): 84-100 µs per round trip without, 28-33 µs with 50 µs, no better with 200.
POLL_US = 50


def default_poll_us() -> int:
    """$COLDSTART_POLL_US if set (0 turns polling off: a host short of CPU, or many busy
    mounts), else POLL_US."""
    text = os.environ.get("COLDSTART_POLL_US", "").strip()
    try:
        return max(0, int(text)) if text else POLL_US
    except ValueError:
        log.warning("ignoring COLDSTART_POLL_US=%r: not a number of microseconds", text)
        return POLL_US


def set_polling(microseconds: int) -> bool:
    """Poll the device this long after each reply (0: sleep at once); False if this pyfuse3
    cannot (the stock build). Only after pyfuse3.init()."""
    if "polling" not in PYFUSE3_FEATURES:
        return False
    pyfuse3.set_polling(microseconds)  # type: ignore[attr-defined]  # the patched build only
    return True


_ERRNO: tuple[tuple[type[Exception], int], ...] = (
    (NoEntry, errno.ENOENT),
    (NotADirectory, errno.ENOTDIR),
    (IsADirectory, errno.EISDIR),
    (NotASymlink, errno.EINVAL),
    (NoAttribute, pyfuse3.ENOATTR),
    (ReadOnly, errno.EROFS),
    (BadHandle, errno.EBADF),
    (AccessDenied, errno.EACCES),
    (ChunkUnavailable, errno.EIO),
)

T = TypeVar("T")


def errno_for(exc: BaseException) -> int | None:
    """The errno of a domain error; None for an exception nobody expected."""
    for cls, code in _ERRNO:
        if isinstance(exc, cls):
            return code
    return None


def mount_options(*, allow_other: bool = True) -> set[str]:
    """Read-only, kernel permission checks; setuid bits honoured when root mounts (as in a rootfs)."""
    opts = {"fsname=coldstart", "subtype=coldstart", "ro", "default_permissions"}
    if allow_other:
        opts.add("allow_other")
    if os.geteuid() == 0:
        opts.add("suid")
    return opts


def _op(name: str) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., Awaitable[T]]]:
    """Time the operation, count it, and translate its errors."""

    def wrap(fn: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(fn)
        async def run(self: "FuseOps", *args: Any) -> T:
            start = time.perf_counter_ns()
            failed = True
            try:
                result = await fn(self, *args)
                failed = False
                return result
            except pyfuse3.FUSEError:
                raise
            except Exception as e:
                code = errno_for(e)
                if code is None:
                    log.exception("unexpected error in %s%r", name, _printable(args))
                    code = errno.EIO
                elif code == errno.EIO:
                    log.warning("%s%r failed: %s", name, _printable(args), e)
                raise pyfuse3.FUSEError(code) from None
            finally:
                self.metrics.record(name, time.perf_counter_ns() - start, failed)

        return run

    return wrap


def _printable(args: Sequence[Any]) -> tuple[Any, ...]:
    return tuple(a for a in args if not isinstance(a, (pyfuse3.RequestContext, pyfuse3.ReaddirToken)))


class FuseOps(pyfuse3.Operations):
    """Kernel requests in, model calls, replies (or errno) out."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False
    enable_cache_symlinks = True  # asked for by the patched pyfuse3 only
    max_background = MAX_BACKGROUND  # likewise

    def __init__(self, fs: ImageFS, metrics: OpMetrics | None = None,
                 timeout: float = CACHE_TIMEOUT, *, skip_open: bool | None = None) -> None:
        super().__init__()
        self.fs = fs
        self.metrics = metrics or OpMetrics()
        self.timeout = timeout
        # Whether open/opendir answer ENOSYS, so that the kernel stops sending them (and their
        # releases), keeps file pages and caches listings by itself. Needs a pyfuse3 that then
        # hands reads the inode number (the kernel's file handle is 0).
        self.skip_open = "ino_without_open" in PYFUSE3_FEATURES if skip_open is None else skip_open
        # A read that crosses chunks is answered with one buffer per chunk (the kernel gathers
        # them: no joining copy in the daemon) where the pyfuse3 build takes a tuple of buffers.
        self.reply_parts = "read_parts" in PYFUSE3_FEATURES
        self._entries: dict[int, pyfuse3.EntryAttributes] = {}
        self._session = False  # True once the kernel has said hello (pyfuse3 calls init)

    def init(self) -> None:
        """The kernel said hello: data may now be pushed to it. The image index is loaded and
        never changes, so the garbage collector need not walk it again (a full pass over a big
        image takes tens of milliseconds in the middle of some request)."""
        self._session = True
        gc.freeze()

    def _entry(self, ino: int) -> pyfuse3.EntryAttributes:
        entry = self._entries.get(ino)
        if entry is None:
            entry = self._entries[ino] = self._make_entry(self.fs.getattr(ino))
        return entry

    def _make_entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = pyfuse3.InodeT(a.ino)
        e.generation = 0
        e.entry_timeout = e.attr_timeout = self.timeout
        e.st_mode = pyfuse3.ModeT(a.mode)
        e.st_nlink = a.nlink
        e.st_uid, e.st_gid, e.st_rdev = a.uid, a.gid, a.rdev
        e.st_size, e.st_blocks = a.size, a.blocks
        e.st_blksize = 128 * 1024
        e.st_atime_ns = e.st_ctime_ns = e.st_mtime_ns = a.mtime_ns
        return e

    def _negative(self) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = pyfuse3.InodeT(0)
        e.entry_timeout = self.timeout
        return e

    # -- metadata ------------------------------------------------------------------------------
    @_op("lookup")
    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        try:
            ino = self.fs.lookup(parent_inode, name)
        except NoEntry:
            return self._negative()  # cached by the kernel like any entry
        return self._entry(ino)

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        """Inodes are fixed for the life of the mount; nothing to forget."""

    @_op("getattr")
    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        return self._entry(inode)

    @_op("readlink")
    async def readlink(self, inode: int, ctx: Any = None) -> bytes:
        return self.fs.readlink(inode)

    async def opendir(self, inode: int, ctx: Any = None) -> int:
        if self.skip_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # once: the kernel caches listings from now on
        return await self._opendir(inode)

    @_op("opendir")
    async def _opendir(self, inode: int) -> int:
        return pyfuse3.FileHandleT(self.fs.opendir(inode))

    @_op("readdir")
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for name, ino, next_id in self.fs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, name, self._entry(ino), next_id):
                break

    async def releasedir(self, fh: int) -> None:
        """Directory handles are inode numbers; nothing to release."""

    @_op("getxattr")
    async def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        if not self.fs.has_xattrs:
            # An image without any xattr: ENOSYS makes the kernel answer every later getxattr
            # itself (EOPNOTSUPP, which overlayfs takes as "none"). Otherwise overlayfs asks
            # for trusted.overlay.* of every file a container looks up, each a round trip.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        return self.fs.getxattr(inode, name)

    @_op("listxattr")
    async def listxattr(self, inode: int, ctx: Any = None) -> list[bytes]:
        if not self.fs.has_xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # as for getxattr
        return self.fs.listxattr(inode)

    @_op("statfs")
    async def statfs(self, ctx: Any = None) -> pyfuse3.StatvfsData:
        s = self.fs.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = s.block_size
        out.f_blocks, out.f_files, out.f_namemax = s.blocks, s.files, s.name_max
        out.f_bfree = out.f_bavail = out.f_ffree = out.f_favail = 0
        return out

    @_op("access")
    async def access(self, inode: int, mode: int, ctx: Any = None) -> bool:
        uid, gids = (ctx.uid, pyfuse3.get_sup_groups(ctx.pid) | {ctx.gid}) if ctx else (0, set())
        try:
            self.fs.access(inode, mode, uid, gids)
        except AccessDenied:
            return False
        return True

    # -- contents ------------------------------------------------------------------------------
    async def open(self, inode: int, flags: int, ctx: Any = None) -> pyfuse3.FileInfo:
        if self.skip_open:
            raise pyfuse3.FUSEError(errno.ENOSYS)  # once: reads come without opens from now on
        return await self._open(inode, flags)

    @_op("open")
    async def _open(self, inode: int, flags: int) -> pyfuse3.FileInfo:
        fh = self.fs.open(inode, flags)
        if self._session:
            data = self.fs.contents_to_push(fh)
            if data is not None:
                self._push(inode, data)
        return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(fh), keep_cache=True, direct_io=False)

    def _push(self, inode: int, data: Any) -> None:
        """Put a file's content into the kernel's page cache (keep_cache keeps it there)."""
        try:
            pyfuse3.notify_store(inode, 0, data)
        except OSError as e:  # e.g. ENOSYS: the read will simply come
            log.debug("notify_store of inode %d failed: %s", inode, e)
            return
        self.metrics.pushed_files += 1
        self.metrics.pushed_bytes += len(data)

    @_op("read")
    async def read(self, fh: int, off: int, size: int) -> Data | tuple[Data, ...]:
        parts = await self.fs.read_parts(fh, off, size, join=not self.reply_parts)
        if len(parts) == 1:
            self.metrics.read_bytes += len(parts[0])
            return parts[0]
        self.metrics.read_bytes += sum(map(len, parts))
        return parts or b""

    async def flush(self, fh: int) -> None:
        """Nothing is ever dirty: ENOSYS tells the kernel to stop sending flush on every close."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    async def release(self, fh: int) -> None:
        self.fs.release(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        """Nothing is ever dirty (ENOSYS: the kernel stops asking and reports success)."""
        raise pyfuse3.FUSEError(errno.ENOSYS)

    # -- everything that would change the image ------------------------------------------------
    @_op("modify")
    async def _read_only(self, *args: Any) -> Any:
        raise ReadOnly("the image is read-only")

    setattr = mknod = mkdir = unlink = rmdir = symlink = rename = link = _read_only
    write = create = setxattr = removexattr = _read_only

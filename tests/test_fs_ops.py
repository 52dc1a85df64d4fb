"""Filesystem operations called directly (no kernel) on a small image: the model and the adapter."""
from __future__ import annotations

import errno
import logging
import os
import random
import socket
import stat
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import pyfuse3
import pytest
import trio

from imagefs.chunks import Digest
from imagefs.fs.cache import HostCache, MemoryCache
from imagefs.fs.fetcher import ChunkFetcher
from imagefs.fs.fuse_ops import FuseOps, errno_for
from imagefs.fs.model import ImageFS, ReadaheadPolicy
from imagefs.fs.trace import PROBE_PREFIX, AccessTrace
from imagefs.images import load_index
from imagefs.index import ImageIndex
from imagefs.store.local import LocalStore
from imagefs.writer import ChunkerParams, write_image
from imagefs.importers.rootfs import import_rootfs
from tests.fixtures.rootfs import make_rich_tree

T = TypeVar("T")
SMALL_CHUNKS = ChunkerParams(avg_size=64 * 1024, min_size=16 * 1024, max_size=256 * 1024)


def make_tree(root: Path) -> Path:
    """The rich test tree plus a socket, a file spanning many chunks and a big directory."""
    make_rich_tree(root)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "tmp/sock"))
    sock.close()
    rng = random.Random(7)
    (root / "big.bin").write_bytes(rng.randbytes(900_000) + bytes(300_000))
    many = root / "many"
    many.mkdir()
    for i in range(300):
        (many / f"f{i:03d}").write_bytes(f"file {i}\n".encode())
    return root


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LocalStore, ImageIndex]:
    base = tmp_path_factory.mktemp("ops")
    src = make_tree(base / "src")
    store = LocalStore(base / "store", fsync=False)
    image_id, _ = write_image(store, import_rootfs(src), params=SMALL_CHUNKS)
    return src, store, load_index(store, image_id)


def with_ops(index: ImageIndex, store: Any, fn: Callable[[FuseOps], Awaitable[T]], *,
             cache: HostCache | None = None, skip_open: bool = False, **fetch_kw: Any) -> T:
    """Run fn on FuseOps over the image; by default with open/opendir served (the stock pyfuse3
    way), with skip_open as the kernel sees it when they answer ENOSYS."""
    async def main() -> T:
        fetcher = ChunkFetcher(store, cache, MemoryCache(), **fetch_kw)
        async with fetcher.running():
            ops = FuseOps(ImageFS(index, fetcher, trace=AccessTrace()), skip_open=skip_open)
            return await fn(ops)

    return trio.run(main)


async def resolve(ops: FuseOps, path: str) -> int:
    ino = pyfuse3.ROOT_INODE
    for part in path.strip("/").split("/"):
        if part:
            ino = (await ops.lookup(ino, os.fsencode(part))).st_ino
            assert ino, f"{path}: {part} not found"
    return ino


def reply(data: object) -> bytes:
    """The bytes of a read's answer: one buffer, or a tuple of them the kernel would gather."""
    return b"".join(data) if isinstance(data, tuple) else bytes(data)  # type: ignore[arg-type]


async def read_all(ops: FuseOps, ino: int, step: int = 128 * 1024) -> bytes:
    fi = await ops.open(ino, os.O_RDONLY)
    out, off = bytearray(), 0
    while data := reply(await ops.read(fi.fh, off, step)):
        out += data
        off += len(data)
    await ops.release(fi.fh)
    return bytes(out)


def fuse_errno(excinfo: pytest.ExceptionInfo[pyfuse3.FUSEError]) -> int:
    return excinfo.value.errno


def source_entries(src: Path) -> list[tuple[str, os.stat_result]]:
    out = []
    for dirpath, dirnames, filenames in os.walk(src):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            out.append((os.path.relpath(full, src), os.lstat(full)))
    return out


def test_getattr_matches_source(image: tuple[Path, LocalStore, ImageIndex]) -> None:
    src, store, index = image

    async def check(ops: FuseOps) -> None:
        for rel, st in source_entries(src):
            a = await ops.getattr(await resolve(ops, rel))
            assert a.st_mode == st.st_mode, rel
            assert (a.st_uid, a.st_gid, a.st_mtime_ns) == (st.st_uid, st.st_gid, st.st_mtime_ns), rel
            if not stat.S_ISDIR(st.st_mode):
                assert (a.st_size, a.st_nlink) == (st.st_size, st.st_nlink), rel
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                assert a.st_rdev == st.st_rdev, rel
            assert a.entry_timeout >= 3600 and a.attr_timeout >= 3600

    with_ops(index, store, check)


def test_hardlinks_are_one_inode(image: tuple[Path, LocalStore, ImageIndex]) -> None:
    _src, store, index = image

    async def check(ops: FuseOps) -> None:
        a, b = await resolve(ops, "bin/busybox"), await resolve(ops, "bin/sh")
        assert a == b
        assert (await ops.getattr(a)).st_nlink == 2

    with_ops(index, store, check)


def test_directory_nlink_counts_subdirectories(image: tuple[Path, LocalStore, ImageIndex]) -> None:
    src, store, index = image

    async def nlink(ops: FuseOps) -> int:
        return (await ops.getattr(pyfuse3.ROOT_INODE)).st_nlink

    assert with_ops(index, store, nlink) == os.lstat(src).st_nlink


def test_negative_lookup_is_cached(image: tuple[Path, LocalStore, ImageIndex]) -> None:
    _src, store, index = image

    async def check(ops: FuseOps) -> None:
        e = await ops.lookup(pyfuse3.ROOT_INODE, b"no-such-file")
        assert e.st_ino == 0 and e.entry_timeout >= 3600
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.lookup(await resolve(ops, "etc/passwd"), b"x")
        assert fuse_errno(exc) == errno.ENOTDIR

    with_ops(index, store, check)


def test_dot_and_dotdot_lookups(image: tuple[Path, LocalStore, ImageIndex]) -> None:
    _src, store, index = image

    async def check(ops: FuseOps) -> None:
        etc = await resolve(ops, "etc")
        assert (await ops.lookup(etc, b".")).st_ino == etc
        assert (await ops.lookup(etc, b"..")).st_ino == pyfuse3.ROOT_INODE

    with_ops(index, store, check)


def test_readdir_lists_everything_and_resumes(image: tuple[Path, LocalStore, ImageIndex],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    src, store, index = image
    replies: list[tuple[bytes, int, int]] = []
    budget = {"left": 0}

    def fake_reply(token: Any, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if budget["left"] == 0:
            return False
        budget["left"] -= 1
        replies.append((name, attr.st_ino, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", fake_reply)

    async def listing(ops: FuseOps) -> None:
        fh = await ops.opendir(await resolve(ops, "many"), None)
        start = 0
        while True:  # 7 entries per reply, like a small kernel buffer
            budget["left"] = 7
            before = len(replies)
            await ops.readdir(fh, start, None)  # type: ignore[arg-type]
            if len(replies) == before:
                break
            start = replies[-1][2]
        await ops.releasedir(fh)

    with_ops(index, store, listing)
    assert [r[0] for r in replies] == sorted(os.fsencode(n) for n in os.listdir(src / "many"))
    assert len({r[1] for r in replies}) == 300


def test_read_matches_source_at_any_offset(image: tuple[Path, LocalStore, ImageIndex]) -> None:
    src, store, index = image
    content = (src / "big.bin").read_bytes()
    rng = random.Random(1)
    ranges = [(rng.randrange(len(content) + 10), rng.choice([1, 4096, 70_000, 300_000]))
              for _ in range(60)] + [(len(content) - 5, 100), (len(content), 10), (0, len(content) + 1)]

    async def check(ops: FuseOps) -> None:
        fi = await ops.open(await resolve(ops, "big.bin"), os.O_RDONLY)
        for off, size in ranges:
            assert reply(await ops.read(fi.fh, off, size)) == content[off:off + size], (off, size)
        assert await read_all(ops, await resolve(ops, "bin/busybox")) == (src / "bin/busybox").read_bytes()
        assert await read_all(ops, await resolve(ops, "empty")) == b""

    with_ops(index, store, check)


def test_read_across_chunks_answers_with_the_chunks_unjoined(
        image: tuple[Path, LocalStore, ImageIndex]) -> None:
    """With a pyfuse3 that takes a tuple of buffers, a read that crosses chunks held in memory is
    answered with views of those chunks (the kernel gathers them); without, with one buffer."""
    src, store, index = image
    content = (src / "big.bin").read_bytes()
    node = index.inodes[index.resolve("big.bin") - 1]
    _, _, length, start = next(node.extents_for(0, len(content)))
    off, size = start + length - 100, 300  # 100 bytes of the first chunk, 200 of the next

    async def check(ops: FuseOps) -> tuple[object, object]:
        ino = await resolve(ops, "big.bin")
        await ops.read(ino, 0, len(content))  # loads every chunk into memory
        ops.reply_parts = True
        parts = await ops.read(ino, off, size)
        ops.reply_parts = False
        return parts, await ops.read(ino, off, size)

    parts, joined = with_ops(index, store, check, skip_open=True)
    assert isinstance(parts, tuple) and [len(p) for p in parts] == [100, 200]
    assert all(isinstance(p, memoryview) for p in parts)
    assert b"".join(parts) == bytes(joined) == content[off:off + size]


def test_readlink_and_xattrs(image: tuple[Path, LocalStore, ImageIndex]) -> None:
    src, store, index = image

    async def check(ops: FuseOps) -> None:
        assert await ops.readlink(await resolve(ops, "bin/ls")) == b"busybox"
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.readlink(await resolve(ops, "etc/passwd"))
        assert fuse_errno(exc) == errno.EINVAL
        ping = await resolve(ops, "bin/ping")
        assert sorted(await ops.listxattr(ping)) == [b"security.capability", b"user.note"]
        assert await ops.getxattr(ping, b"security.capability") == os.getxattr(
            src / "bin/ping", "security.capability")
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.getxattr(ping, b"user.missing")
        assert fuse_errno(exc) == pyfuse3.ENOATTR
        assert await ops.listxattr(await resolve(ops, "etc")) == []

    with_ops(index, store, check)


def test_statfs(image: tuple[Path, LocalStore, ImageIndex]) -> None:
    _src, store, index = image
    s = with_ops(index, store, lambda ops: ops.statfs(None))
    assert s.f_files == len(index.inodes)
    assert s.f_blocks * s.f_bsize >= index.file_bytes
    assert s.f_bfree == s.f_bavail == s.f_ffree == 0
    assert s.f_namemax == 255


def test_writes_fail_with_erofs(image: tuple[Path, LocalStore, ImageIndex]) -> None:
    _src, store, index = image

    async def check(ops: FuseOps) -> list[int]:
        passwd = await resolve(ops, "etc/passwd")
        calls = [ops.open(passwd, os.O_WRONLY), ops.open(passwd, os.O_RDWR),
                 ops.mkdir(1, b"new", 0o755, None), ops.unlink(1, b"empty", None),
                 ops.create(1, b"new", 0o644, os.O_WRONLY, None), ops.write(1, 0, b"x"),
                 ops.setxattr(passwd, b"user.x", b"1", None), ops.rename(1, b"a", 1, b"b", 0, None),
                 ops.access(passwd, os.W_OK, None)]
        codes = []
        for call in calls:
            with pytest.raises(pyfuse3.FUSEError) as exc:
                await call
            codes.append(fuse_errno(exc))
        return codes

    assert set(with_ops(index, store, check)) == {errno.EROFS}


def test_access_checks_mode_bits(image: tuple[Path, LocalStore, ImageIndex]) -> None:
    _src, store, index = image

    async def check(ops: FuseOps) -> None:
        data = await resolve(ops, "home/data.txt")  # 0640 1000:1000
        model = ops.fs
        model.access(data, os.R_OK, 1000, {1000})
        model.access(data, os.R_OK, 2000, {1000})
        for uid, gids, mode in ((2000, {2000}, os.R_OK), (1000, {1000}, os.X_OK)):
            with pytest.raises(Exception) as exc:
                model.access(data, mode, uid, gids)
            assert errno_for(exc.value) == errno.EACCES
        assert await ops.access(data, os.R_OK, None)

    with_ops(index, store, check)


def test_bad_inode_and_handle(image: tuple[Path, LocalStore, ImageIndex]) -> None:
    _src, store, index = image

    async def check(ops: FuseOps) -> None:
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.getattr(10_000)
        assert fuse_errno(exc) == errno.ENOENT
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.read(999, 0, 10)
        assert fuse_errno(exc) == errno.EBADF
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.open(1, os.O_RDONLY)
        assert fuse_errno(exc) == errno.EISDIR

    with_ops(index, store, check)


class BrokenSource:
    async def get(self, digest: Digest, size: int) -> bytes:
        raise RuntimeError("bug in a chunk source")

    def peek(self, digest: Digest) -> bytes | None:
        return None

    def readahead(self, chunks: Any) -> None:
        pass


def test_unexpected_error_is_eio_and_logged(image: tuple[Path, LocalStore, ImageIndex],
                                            caplog: pytest.LogCaptureFixture) -> None:
    _src, _store, index = image

    async def main() -> int:
        ops = FuseOps(ImageFS(index, BrokenSource()), skip_open=False)
        fi = await ops.open(await resolve(ops, "etc/passwd"), os.O_RDONLY)
        with pytest.raises(pyfuse3.FUSEError) as exc:
            await ops.read(fi.fh, 0, 100)
        return fuse_errno(exc)

    with caplog.at_level(logging.ERROR, logger="imagefs.fs.fuse_ops"):
        assert trio.run(main) == errno.EIO
    assert any("unexpected error in read" in r.getMessage() and "bug in a chunk source" in r.exc_text
               for r in caplog.records if r.exc_text)


def test_metrics_and_trace(image: tuple[Path, LocalStore, ImageIndex]) -> None:
    _src, store, index = image

    async def run(ops: FuseOps) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        await read_all(ops, await resolve(ops, "etc/passwd"))
        await read_all(ops, await resolve(ops, "big.bin"))
        await read_all(ops, await resolve(ops, "etc/passwd"))
        assert ops.fs.trace is not None
        return ops.metrics.as_dict(), ops.fs.trace.dump(index)

    metrics, trace = with_ops(index, store, run)
    assert metrics["ops"]["read"]["count"] >= 12 and metrics["ops"]["lookup"]["count"] >= 4
    assert metrics["ops"]["read"]["p50_us"] <= metrics["ops"]["read"]["p99_us"]
    files = [e["path"] for e in trace if e["kind"] == "file"]
    assert files == ["/etc/passwd", "/big.bin"]
    touched = [e for e in trace if e["kind"] in ("file", "chunk")]
    chunks = [e["chunk"] for e in touched if e["kind"] == "chunk"]
    assert len(chunks) == len(set(chunks)) and touched[1]["path"] == "/etc/passwd"
    big = index.inode(index.resolve("/big.bin"))
    big_chunks = [index.chunks[c] for c in (big.extents or [])[::3]]
    assert [c for c in chunks if c in big_chunks] == list(dict.fromkeys(big_chunks))
    assert [e["t"] for e in trace] == sorted(e["t"] for e in trace)


def test_trace_keeps_each_lookup_and_listing_once_in_order(image: tuple[Path, LocalStore, ImageIndex],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Names looked up (found or not) and directories read from their start are traced once
    each, in the order the kernel asked, with their paths: a profile replays them (imagefs.fs.warm)."""
    _src, store, index = image

    async def run(ops: FuseOps) -> list[dict[str, Any]]:
        etc = await resolve(ops, "etc")
        await ops.lookup(etc, b"passwd")
        await ops.lookup(etc, b"passwd")  # asked again (the kernel forgot it): traced once
        assert (await ops.lookup(etc, b"nope")).st_ino == 0
        assert (await ops.lookup(etc, PROBE_PREFIX + b"0123")).st_ino == 0  # a health probe: not traced
        await ops.lookup(etc, b"..")  # not a name of the image
        many = await resolve(ops, "many")
        fh = await ops.opendir(many, None)
        for start in (0, 5, 0):  # a listing read in parts, then again from its start
            await ops.readdir(fh, start, None)  # type: ignore[arg-type]
        await ops.lookup(many, b"f001")
        assert ops.fs.trace is not None
        return ops.fs.trace.dump(index)

    monkeypatch.setattr(pyfuse3, "readdir_reply", lambda *a: True)
    trace = with_ops(index, store, run)
    names = [(e["kind"], e["path"]) for e in trace if e["kind"] in ("lookup", "list")]
    assert names == [("lookup", "/etc"), ("lookup", "/etc/passwd"), ("lookup", "/etc/nope"),
                     ("lookup", "/many"), ("list", "/many"), ("lookup", "/many/f001")]
    t = AccessTrace(name_limit=2)
    t.lookup(1, b"a")
    t.listing(1)
    t.lookup(1, b"b")
    assert len(t) == 2 and t.truncated and t.names == [b"a"]


def test_readahead_policy_window() -> None:
    p = ReadaheadPolicy(min_bytes=100, max_bytes=1000)
    assert [p.window(s) for s in range(6)] == [0, 100, 200, 400, 800, 1000]
    assert ReadaheadPolicy(max_bytes=0).window(5) == 0


class RecordingSource:
    """A ChunkSource over a store that records every readahead request."""

    def __init__(self, store: LocalStore) -> None:
        self.store = store
        self.asked: list[list[Digest]] = []

    async def get(self, digest: Digest, size: int) -> bytes:
        from imagefs import chunks as blobs
        return blobs.decode(self.store.get(blobs.chunk_key(digest)), digest)

    def peek(self, digest: Digest) -> bytes | None:
        return None

    def readahead(self, chunks: Any) -> None:
        self.asked.append([d for d, _ in chunks])


def test_sequential_readahead_asks_for_each_chunk_once_per_streak(
        image: tuple[Path, LocalStore, ImageIndex]) -> None:
    """A reader going through a file gets the chunks ahead of it asked for, each once: the
    window grows with the streak, but what an earlier read of the streak asked for is not asked
    for again (it was re-checked on every read before, a cost on every hot 1 MiB read). A jump
    starts a new streak, which may ask again."""
    src, store, index = image
    node = index.inode(index.resolve("/big.bin"))
    file_chunks = [index.chunks[c] for c in (node.extents or [])[::3]]
    assert len(file_chunks) >= 8

    async def main() -> RecordingSource:
        source = RecordingSource(store)
        fs = ImageFS(index, source, readahead=ReadaheadPolicy(min_bytes=64 * 1024, max_bytes=512 * 1024,
                                                              neighbors=0))
        ino = index.resolve("/big.bin")
        assert ino is not None
        data = b"".join([bytes(await fs.read(ino, off, 32 * 1024)) for off in range(0, node.size, 32 * 1024)])
        assert data == (src / "big.bin").read_bytes()
        streak = [d for ask in source.asked for d in ask]
        assert len(streak) == len(set(streak)), "a chunk was asked for twice in one streak"
        assert set(streak) == set(file_chunks[1:]) - {file_chunks[0]}  # all but where it started
        source.asked.clear()
        await fs.read(ino, 0, 32 * 1024)  # back to the start: a new streak
        await fs.read(ino, 32 * 1024, 32 * 1024)
        assert source.asked and source.asked[0][0] in file_chunks
        return source

    trio.run(main)


def test_without_open_reads_and_listings_name_the_inode(image: tuple[Path, LocalStore, ImageIndex]) -> None:
    """skip_open: open and opendir answer ENOSYS (the kernel then stops sending them), and reads
    and listings come with the inode number where the handle would be (the patched pyfuse3)."""
    src, store, index = image

    async def check(ops: FuseOps) -> None:
        ino = await resolve(ops, "big.bin")
        for call in (ops.open(ino, os.O_RDONLY), ops.opendir(pyfuse3.ROOT_INODE, None)):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await call
            assert fuse_errno(e) == errno.ENOSYS
        content = (src / "big.bin").read_bytes()
        assert reply(await ops.read(ino, 0, len(content) + 1)) == content
        listed: list[bytes] = []

        def entry(token: Any, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
            listed.append(name)
            return True

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(pyfuse3, "readdir_reply", entry)
            await ops.readdir(await resolve(ops, "many"), 0, None)  # type: ignore[arg-type]
        assert sorted(listed) == sorted(os.fsencode(n) for n in os.listdir(src / "many"))
        assert {"open", "opendir"}.isdisjoint(ops.metrics.as_dict()["ops"])
        assert ops.fs.trace is not None and ino in {e[2] for e in ops.fs.trace.events if e[1] == "file"}

    with_ops(index, store, check, skip_open=True)


def test_image_without_xattrs_answers_enosys_for_them(tmp_path: Path) -> None:
    """ENOSYS, so that the kernel stops asking (see FuseOps.getxattr); the rich image above,
    which has xattrs, answers them (test_readlink_and_xattrs)."""
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d/f").write_bytes(b"x")
    store = LocalStore(tmp_path / "store", fsync=False)
    image_id, _ = write_image(store, import_rootfs(src))
    index = load_index(store, image_id)

    async def check(ops: FuseOps) -> None:
        assert not ops.fs.has_xattrs
        f = await resolve(ops, "d/f")
        for call in (ops.getxattr(f, b"user.x"), ops.listxattr(f), ops.getxattr(1, b"trusted.overlay.origin")):
            with pytest.raises(pyfuse3.FUSEError) as e:
                await call
            assert fuse_errno(e) == errno.ENOSYS

    with_ops(index, store, check)

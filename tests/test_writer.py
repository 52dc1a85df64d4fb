"""Chunking and image writing: golden boundaries, packing of small files, dedup, big-file splits."""
import random
import stat

import pytest

from imagefs import chunks as blobs
from imagefs.images import load_index
from imagefs.reader import ChunkReader, read_range
from imagefs.store.local import LocalStore
from imagefs.tree import BuildTree, BytesSource, Node, new_dir
from imagefs.writer import ChunkerParams, write_image

# Future changes must not move these: every stored digest depends on them.
GOLDEN_LENGTHS = [487251, 1502441, 1283755, 1116019, 1258114, 1496197, 1980784, 1679604, 1276223, 502524]


def test_golden_chunk_boundaries():
    data = random.Random(20261129).randbytes(12 << 20)
    assert [c.length for c in ChunkerParams().cutter().cut_buf(data)] == GOLDEN_LENGTHS


def _file(data: bytes, mode: int = 0o644) -> Node:
    return Node(mode=stat.S_IFREG | mode, source=BytesSource(data))


def _tree(files: dict[str, bytes]) -> BuildTree:
    tree = BuildTree()
    for path, data in files.items():
        parts = tuple(p.encode() for p in path.split("/"))
        tree.put(parts, _file(data))
    return tree


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "store", fsync=False)


def _contents(store, image_id):
    index = load_index(store, image_id)
    reader = ChunkReader(store)
    out = {}
    for path, ino in index.walk():
        node = index.inode(ino)
        if node.is_reg:
            out[path.decode()] = read_range(reader, index, node, 0, node.size)
    return index, out


def test_small_files_share_chunks(store):
    rng = random.Random(1)
    files = {f"pkg/mod{i:04d}.py": rng.randbytes(rng.randrange(100, 8000)) for i in range(1300)}
    image_id, stats = write_image(store, _tree(files))
    index, back = _contents(store, image_id)
    assert back == {"/" + k: v for k, v in files.items()}
    # 1,300 files of ~4 KiB (about 5 MiB) land in a handful of ~1 MiB chunks, not 1,300.
    assert len(index.chunks) <= 10
    assert stats.files == 1300 and stats.new_chunks == len(index.chunks)


def test_large_file_is_split_and_range_reads_touch_one_chunk(store):
    big = random.Random(2).randbytes(24 << 20)
    image_id, _ = write_image(store, _tree({"weights.bin": big}))
    index = load_index(store, image_id)
    node = index.inode(index.resolve("/weights.bin"))
    assert len(index.chunks) >= 12
    pieces = list(node.extents_for(10 << 20, 4096))
    assert len({p[0] for p in pieces}) == 1
    reader = ChunkReader(store)
    assert read_range(reader, index, node, 10 << 20, 4096) == big[10 << 20:(10 << 20) + 4096]
    assert reader.fetches == 1


def test_reimport_uploads_nothing_and_same_id(store):
    rng = random.Random(3)
    files = {f"d{i % 7}/f{i}": rng.randbytes(20000) for i in range(300)}
    id1, s1 = write_image(store, _tree(files))
    id2, s2 = write_image(store, _tree(files))
    assert id1 == id2 and s1.new_chunks > 0 and s2.new_chunks == 0 and s2.new_bytes == 0


def test_dedup_across_images_with_different_neighbours(store):
    rng = random.Random(4)
    shared = {f"lib/a{i:03d}": rng.randbytes(50_000) for i in range(800)}  # ~40 MB
    img1 = dict(shared, **{"aaa/first": rng.randbytes(300_000)})
    img2 = dict(shared, **{"lib/a100x": rng.randbytes(70_000), "zzz/last": rng.randbytes(300_000)})
    _, s1 = write_image(store, _tree(img1))
    _, s2 = write_image(store, _tree(img2))
    # The second image inserts a file in the middle and changes both ends, yet most is reused.
    assert s2.new_raw_bytes < 0.25 * s2.file_bytes, s2  # ~4 chunks of ~1.2 MiB


def test_hardlinks_and_metadata_survive(store):
    tree = BuildTree()
    f = _file(b"shared content", 0o4755)
    f.uid, f.gid, f.mtime_ns = 1000, 1001, 1_700_000_000_123_456_789
    f.xattrs = {b"security.capability": b"\x01\x00\x00\x02" + b"\x00" * 16, b"user.k": b"v"}
    tree.put((b"bin", b"a"), f)
    tree.put((b"bin", b"b"), f)
    tree.put((b"dev", b"null"), Node(mode=stat.S_IFCHR | 0o666, rdev=(1 << 8) | 3))
    tree.put((b"run", b"fifo"), Node(mode=stat.S_IFIFO | 0o600))
    tree.put((b"link",), Node(mode=stat.S_IFLNK | 0o777, target=b"/bin/a"))
    tree.put((b"\xe9t\xe9",), _file(b"latin-1 name"))
    tree.put((b"empty",), new_dir(0o1777))
    image_id, _ = write_image(store, tree)
    index = load_index(store, image_id)
    a, b = index.resolve("/bin/a"), index.resolve("/bin/b")
    assert a == b and index.inode(a).nlink == 2
    node = index.inode(a)
    assert (node.mode, node.uid, node.gid, node.mtime_ns) == (stat.S_IFREG | 0o4755, 1000, 1001,
                                                              1_700_000_000_123_456_789)
    assert node.xattrs[b"security.capability"].startswith(b"\x01\x00\x00\x02")
    assert index.inode(index.resolve("/dev/null")).rdev == (1 << 8) | 3
    assert stat.S_ISFIFO(index.inode(index.resolve("/run/fifo")).mode)
    assert index.inode(index.resolve("/link")).target == b"/bin/a"
    assert index.resolve(b"/\xe9t\xe9") is not None
    assert index.inode(index.resolve("/empty")).mode == stat.S_IFDIR | 0o1777


def test_index_is_verified_on_load(store):
    image_id, _ = write_image(store, _tree({"x": b"1"}))
    key = blobs.index_key(image_id)
    blob = bytearray(store.get(key))
    blob[-1] ^= 0xFF
    store.put(key, bytes(blob))
    with pytest.raises(Exception, match="corrupt blob"):
        load_index(store, image_id)

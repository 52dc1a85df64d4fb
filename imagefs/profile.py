"""Start-up profiles: the chunks an image's container touched until it was ready, in first-touch
order, recorded from a mount's access trace and replayed as prefetch on later mounts.

A profile is stored as its own content-addressed blob (profiles/<digest>) and linked from the
image's tag (the tag's "profile" field), so recording one never changes the image ID. Recording
again replaces the link: a profile describes one start-up, and merging start-ups of different
commands would make every mount prefetch the union of what any of them ever touched.

A recorded profile also carries a read-set pack: the byte ranges the start-up actually read of
each chunk (the access trace's spans), copied in first-touch order into segments growing from
PACK_FIRST to PACK_SEGMENT bytes, each stored as a chunk blob of its own (chunks/<digest>: zstd at
PACK_LEVEL, verified by blake3 like any chunk). Replay fetches the segments instead of the whole chunks, so it moves,
decodes and caches what the start-up reads rather than every chunk it touched (about half, for
`import torch`); a read outside the pack's ranges loads its chunk as usual. gc keeps the segments
of every profile it keeps.
"""
from __future__ import annotations

import heapq
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

from imagefs import chunks as blobs
from imagefs.chunks import Digest
from imagefs.errors import BlobNotFound, CorruptBlob, ImageFSError
from imagefs.fs.trace import merge_spans
from imagefs.hostfiles import HostFiles
from imagefs.images import Ref, update_tag
from imagefs.index import ImageIndex
from imagefs.store.base import BlobStore

log = logging.getLogger(__name__)
# The read-set pack is an optional field of version 1: a reader from before packs still takes the
# chunk list (and replays chunk by chunk); one that knows packs uses the pack.
VERSION = 1
PACK_SEGMENT = 4 * 1024 * 1024  # raw bytes per pack segment (one store request each)
# The first segment is small and each next one twice as big, up to PACK_SEGMENT: what a start reads
# first (the runner's /etc/passwd, the interpreter) arrives after one small request, not after
# the first four 4 MiB segments that the prefetch workers fetch at once. A segment closes after
# the part that takes it past its size, and a chunk read for the most part is one whole part, so
# an early segment is often one chunk (about 1 MiB), and then that chunk itself.
PACK_FIRST = 256 * 1024
# Segments are written once, when a profile is saved, and read at every cold start of the image,
# so they take a slower zstd level than chunks (which an import writes once and may never read).
# Measured on the torch pack (172 MB raw): level 1 59.5 MB in 0.36 s, 3 52.1 MB in 0.55 s,
# 6 48.7 MB in 1.54 s, 9 47.6 MB in 3.3 s; decompression takes 0.19-0.25 s at every level.
PACK_LEVEL = 6
PACK_READERS = 8  # chunks read at once while a pack is built
# Big ranges are the kernel's readahead and mmap read-around windows, which start a few pages to
# a few hundred KiB elsewhere from one run to the next (measured: torch's libtorch_cpu.so, 4 KiB to
# 190 KiB). Ranges of at least PACK_PAD_MIN are widened by PACK_PAD on each side: for
# `import torch` the pack grows from 144 to 158 MiB and the next start's windows fall inside it.
PACK_PAD_MIN = 512 * 1024
PACK_PAD = 256 * 1024
# A chunk read for the most part goes into the pack whole: for `import torch`, 97 of 210 chunks
# have at least 70 % of their bytes in ranges, and taking them whole adds 5 MiB (3 %) to the
# pack, so that a next start which reads them a little differently still finds every byte.
PACK_WHOLE = 0.7
# Name entries of a profile (imagefs.fs.trace's lookups and listings)
NAME_LOOKUP = "l"
NAME_LIST = "d"
_NAME_KINDS = {"lookup": NAME_LOOKUP, "list": NAME_LIST}
NAMES_MAX = 100_000


@dataclass(frozen=True)
class Segment:
    """One blob of a read-set pack: parts of chunks, one after another."""

    digest: str  # blake3 of the raw segment, stored as chunks/<digest>
    size: int  # raw bytes: the sum of the parts' lengths
    parts: tuple[tuple[str, int, int], ...]  # (chunk digest, offset in the chunk, length)


@dataclass
class Profile:
    image: str
    chunks: list[tuple[str, int]]  # (digest, raw size) in first-touch order
    files: int = 0
    ready_s: float | None = None
    command: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)
    pack: list[Segment] = field(default_factory=list)
    # The names the start-up looked up (found or not) and the directories it listed, in order, as
    # (NAME_LOOKUP or NAME_LIST, absolute path in the image): replayed through the mount so that
    # the kernel's caches answer the container (imagefs.fs.warm).
    names: list[tuple[str, str]] = field(default_factory=list)
    # What was read of each chunk, as (offset, length) ranges: from the trace, the input of the
    # pack (not stored: the pack's parts say the same).
    reads: dict[str, list[tuple[int, int]]] = field(default_factory=dict, compare=False)

    def encode(self) -> bytes:
        number = {d: i for i, (d, _) in enumerate(self.chunks)}
        pack = [[s.digest, s.size, [[number[d], off, n] for d, off, n in s.parts]] for s in self.pack]
        doc = {"v": VERSION, "image": self.image, "chunks": self.chunks, "files": self.files,
               "ready_s": self.ready_s, "command": self.command, "created": self.created, "pack": pack}
        if self.names:  # (absent rather than empty: a profile without names encodes as before)
            doc["names"] = [[k, p] for k, p in self.names]
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes, digest: str) -> "Profile":
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("v") != VERSION:
                raise ValueError("not a profile document of version 1")
            chunks = [(str(d), int(n)) for d, n in doc["chunks"]]
            pack = [_decode_segment(s, chunks) for s in doc.get("pack") or ()]
            return cls(str(doc["image"]), chunks, int(doc["files"]), doc.get("ready_s"),
                       list(doc.get("command") or []), float(doc["created"]), pack,
                       _decode_names(doc.get("names") or ()))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError, OverflowError,
                RecursionError) as e:
            raise CorruptBlob(digest, f"malformed profile: {type(e).__name__}: {e}") from None

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def pack_bytes(self) -> int:
        return sum(s.size for s in self.pack)


def _decode_segment(doc: Any, chunks: list[tuple[str, int]]) -> Segment:
    digest, size, parts = doc
    if not blobs.is_digest(str(digest)):
        raise ValueError(f"bad segment digest {digest!r}")
    if any(not 0 <= int(i) < len(chunks) for i, _, _ in parts):
        raise ValueError(f"segment {digest} names a chunk the profile does not list")
    out = tuple((chunks[int(i)][0], int(off), int(n)) for i, off, n in parts)
    if any(off < 0 or n <= 0 for _, off, n in out) or sum(n for _, _, n in out) != int(size):
        raise ValueError(f"segment {digest} has bad parts")
    return Segment(str(digest), int(size), out)


def _decode_names(doc: Any) -> list[tuple[str, str]]:
    out = [(str(k), str(p)) for k, p in doc]
    if len(out) > NAMES_MAX:
        raise ValueError(f"{len(out)} names, more than {NAMES_MAX}")
    if any(k not in (NAME_LOOKUP, NAME_LIST) or not p.startswith("/") for k, p in out):
        raise ValueError("a name entry is not a lookup or listing of an absolute path")
    return out


def from_trace(image_id: str, events: Iterable[dict[str, Any]], *, until: float | None = None,
               ready_s: float | None = None, command: list[str] | None = None) -> Profile:
    """A profile from a mount's trace (imagefs.fs.mounts.read_trace), cut at `until` seconds."""
    chunks: list[tuple[str, int]] = []
    reads: dict[str, list[tuple[int, int]]] = {}
    names: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    files = 0
    for ev in events:
        if until is not None and float(ev["t"]) > until:
            break
        kind = ev["kind"]
        if kind == "file":
            files += 1
        elif kind == "chunk" and ev["chunk"] not in reads:
            chunks.append((ev["chunk"], int(ev["size"])))
            reads[ev["chunk"]] = [(int(off), int(n)) for off, n in ev.get("spans") or ()]
        elif kind in _NAME_KINDS and len(names) < NAMES_MAX:
            entry = (_NAME_KINDS[kind], str(ev["path"]))
            if entry not in seen:
                seen.add(entry)
                names.append(entry)
    return Profile(image_id, chunks, files, ready_s, command or [], reads=reads, names=names)


def build_pack(store: BlobStore, profile: Profile, segment: int = PACK_SEGMENT,
               first: int = PACK_FIRST) -> list[Segment]:
    """Copy the ranges the profile read of its chunks, in first-touch order, into segments
    stored as chunk blobs; the segments in order. Chunks come from the store, verified.
    Segments grow from first bytes, doubling, to segment bytes (each may overshoot by a part)."""
    pack: list[Segment] = []
    buf = bytearray()
    parts: list[tuple[str, int, int]] = []

    def flush() -> None:
        digest = blobs.digest_of(buf)
        if parts != [(digest, 0, len(buf))]:  # else the segment is a whole chunk, stored already
            store.put(blobs.chunk_key(digest), blobs.encode(buf, PACK_LEVEL))
        pack.append(Segment(digest, len(buf), tuple(parts)))
        buf.clear()
        parts.clear()

    for digest, data in _chunk_contents(store, [d for d, _ in profile.chunks if profile.reads.get(d)]):
        for off, n in ranges_to_pack(profile.reads[digest], len(data)):
            buf += memoryview(data)[off:off + n]
            parts.append((digest, off, n))
            if len(buf) >= min(segment, first << min(len(pack), 32)):
                flush()
    if buf:
        flush()
    return pack


def ranges_to_pack(ranges: Iterable[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """What to pack of a chunk of size bytes given the (offset, length) ranges read of it: big
    ones widened (PACK_PAD), clipped to the chunk, merged; the whole chunk if that is most of
    it (PACK_WHOLE)."""
    out = []
    for off, n in ranges:
        pad = PACK_PAD if n >= PACK_PAD_MIN else 0
        start, end = max(0, off - pad), min(size, off + n + pad)
        if end > start:
            out.append((start, end - start))
    merged = merge_spans(out)
    if merged and sum(n for _, n in merged) >= PACK_WHOLE * size:
        return [(0, size)]
    return merged


def _chunk_contents(store: BlobStore, digests: list[str]) -> Iterator[tuple[str, bytes]]:
    """(digest, verified content) in the given order, read a few at a time."""
    def fetch(d: str) -> tuple[str, bytes]:
        return d, blobs.decode(store.get(blobs.chunk_key(d)), d)

    with ThreadPoolExecutor(PACK_READERS) as pool:
        for start in range(0, len(digests), 4 * PACK_READERS):  # bounded memory
            yield from pool.map(fetch, digests[start:start + 4 * PACK_READERS])


def save(store: BlobStore, profile: Profile, ref: Ref | None, *, pack: bool = True) -> Digest:
    """Store the profile blob (after its read-set pack, when it has reads and pack is set), then
    point the tag at it (when a tag names the image). A pack that cannot be built (a chunk
    missing or corrupt) is left out with a warning: the profile is still worth having. All of it
    happens under an import lease, so that gc never sees the new segments before the profile that
    keeps them."""
    from imagefs.gc import import_lease  # gc reads profiles, so it is imported here

    with import_lease(store):
        if pack and profile.reads and not profile.pack:
            try:
                profile.pack = build_pack(store, profile)
            except (ImageFSError, OSError) as e:
                log.warning("profile saved without a read-set pack: %s", e)
                profile.pack = []
        raw = profile.encode()
        digest = blobs.digest_of(raw)
        store.put(f"profiles/{digest}", blobs.encode(raw))
        if ref is not None:
            update_tag(store, ref, profile=digest)
    return digest


class ProfileNotFound(ImageFSError):
    """The store has no profile blob by that digest."""


def load(store: BlobStore, digest: str) -> Profile:
    try:
        return Profile.decode(blobs.decode(store.get(f"profiles/{digest}"), digest), digest)
    except BlobNotFound:
        raise ProfileNotFound(f"profile {digest} is missing from the store") from None


PackPart = tuple[Digest, int, int, int]  # (chunk digest, offset in the chunk, length, offset in the segment)


def pack_to_prefetch(profile: Profile, index: ImageIndex,
                     image_id: str) -> list[tuple[Digest, int, list[PackPart]]]:
    """(segment digest, size, parts) of the pack, each part placed in its segment; parts of
    chunks this image does not have (or beyond their end) are dropped with one warning, and
    segments left with no part."""
    known = index.size_of
    out: list[tuple[Digest, int, list[PackPart]]] = []
    dropped = 0
    for seg in profile.pack:
        parts: list[PackPart] = []
        at = 0
        for d, off, n in seg.parts:
            if d in known and off + n <= known[d]:
                parts.append((Digest(d), off, n, at))
            else:
                dropped += 1
            at += n
        if parts:  # a segment with nothing of this image is not worth fetching
            out.append((Digest(seg.digest), seg.size, parts))
    if dropped:
        log.warning("profile pack names %d ranges of chunks that image %s does not have; ignoring them",
                    dropped, image_id)
    return out


def chunks_to_prefetch(profile: Profile, index: ImageIndex, image_id: str) -> list[tuple[Digest, int]]:
    """The profile's chunks that this image has; others are dropped with one warning."""
    known = index.size_of
    keep = [(Digest(d), known[d]) for d, _ in profile.chunks if d in known]
    if len(keep) < len(profile.chunks):
        log.warning("profile names %d chunks that image %s does not have; ignoring them",
                    len(profile.chunks) - len(keep), image_id)
    return keep


# -- learned on this host --------------------------------------------------------------------------
# Every mount remembers, in the host cache directory, the order in which it first touched chunks
# (its access trace, cut LEARN_WINDOW_S after the first touch); the next mount of that image on
# this host prefetches in that order when the image has no recorded profile. With the chunks in
# the host cache that prefetch is a check in place: it reads the files into the page cache in
# parallel, ahead of the reads that need them.
LEARN_WINDOW_S = 60.0


LEARNED_DIR = "learned"
LEARNED_MAX = 256  # images whose order a host remembers


def _learned(cache_dir: str) -> HostFiles:
    return HostFiles(os.path.join(cache_dir, LEARNED_DIR), LEARNED_MAX)


def learned_path(cache_dir: str, image_id: str) -> str:
    return str(_learned(cache_dir).path(image_id))


def learn(index: ImageIndex, image_id: str, events: Sequence[tuple[int, str, int, int, int]],
          window_s: float = LEARN_WINDOW_S, names: Iterable[dict[str, Any]] = ()) -> Profile:
    """A profile from a mount's raw trace events (imagefs.fs.trace.AccessTrace.events), cut
    window_s after the first of them; chunk numbers the index does not have are left out. names:
    the trace's lookups and listings as dumped (AccessTrace.dump), kept in the same window."""
    start = events[0][0] if events else 0
    docs = ({"t": (t_ns - start) / 1e9, "kind": kind, "chunk": index.chunks[chunk], "size": index.chunk_sizes[chunk]}
            if kind == "chunk" else {"t": (t_ns - start) / 1e9, "kind": kind}
            for t_ns, kind, _ino, chunk, _off in events
            if kind == "file" or (kind == "chunk" and 0 <= chunk < len(index.chunks)))
    shift = start / 1e9  # dumped times count from the trace's start, not from its first event
    named = ({**doc, "t": float(doc["t"]) - shift} for doc in names)
    merged = heapq.merge(docs, named, key=lambda doc: doc["t"])
    return from_trace(image_id, merged, until=window_s, command=["(learned on this host)"])


def save_learned(cache_dir: str, profile: Profile) -> None:
    """Write (replace) the image's learned profile atomically; errors are logged, not raised."""
    _learned(cache_dir).write(profile.image, profile.encode())


def load_learned(cache_dir: str, image_id: str) -> Profile | None:
    """The image's learned profile on this host, if there is a readable one."""
    if not blobs.is_digest(image_id):
        return None
    raw = _learned(cache_dir).read(image_id)
    if raw is None:
        return None
    try:
        prof = Profile.decode(raw, image_id)
    except CorruptBlob as e:
        log.warning("ignoring the learned profile of %s: %s", image_id, e.reason)
        return None
    return prof if prof.image == image_id else None

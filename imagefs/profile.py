"""Start-up profiles: the chunks an image's container touched until it was ready, in first-touch
order, recorded from a mount's access trace and replayed as prefetch on later mounts.

A profile is stored as its own content-addressed blob (profiles/<digest>) and linked from the
image's tag (the tag's "profile" field), so recording one never changes the image ID. Recording
again replaces the link: a profile describes one start-up, and merging start-ups of different
commands would make every mount prefetch the union of what any of them ever touched.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from imagefs import chunks as blobs
from imagefs.chunks import Digest
from imagefs.errors import BlobNotFound, CorruptBlob, ImageFSError
from imagefs.hostfiles import HostFiles
from imagefs.images import Ref, update_tag
from imagefs.index import ImageIndex
from imagefs.store.base import BlobStore

log = logging.getLogger(__name__)
VERSION = 1


@dataclass
class Profile:
    image: str
    chunks: list[tuple[str, int]]  # (digest, raw size) in first-touch order
    files: int = 0
    ready_s: float | None = None
    command: list[str] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    def encode(self) -> bytes:
        doc = {"v": VERSION, "image": self.image, "chunks": self.chunks, "files": self.files,
               "ready_s": self.ready_s, "command": self.command, "created": self.created}
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes, digest: str) -> "Profile":
        try:
            doc = json.loads(data)
            if doc.get("v") != VERSION:
                raise ValueError(f"unknown profile version {doc.get('v')}")
            return cls(str(doc["image"]), [(str(d), int(n)) for d, n in doc["chunks"]], int(doc["files"]),
                       doc.get("ready_s"), list(doc.get("command") or []), float(doc["created"]))
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptBlob(digest, f"malformed profile: {e}") from None

    @property
    def bytes(self) -> int:
        return sum(n for _, n in self.chunks)


def from_trace(image_id: str, events: Iterable[dict[str, Any]], *, until: float | None = None,
               ready_s: float | None = None, command: list[str] | None = None) -> Profile:
    """A profile from a mount's trace (imagefs.fs.mounts.read_trace), cut at `until` seconds."""
    chunks: list[tuple[str, int]] = []
    seen: set[str] = set()
    files = 0
    for ev in events:
        if until is not None and float(ev["t"]) > until:
            break
        if ev["kind"] == "file":
            files += 1
        elif ev["kind"] == "chunk" and ev["chunk"] not in seen:
            seen.add(ev["chunk"])
            chunks.append((ev["chunk"], int(ev["size"])))
    return Profile(image_id, chunks, files, ready_s, command or [])


def save(store: BlobStore, profile: Profile, ref: Ref | None) -> Digest:
    """Store the profile blob, then point the tag at it (when a tag names the image)."""
    raw = profile.encode()
    digest = blobs.digest_of(raw)
    store.put(f"profiles/{digest}", blobs.encode(raw))
    if ref is not None:
        update_tag(store, ref, profile=digest)
    return digest


def load(store: BlobStore, digest: str) -> Profile:
    try:
        return Profile.decode(blobs.decode(store.get(f"profiles/{digest}"), digest), digest)
    except BlobNotFound:
        raise ImageFSError(f"profile {digest} is missing from the store") from None


def chunks_to_prefetch(profile: Profile, index: ImageIndex, image_id: str) -> list[tuple[Digest, int]]:
    """The profile's chunks that this image has; others are dropped with one warning."""
    known = {d: n for d, n in zip(index.chunks, index.chunk_sizes)}
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
          window_s: float = LEARN_WINDOW_S) -> Profile:
    """A profile from a mount's raw trace events (imagefs.fs.trace.AccessTrace.events), cut
    window_s after the first of them; chunk numbers the index does not have are left out."""
    start = events[0][0] if events else 0
    docs = ({"t": (t_ns - start) / 1e9, "kind": kind, "chunk": index.chunks[chunk], "size": index.chunk_sizes[chunk]}
            if kind == "chunk" else {"t": (t_ns - start) / 1e9, "kind": kind}
            for t_ns, kind, _ino, chunk, _off in events if kind != "chunk" or 0 <= chunk < len(index.chunks))
    return from_trace(image_id, docs, until=window_s, command=["(learned on this host)"])


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

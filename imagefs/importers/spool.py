"""Turn a layer stream (plain, gzip or zstd tar) into an uncompressed spool file on disk.

The compression is told by the first bytes, never by a name or a media type. While the bytes pass,
the stored form is hashed and counted (an OCI blob digest and size) and so is the uncompressed tar
(a config diff_id); a mismatch, a truncated or corrupt stream is an InvalidSource. A blob that runs
past the size its descriptor gives is refused as soon as the first byte too many arrives, so it is
never spooled in full. Memory stays bounded: gzip is read through GzipFile in pieces and zstd is fed
in small slices.
"""
from __future__ import annotations

import gzip
import hashlib
import re
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Callable, Iterator

import zstandard

from imagefs.errors import InvalidSource

PIECE = 1 << 20
ZSTD_SLICE = 4096  # a zstd slice can expand ~32768x; small slices bound the memory of a bomb
_DIGEST = re.compile(r"(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})")

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_UNSUPPORTED = {b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}


def check_digest(value: object, what: str) -> str:
    """value if it is a sha256 or sha512 digest in canonical form, else InvalidSource."""
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise InvalidSource(f"{what}: invalid digest {str(value)[:200]!r}")
    return value


def hasher(digest: str) -> "hashlib._Hash":
    return hashlib.new(digest.partition(":")[0])


@dataclass(frozen=True)
class Expect:
    """What a layer must hash to: its stored bytes (OCI descriptor) and its uncompressed tar."""

    digest: str | None = None
    size: int | None = None
    diff_id: str | None = None


class _Tap:
    """A read-only stream that hashes and counts the bytes that pass, with a peek for magic bytes."""

    def __init__(self, raw: BinaryIO, what: str, expect: Expect) -> None:
        self.raw = raw
        self.what = what
        self.limit = expect.size
        self.hash = hasher(expect.digest) if expect.digest else None
        self.count = 0
        self._head = b""

    def peek(self, n: int) -> bytes:
        while len(self._head) < n:
            more = self._pull(n - len(self._head))
            if not more:
                break
            self._head += more
        return self._head[:n]

    def read(self, n: int = -1) -> bytes:
        if self._head:
            out, self._head = (self._head, b"") if n < 0 else (self._head[:n], self._head[n:])
            return out
        return self._pull(PIECE if n < 0 else n)

    def _pull(self, n: int) -> bytes:
        if self.limit is not None:
            n = min(n, max(self.limit - self.count + 1, 1))  # one byte past the limit tells an oversize blob
        data = self.raw.read(n)
        if self.limit is not None and self.count + len(data) > self.limit:
            raise InvalidSource(f"{self.what}: blob is larger than its descriptor's {self.limit} bytes")
        if self.hash is not None:
            self.hash.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(PIECE):
            pass


def _plain(src: _Tap) -> Iterator[bytes]:
    while piece := src.read(PIECE):
        yield piece


def _gunzip(src: _Tap) -> Iterator[bytes]:
    with gzip.GzipFile(fileobj=src, mode="rb") as g:  # type: ignore[arg-type]
        while piece := g.read(PIECE):
            yield piece


def _unzstd(src: _Tap) -> Iterator[bytes]:
    """Every frame in turn; input that ends inside a frame is truncated."""
    dctx = zstandard.ZstdDecompressor()
    obj, inside = dctx.decompressobj(), False
    while data := src.read(ZSTD_SLICE):
        while data:
            inside = True
            if out := obj.decompress(data):
                yield out
            data = b""
            if obj.eof:
                data, obj, inside = obj.unused_data, dctx.decompressobj(), False
    if inside:
        raise EOFError("zstd stream ends inside a frame")


Decoder = Callable[[_Tap], Iterator[bytes]]


def _decoder(src: _Tap, what: str) -> tuple[str, Decoder]:
    head = src.peek(6)
    if head.startswith(GZIP_MAGIC):
        return "gzip", _gunzip
    if head.startswith(ZSTD_MAGIC):
        return "zstd", _unzstd
    for magic, name in _UNSUPPORTED.items():
        if head.startswith(magic):
            raise InvalidSource(f"{what}: {name}-compressed layers are not supported")
    return "tar", _plain


def spool(stream: BinaryIO, dest: str, what: str, expect: Expect = Expect()) -> None:
    """Write the uncompressed tar of stream to dest, checking it against expect."""
    tap = _Tap(stream, what, expect)
    tar_hash = hasher(expect.diff_id) if expect.diff_id else None
    kind, decode = _decoder(tap, what)
    try:
        with open(dest, "wb") as out:
            for piece in decode(tap):
                out.write(piece)
                if tar_hash is not None:
                    tar_hash.update(piece)
        tap.drain()
    except (gzip.BadGzipFile, EOFError, zlib.error, zstandard.ZstdError) as e:
        raise InvalidSource(f"{what}: corrupt or truncated {kind} stream: {e}") from None
    except OSError as e:
        raise InvalidSource(f"{what}: cannot read or spool the layer: {e.strerror or e}") from e
    _verify(tap, tar_hash, what, expect)


def _verify(tap: _Tap, tar_hash: "hashlib._Hash | None", what: str, expect: Expect) -> None:
    if tap.hash is not None and expect.digest is not None:
        got = f"{tap.hash.name}:{tap.hash.hexdigest()}"
        if got != expect.digest:
            raise InvalidSource(f"{what}: digest mismatch: blob {expect.digest} hashes to {got}")
    if expect.size is not None and tap.count != expect.size:
        raise InvalidSource(f"{what}: blob is {tap.count} bytes, its descriptor says {expect.size}")
    if tar_hash is not None and expect.diff_id is not None:
        got = f"{tar_hash.name}:{tar_hash.hexdigest()}"
        if got != expect.diff_id:
            raise InvalidSource(f"{what}: uncompressed layer hashes to {got}, config diff_id is {expect.diff_id}")

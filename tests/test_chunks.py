"""The self-describing blob codec: round trips, raw fallback, and every corruption is caught."""
import os

import pytest

from imagefs import chunks as blobs
from imagefs.errors import CorruptBlob


def test_round_trip_compressible():
    data = b"hello world " * 10000
    d = blobs.digest_of(data)
    blob = blobs.encode(data)
    assert len(blob) < len(data) // 10
    assert blob[:4] == b"CSB1" and blob[5] == blobs.CODEC_ZSTD
    assert blobs.decode(blob, d) == data


def test_incompressible_is_stored_raw():
    data = os.urandom(100_000)
    blob = blobs.encode(data)
    assert blob[5] == blobs.CODEC_RAW
    assert len(blob) == len(data) + blobs.HEADER.size
    assert blobs.decode(blob, blobs.digest_of(data)) == data
    got = blobs.decode(blob, blobs.digest_of(data))
    assert type(got) is bytes


def test_decode_view_of_a_raw_blob_is_its_payload_not_a_copy():
    data = os.urandom(100_000)
    blob = blobs.encode(data)
    view = blobs.decode_view(blob, blobs.digest_of(data))
    assert isinstance(view, memoryview) and view.obj is blob and view == data
    packed = b"compressible " * 1000
    assert type(blobs.decode_view(blobs.encode(packed), blobs.digest_of(packed))) is bytes
    corrupt = blob[:-1] + bytes([blob[-1] ^ 1])  # a raw payload is still verified
    with pytest.raises(CorruptBlob, match="blake3"):
        blobs.decode_view(corrupt, blobs.digest_of(data))


def test_empty_chunk():
    assert blobs.decode(blobs.encode(b""), blobs.digest_of(b"")) == b""


@pytest.mark.parametrize("mangle,reason", [
    (lambda b: b[:10], "shorter than its header"),
    (lambda b: b"XXXX" + b[4:], "bad magic"),
    (lambda b: b[:4] + b"\x09" + b[5:], "unknown format version"),
    (lambda b: b[:5] + b"\x07" + b[6:], "unknown codec"),
    (lambda b: b[:-1], "payload is"),
    (lambda b: b[:-1] + bytes([b[-1] ^ 1]), ""),
])
def test_corruption_is_detected(mangle, reason):
    data = b"some chunk content " * 500
    d = blobs.digest_of(data)
    with pytest.raises(CorruptBlob) as ei:
        blobs.decode(mangle(blobs.encode(data)), d)
    assert ei.value.digest == d
    assert reason in str(ei.value)


def test_wrong_name_is_detected():
    blob = blobs.encode(b"abc")
    other = blobs.digest_of(b"abd")
    with pytest.raises(CorruptBlob, match="does not match its blake3"):
        blobs.decode(blob, other)


def test_digest_is_blake3_hex():
    d = blobs.digest_of(b"")
    assert d == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    assert blobs.is_digest(d) and not blobs.is_digest(d.upper()) and not blobs.is_digest(d[:-1])

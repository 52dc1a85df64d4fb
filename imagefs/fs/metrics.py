"""Counts and latency histograms of filesystem operations, cheap enough to keep on.

Latencies go into log-scale buckets (four per power of two, so within about 19 %); percentiles
are read from the buckets when stats are asked for.
"""
from __future__ import annotations

from typing import Any

_SUB_BITS = 2  # four buckets per power of two
_PERCENTILES = (50, 90, 99, 99.9)


def _bucket(ns: int) -> int:
    if ns <= 0:
        return 0
    bits = ns.bit_length()
    if bits <= _SUB_BITS + 1:
        return ns
    sub = (ns >> (bits - 1 - _SUB_BITS)) & ((1 << _SUB_BITS) - 1)
    return (bits << _SUB_BITS) + sub


def _bucket_upper(b: int) -> int:
    """The largest latency in nanoseconds that falls into bucket b."""
    if b < (_SUB_BITS + 2) << _SUB_BITS:
        return b
    bits, sub = b >> _SUB_BITS, b & ((1 << _SUB_BITS) - 1)
    low = (1 << (bits - 1)) + (sub << (bits - 1 - _SUB_BITS))
    return low + (1 << (bits - 1 - _SUB_BITS)) - 1


class OpStats:
    __slots__ = ("count", "errors", "total_ns", "max_ns", "buckets")

    def __init__(self) -> None:
        self.count = 0
        self.errors = 0
        self.total_ns = 0
        self.max_ns = 0
        self.buckets: dict[int, int] = {}

    def add(self, ns: int, failed: bool) -> None:
        self.count += 1
        self.errors += failed
        self.total_ns += ns
        if ns > self.max_ns:
            self.max_ns = ns
        b = _bucket(ns)
        self.buckets[b] = self.buckets.get(b, 0) + 1

    def percentile_us(self, p: float) -> float:
        want = self.count * p / 100
        seen = 0
        for b in sorted(self.buckets):
            seen += self.buckets[b]
            if seen >= want:
                return min(_bucket_upper(b), self.max_ns) / 1000
        return self.max_ns / 1000

    def as_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"count": self.count, "errors": self.errors,
                               "mean_us": round(self.total_ns / self.count / 1000, 1) if self.count else 0,
                               "max_us": round(self.max_ns / 1000, 1),
                               "total_ms": round(self.total_ns / 1e6, 3)}
        for p in _PERCENTILES:
            doc[f"p{p:g}_us"] = round(self.percentile_us(p), 1) if self.count else 0
        return doc


class OpMetrics:
    """Per-operation statistics of one mount."""

    def __init__(self) -> None:
        self.ops: dict[str, OpStats] = {}
        self.read_bytes = 0
        self.pushed_files = 0  # small files put into the page cache on open (no read needed)
        self.pushed_bytes = 0

    def record(self, op: str, ns: int, failed: bool = False) -> None:
        stats = self.ops.get(op)
        if stats is None:
            stats = self.ops[op] = OpStats()
        stats.add(ns, failed)

    def as_dict(self) -> dict[str, Any]:
        return {"read_bytes": self.read_bytes, "pushed_files": self.pushed_files,
                "pushed_bytes": self.pushed_bytes,
                "ops": {name: s.as_dict() for name, s in sorted(self.ops.items())}}

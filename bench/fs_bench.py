"""FUSE hot-path benchmark: `import torch` natively and on a lazy mount, and 1 GiB sequential reads.

Run as root: ``python -m bench.fs_bench [--repeat N] [--only torch|read] [--out FILE]``.

Workload modes, interleaved within each repeat so that the ratios compare the same moments of a
noisy machine (medians over the repeats):
  native_cold     chroot of the rootfs directory, page cache dropped
  native_warm     the same again, page cache kept
  lazy_cold       fresh mount, empty host cache, page cache dropped
  lazy_second     a second run on that same mount (kernel caches kept)
  lazy_warm_host  fresh mount, host cache full, page cache dropped
Read modes (a 1 GiB random file in an image of its own): native file from disk, lazy with an
empty host cache, lazy from the host cache with its files in the page cache ("hot") and dropped
("disk"). Everything lives under --work; mounts use a private run directory and are always
unmounted, also on errors. Per-mode FUSE op counts and in-daemon latencies come from the daemon.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from contextlib import contextmanager

from bench.util import drop_page_cache, machine, median, write_json

ROOTFS = Path("/var/cache/coldstart-bench/torch")
CODE = "import torch"
BIG_SIZE = 1 << 30
READ_BUF = 1 << 20
TARGETS = {"lazy_cold": ("native_cold", 1.3), "lazy_warm_host": ("native_cold", 1.15),
           "lazy_second": ("native_warm", 1.1)}
TORCH_MODES = ["native_cold", "native_warm", "lazy_cold", "lazy_second", "lazy_warm_host"]
READ_MODES = ["read_native_disk", "read_lazy_cold", "read_host_hot", "read_host_disk"]


class Bench:
    """Paths and helpers of one benchmark run."""

    def __init__(self, work: Path, rootfs: Path, code: str) -> None:
        self.work = work
        self.rootfs = rootfs
        self.code = code
        self.store_url = f"file://{work / 'store'}"
        self.cache = work / "cache"
        self.mnt = work / "mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)
        os.environ["COLDSTART_RUN_DIR"] = str(work / "run")  # never meet other people's mounts

    # -- images ----------------------------------------------------------------------------------
    def ensure_image(self, src: Path, ref: str) -> None:
        from imagefs.images import resolve
        from imagefs.store.factory import open_store
        store = open_store(self.store_url)
        try:
            resolve(store, ref)
            return
        except Exception:
            pass
        finally:
            store.close()
        subprocess.run([sys.executable, "-m", "tools.cli", "import", str(src), ref, "--store",
                        self.store_url], check=True, stdout=subprocess.DEVNULL)

    def big_file_dir(self) -> Path:
        src = self.work / "big"
        path = src / "big.bin"
        if not path.exists() or path.stat().st_size != BIG_SIZE:
            src.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                for _ in range(BIG_SIZE // (16 << 20)):
                    f.write(os.urandom(16 << 20))
        return src

    # -- mounts ----------------------------------------------------------------------------------
    def clear_host_cache(self) -> None:
        shutil.rmtree(self.cache, ignore_errors=True)

    @contextmanager
    def mounted(self, ref: str) -> Iterator[Path]:
        from imagefs.fs.mounts import mount_image
        try:
            mount_image(self.store_url, ref, self.mnt, cache_dir=self.cache)
            yield self.mnt
        finally:
            self.unmount()

    def unmount(self) -> None:
        from imagefs.fs.mounts import is_mounted, unmount
        mp = str(self.mnt)
        try:
            if is_mounted(mp):
                unmount(mp)
        except Exception as e:
            print(f"unmount {mp}: {e}; detaching", file=sys.stderr)
        if is_mounted(mp):
            subprocess.run(["umount", "-l", mp], check=False)

    def stats(self) -> dict[str, Any]:
        from imagefs.fs.mounts import read_stats
        return read_stats(self.mnt)

    # -- workloads -------------------------------------------------------------------------------
    def run_code(self, root: Path) -> float:
        """Seconds the code takes in a chroot of root, with the host's /dev bound in."""
        script = f"mount --bind /dev {root}/dev && exec chroot {root} python3 -W ignore -c '{self.code}'"
        t = time.perf_counter()
        res = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                             capture_output=True, text=True)
        secs = time.perf_counter() - t
        if res.returncode != 0:
            raise RuntimeError(f"{self.code!r} in {root} failed: {res.stderr.strip()[-500:]}")
        return secs


def read_file(path: Path) -> float:
    """MB/s of one sequential read of the whole file with 1 MiB reads."""
    buf = bytearray(READ_BUF)
    total = 0
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total / 1e6 / (time.perf_counter() - t)


def op_counts(stats: dict[str, Any], before: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per-op count and in-daemon mean latency (µs); counts minus those of `before`."""
    ops = stats["fuse"]["ops"]
    prev = before["fuse"]["ops"] if before else {}
    out: dict[str, Any] = {}
    for name, s in ops.items():
        n = s["count"] - prev.get(name, {}).get("count", 0)
        if n:
            total_us = s["mean_us"] * s["count"] - prev.get(name, {}).get("mean_us", 0) * (s["count"] - n)
            out[name] = {"count": n, "mean_us": round(total_us / n, 1), "p99_us": s["p99_us"]}
    return out


# -- one repeat of each group ----------------------------------------------------------------------
def torch_round(b: Bench, rec: Callable[[str, float, dict[str, Any] | None], None]) -> None:
    drop_page_cache()
    rec("native_cold", b.run_code(b.rootfs), None)
    rec("native_warm", b.run_code(b.rootfs), None)
    b.clear_host_cache()
    with b.mounted("torch:1") as mnt:
        drop_page_cache()
        secs = b.run_code(mnt)
        first = b.stats()
        rec("lazy_cold", secs, op_counts(first))
        secs = b.run_code(mnt)
        rec("lazy_second", secs, op_counts(b.stats(), first))
    with b.mounted("torch:1") as mnt:
        drop_page_cache()
        secs = b.run_code(mnt)
        rec("lazy_warm_host", secs, op_counts(b.stats()))


def read_round(b: Bench, big_src: Path, rec: Callable[[str, float, dict[str, Any] | None], None]) -> None:
    drop_page_cache()
    rec("read_native_disk", read_file(big_src / "big.bin"), None)
    b.clear_host_cache()
    with b.mounted("big:1") as mnt:
        drop_page_cache()
        rec("read_lazy_cold", read_file(mnt / "big.bin"), op_counts(b.stats()))
    with b.mounted("big:1") as mnt:  # the host cache files are still in the page cache
        rec("read_host_hot", read_file(mnt / "big.bin"), op_counts(b.stats()))
    with b.mounted("big:1") as mnt:
        drop_page_cache()
        rec("read_host_disk", read_file(mnt / "big.bin"), op_counts(b.stats()))


# -- report ----------------------------------------------------------------------------------------
def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    modes = [m for m in TORCH_MODES + READ_MODES if any(r["mode"] == m for r in records)]
    rows = {}
    for m in modes:
        vals = [r["value"] for r in records if r["mode"] == m]
        last_ops = [r["ops"] for r in records if r["mode"] == m and r["ops"]]
        rows[m] = {"median": median(vals), "min": min(vals), "max": max(vals), "runs": len(vals),
                   "unit": "MB/s" if m.startswith("read") else "s", "ops": last_ops[-1] if last_ops else {}}
    ratios = {m: {"vs": base, "ratio": rows[m]["median"] / rows[base]["median"], "target": t}
              for m, (base, t) in TARGETS.items() if m in rows and base in rows}
    return {"modes": rows, "ratios": ratios}


def table(summary: dict[str, Any]) -> str:
    lines = [f"{'mode':<18}{'median':>10}{'min':>10}{'max':>10}  unit  runs"]
    for m, r in summary["modes"].items():
        lines.append(f"{m:<18}{r['median']:>10.2f}{r['min']:>10.2f}{r['max']:>10.2f}  {r['unit']:<5} {r['runs']}")
    lines.append("")
    for m, r in summary["ratios"].items():
        ok = "ok" if r["ratio"] <= r["target"] else "MISS"
        lines.append(f"{m} / {r['vs']}: {r['ratio']:.2f}x (target <= {r['target']}x) {ok}")
    lines.append("")
    lines.append(ops_table(summary["modes"]))
    return "\n".join(lines)


def ops_table(rows: dict[str, Any]) -> str:
    with_ops = {m: r["ops"] for m, r in rows.items() if r["ops"]}
    names = sorted({op for ops in with_ops.values() for op in ops})
    lines = [f"{'op counts (mean µs)':<20}" + "".join(f"{m:>22}" for m in with_ops)]
    for op in names:
        cells = []
        for ops in with_ops.values():
            s = ops.get(op)
            cells.append(f"{s['count']:>12} ({s['mean_us']:>6.1f})" if s else f"{'-':>22}")
        lines.append(f"{op:<20}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fs_bench", description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", choices=["torch", "read"], help="run one group only")
    p.add_argument("--rootfs", type=Path, default=ROOTFS)
    p.add_argument("--code", default=CODE, help="Python code to time in the chroot")
    p.add_argument("--work", type=Path, default=Path("/var/tmp/fs_bench"), help="store, cache, mounts")
    p.add_argument("--out", type=Path, help="JSON results (default WORK/result.json)")
    args = p.parse_args(argv)
    b = Bench(args.work, args.rootfs, args.code)
    records: list[dict[str, Any]] = []

    def rec(mode: str, value: float, ops: dict[str, Any] | None) -> None:
        records.append({"mode": mode, "value": value, "ops": ops or {}})
        print(f"  {mode:<18} {value:8.2f}", file=sys.stderr, flush=True)

    big_src = None
    if args.only != "read":
        b.ensure_image(args.rootfs, "torch:1")
    if args.only != "torch":
        big_src = b.big_file_dir()
        b.ensure_image(big_src, "big:1")
    try:
        for i in range(args.repeat):
            print(f"repeat {i + 1}/{args.repeat}", file=sys.stderr, flush=True)
            if args.only != "read":
                torch_round(b, rec)
            if big_src is not None:
                read_round(b, big_src, rec)
    finally:
        b.unmount()
    summary = summarise(records)
    doc = {"machine": machine(), "code": args.code, "repeat": args.repeat, "records": records, **summary}
    write_json(args.out or args.work / "result.json", doc)
    print(table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

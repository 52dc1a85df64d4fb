"""coldstart bench: the cold-start benchmark suite."""
from __future__ import annotations

import argparse
from pathlib import Path

from bench.workloads import SUITES, WORKLOADS
from tools.common import positive_int


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="cold-start benchmark: coldstart vs pull-and-unpack vs native")
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--workload", action="append", choices=sorted(WORKLOADS), help="(repeatable)")
    p.add_argument("--mode", action="append", choices=["native", "pull", "cold", "warm", "prefetch", "guess", "containerd"],
                   help="(repeatable)")
    p.add_argument("--store", metavar="URL", help="benchmark store (default: a SeaweedFS S3 server it starts)")
    p.add_argument("--network", choices=["loopback", "zonal", "regional"], default="loopback")
    p.add_argument("--repeat", type=positive_int)
    p.add_argument("--out", type=Path, default=Path("bench-out"))
    p.add_argument("--prefetch-workers", type=positive_int, help="parallel prefetch fetches per mount (default: the fetcher's)")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.suite import plan_from, run_suite

    plan = plan_from(args.suite, args.workload, args.mode, args.repeat, args.network, args.out, args.store)
    plan.prefetch_workers = args.prefetch_workers
    doc = run_suite(plan)
    failed = sum(1 for r in doc["runs"] if not r["ok"])
    print(f"report: {args.out}/bench.md, {args.out}/bench.json, {args.out}/phases.png, {args.out}/ready_vs_size.png")
    return 1 if failed else 0

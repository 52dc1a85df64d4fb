"""coldstart run: a container of a stored image, on a shared lazy mount, with runc."""
from __future__ import annotations

import argparse
import sys

from runner.imagefs_lower import imagefs_provider
from runner.options import add_run_arguments, options_from_args
from runner.run import run


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="run a container of an image (NAME:TAG [-- CMD ARGS...])")
    add_run_arguments(p)
    p.add_argument("--record-profile", action="store_true",
                   help="run on a fresh private mount and store what the container read until ready "
                        "(or exit) as the tag's start-up profile")
    p.add_argument("--no-prefetch", action="store_true", help="prefetch nothing (neither the image's start-up profile nor the working set guessed from the command)")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    if args.record_profile:
        from runner.profiling import record

        rec = record(options, stop_at_ready=False)
        print(f"coldstart: recorded profile {rec.digest[:16]}: {len(rec.profile.chunks)} chunks", file=sys.stderr)
        return rec.result.exit_code
    provider = imagefs_provider(options.state_dir, options.store, options.cache, prefetch=not args.no_prefetch)
    return run(options, provider).exit_code

"""coldstart run: a container of a stored image, on a shared lazy mount, with runc."""
from __future__ import annotations

import argparse

from runner.imagefs_lower import imagefs_provider
from runner.options import add_run_arguments, options_from_args
from runner.run import run


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="run a container of an image (NAME:TAG [-- CMD ARGS...])")
    add_run_arguments(p)
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    options = options_from_args(args)
    provider = imagefs_provider(options.state_dir, options.store, options.cache)
    return run(options, provider).exit_code

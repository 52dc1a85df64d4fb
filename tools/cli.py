"""The `coldstart` command line. Each command group lives in its own module with a register()."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from imagefs.errors import ImageFSError
from runner.errors import RunnerError

# Modules that add sub-commands; each has register(subparsers) and sets args.func.
COMMAND_MODULES = [
    "tools.cmd_images",
    "tools.cmd_mount",
    "tools.cmd_run",
    "tools.cmd_build",
    "tools.cmd_bench",
    "tools.cmd_profile",
    "tools.cmd_oci",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coldstart", description="Fast-cold-start containers and lazy images.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _exit_code(exc: BaseException) -> int:
    """The one place where errors become exit codes."""
    return int(getattr(exc, "exit_code", 1))


def _mounts_soon(argv: list[str]) -> bool:
    """Whether this command line is a command that starts a mount daemon (run, mount)."""
    ours = argv[:argv.index("--")] if "--" in argv else argv  # what follows is the container's
    words = [a for a in ours if not a.startswith("-")]
    return bool(words) and words[0] in ("run", "mount") and not {"-h", "--help", "--foreground"} & set(ours)


def main(argv: list[str] | None = None) -> int:
    if _mounts_soon(sys.argv[1:] if argv is None else argv):
        from imagefs.fs.mounts import prefork

        prefork()  # the daemon-to-be imports its FUSE stack while this process goes on
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="coldstart: %(levelname)s %(name)s: %(message)s")
    try:
        rc = args.func(args)
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("coldstart: interrupted", file=sys.stderr)
        return 130
    except (ImageFSError, RunnerError) as e:
        print(f"coldstart: error: {e}", file=sys.stderr)
        return _exit_code(e)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

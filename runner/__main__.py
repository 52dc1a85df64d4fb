"""Development harness: `python -m runner --lower-dir ROOTFS [run options] NAME:TAG [-- CMD ...]`.

Runs a plain directory as the image (the real CLI, tools/cli.py, plugs in the image store instead).
With --shared-bind the directory is bind-mounted once per host through SharedMounts, standing in for
the FUSE mount; --mount-log records each start/stop of that shared mount.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from runner.config import ImageConfig
from runner.errors import RunnerError
from runner.lower import DirectoryProvider, LowerProvider, ResolvedImage, SharedMountProvider, directory_image_id
from runner.mounts import bind_mount, unmount
from runner.options import add_run_arguments, options_from_args
from runner.run import run
from runner.shared_mount import SharedMounts


def _provider(args: argparse.Namespace) -> LowerProvider:
    config = ImageConfig.from_wire(json.loads(args.image_config.read_text())) if args.image_config else ImageConfig()
    root: Path = args.lower_dir
    if not args.shared_bind:
        return DirectoryProvider(root, config)
    log: Path | None = args.mount_log

    def record(event: str, key: str) -> None:
        if log is not None:
            with log.open("a") as f:
                f.write(f"{event} {key}\n")

    def start(key: str, mnt: Path) -> None:
        bind_mount(root, mnt, readonly=True)
        record("start", key)

    def stop(key: str, mnt: Path) -> None:
        unmount(mnt)
        record("stop", key)

    mounts = SharedMounts(args.state_dir / "mounts", start, stop)
    return SharedMountProvider(lambda ref: ResolvedImage(ref, directory_image_id(root), config), mounts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runner")
    parser.add_argument("--lower-dir", type=Path, required=True, help="directory used as the image root")
    parser.add_argument("--image-config", type=Path, help="JSON: an OCI image config's `config` object")
    parser.add_argument("--shared-bind", action="store_true", help="share one bind mount per host")
    parser.add_argument("--mount-log", type=Path, help=argparse.SUPPRESS)
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(options_from_args(args), _provider(args)).exit_code
    except RunnerError as exc:
        print(f"coldstart: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())

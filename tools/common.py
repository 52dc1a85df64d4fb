"""Helpers every command shares: the --store and --json options, output, progress bars."""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from imagefs.store.base import BlobStore
from imagefs.store.factory import open_store


def add_store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="URL", help="file:///DIR or s3://BUCKET/PREFIX?endpoint=URL "
                   "(default: $COLDSTART_STORE, else a local directory)")


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output, no progress bars")


def store_from(args: argparse.Namespace) -> BlobStore:
    return open_store(getattr(args, "store", None))


def emit(args: argparse.Namespace, doc: Any, human: Callable[[], None]) -> None:
    """Print doc as JSON under --json, else call human()."""
    if getattr(args, "json", False):
        json.dump(doc, sys.stdout, indent=2, sort_keys=True, default=str)
        sys.stdout.write("\n")
    else:
        human()


@contextmanager
def progress_bar(args: argparse.Namespace, label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A rich progress bar on a terminal; a no-op under --json or when stderr is not a terminal."""
    if getattr(args, "json", False) or not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    with Progress(TextColumn(label), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), transient=True) as prog:
        task = prog.add_task(label, total=total)
        yield lambda n: prog.advance(task, n)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def positive_int(text: str) -> int:
    """An argparse type: a whole number > 0 (a usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {value}")
    return value


def size_arg(text: str) -> int:
    """An argparse type: a size such as 512M or 10G (a usage error otherwise)."""
    from imagefs.fs.cache import parse_size
    from imagefs.errors import ImageFSError

    try:
        return parse_size(text)
    except ImageFSError as e:
        raise argparse.ArgumentTypeError(str(e)) from None

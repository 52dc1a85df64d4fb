"""coldstart build: build the images a Python spec defines, step by step, with a store-wide cache."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from imagefs import images
from imagefs.builder.build import Builder, BuildOptions, StepEvent
from imagefs.builder.load import load_spec
from imagefs.builder.spec import SpecError
from imagefs.gc import import_lease
from tools.common import add_json_arg, add_store_arg, emit, human_bytes, store_from


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("build", help="build images from a Python spec (SPEC.py[::NAME])")
    p.add_argument("spec", metavar="SPEC.py[::NAME]")
    p.add_argument("--tag", metavar="NAME:TAG",
                   help="tag for the image; with several images each is tagged NAME-VAR:TAG (default VAR:latest)")
    p.add_argument("--force", action="store_true", help="rebuild every step, ignoring the cache")
    p.add_argument("--ca-bundle", type=Path, default=os.environ.get("COLDSTART_CA_BUNDLE") or None,
                   help="CA bundle for apt/pip inside steps (default: $COLDSTART_CA_BUNDLE)")
    p.add_argument("--cache", help="host chunk cache directory for the steps' mounts")
    p.add_argument("--profile", action="store_true",
                   help="after building, run each image's command and record its start-up profile")
    p.add_argument("--profile-ready-regex", metavar="REGEX",
                   help="with --profile: the image is ready (and stopped) at the first matching line")
    add_store_arg(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_build)


def _tags(names: list[str], tag: str | None) -> dict[str, images.Ref]:
    if tag is None:
        return {n: images.parse_ref(f"{n.lower().replace('_', '-')}:latest") for n in names}
    ref = images.parse_ref(tag)
    if len(names) == 1:
        return {names[0]: ref}
    return {n: images.parse_ref(f"{ref.name}-{n.lower().replace('_', '-')}:{ref.tag}") for n in names}


def _printer(args: argparse.Namespace) -> Any:
    def on_event(kind: str, ev: StepEvent) -> None:
        if args.json:
            return
        if kind == "start":
            print(f"[{ev.index}/{ev.total - 1}] {ev.step}", file=sys.stderr, flush=True)
        elif ev.cached:
            print(f"      cached -> {ev.image[:16]}", file=sys.stderr, flush=True)
        else:
            print(f"      done in {ev.seconds:.2f} s -> {ev.image[:16]}", file=sys.stderr, flush=True)
    return on_event


def _log(args: argparse.Namespace) -> Any:
    if args.json:
        return lambda data: None

    def write(data: bytes) -> None:
        sys.stderr.buffer.write(data)
        sys.stderr.flush()
    return write


def cmd_build(args: argparse.Namespace) -> int:
    specs = load_spec(args.spec)
    tags = _tags(sorted(specs), args.tag)
    if args.ca_bundle is not None and not args.ca_bundle.is_file():
        raise SpecError(f"--ca-bundle {args.ca_bundle} does not exist or is not a file")
    store = store_from(args)
    executor = _executor(args)
    opts = BuildOptions(force=args.force, ca_bundle=args.ca_bundle, on_event=_printer(args), log=_log(args))
    built: dict[str, Any] = {}
    try:
        with import_lease(store):
            for name in sorted(specs):
                res = Builder(store, executor, opts).build(specs[name])
                built[name] = res
            for name, res in built.items():  # tags move only once every image built
                images.set_tag(store, tags[name], res.image)
    finally:
        if executor is not None:
            executor.close()
    doc = {name: {"ref": str(tags[name]), "image": r.image, "uploaded_bytes": r.uploaded_bytes,
                  "steps": [vars(s) for s in r.steps]} for name, r in built.items()}
    if args.profile:
        for name in built:
            doc[name]["profile"] = _record_profile(args, str(tags[name]))
    emit(args, doc, lambda: [print(f"{tags[n]} -> {r.image}  (uploaded {human_bytes(r.uploaded_bytes)}, "
                                   f"{sum(s.cached for s in r.steps)}/{len(r.steps)} steps cached)")
                             for n, r in built.items()])
    return 0


def _record_profile(args: argparse.Namespace, ref: str) -> dict[str, Any]:
    """Run the image's own command on a fresh mount; its reads until ready become the profile."""
    from runner.options import RunOptions
    from runner.profiling import record
    from runner.stream import fd_sink

    out = (lambda data: None) if args.json else fd_sink(2)
    opts = RunOptions(image=ref, ready_regex=args.profile_ready_regex, store=args.store, cache=args.cache)
    rec = record(opts, stop_at_ready=args.profile_ready_regex is not None, stdout=out, stderr=out)
    if not args.json:
        print(f"{ref}: profile {rec.digest[:16]}, {len(rec.profile.chunks)} chunks "
              f"({human_bytes(rec.profile.bytes)})", file=sys.stderr)
    return {"digest": rec.digest, "chunks": len(rec.profile.chunks), "bytes": rec.profile.bytes,
            "exit_code": rec.result.exit_code}


def _executor(args: argparse.Namespace) -> Any:
    from runner.step_executor import RunnerExecutor

    return RunnerExecutor(args.store, args.cache)

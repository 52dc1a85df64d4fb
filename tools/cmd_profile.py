"""coldstart profile: record and show start-up profiles (the prefetch working set of an image)."""
from __future__ import annotations

import argparse

from imagefs import images
from imagefs import profile as profiles
from runner.options import add_run_arguments, options_from_args
from tools.common import add_json_arg, add_store_arg, emit, human_bytes, store_from


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("profile", help="record or show an image's start-up profile (for prefetch)")
    psub = p.add_subparsers(dest="profile_command", required=True, metavar="ACTION")
    r = psub.add_parser("record", help="run the image on a fresh mount; keep what it read until ready")
    r.add_argument("--json", action="store_true", help="machine-readable output")
    add_run_arguments(r)
    r.set_defaults(func=cmd_record)
    s = psub.add_parser("show", help="the profile linked from a tag")
    s.add_argument("ref", metavar="NAME:TAG")
    add_store_arg(s)
    add_json_arg(s)
    s.set_defaults(func=cmd_show)


def summary(prof: profiles.Profile, digest: str) -> dict[str, object]:
    return {"profile": digest, "image": prof.image, "chunks": len(prof.chunks), "bytes": prof.bytes,
            "files": prof.files, "ready_s": prof.ready_s, "command": prof.command,
            "pack_segments": len(prof.pack), "pack_bytes": prof.pack_bytes, "names": len(prof.names)}


def _pack_words(prof: profiles.Profile) -> str:
    if not prof.pack:
        return "no read-set pack"
    return f"read-set pack {human_bytes(prof.pack_bytes)} in {len(prof.pack)} segments"


def cmd_record(args: argparse.Namespace) -> int:
    from runner.profiling import record

    from runner.stream import fd_sink

    options = options_from_args(args)
    out = fd_sink(2) if args.json else None  # keep stdout for the JSON document
    rec = record(options, stop_at_ready=options.ready_regex is not None, stdout=out)
    doc = summary(rec.profile, rec.digest)
    emit(args, doc, lambda: print(f"profile {rec.digest[:16]} for {options.image}: {len(rec.profile.chunks)} chunks, "
                                  f"{human_bytes(rec.profile.bytes)}, {rec.profile.files} files, "
                                  f"{len(rec.profile.names)} names, {_pack_words(rec.profile)}"))
    return 0 if rec.result.ready or rec.result.exit_code == 0 else rec.result.exit_code


def cmd_show(args: argparse.Namespace) -> int:
    store = store_from(args)
    digest = images.tag_profile(store, args.ref)
    if not digest:
        images.read_tag(store, images.parse_ref(args.ref))  # a clear error if the tag is missing
        emit(args, {"ref": args.ref, "profile": None}, lambda: print(f"{args.ref} has no profile"))
        return 1
    prof = profiles.load(store, digest)
    doc = {**summary(prof, digest), "chunk_list": prof.chunks}
    emit(args, doc, lambda: print(f"profile {digest[:16]}: {len(prof.chunks)} chunks, {human_bytes(prof.bytes)}, "
                                  f"{prof.files} files, {len(prof.names)} names, {_pack_words(prof)}, recorded from "
                                  f"{' '.join(prof.command) or 'the image command'}"))
    return 0

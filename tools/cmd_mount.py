"""Mount commands: mount, umount, stats."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from imagefs.fs import mounts
from imagefs.fs.errors import MountError
from tools.common import add_json_arg, add_store_arg, emit, human_bytes, size_arg


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("mount", help="mount an image read-only (lazily fetched) at a directory")
    p.add_argument("ref", metavar="NAME:TAG|ID")
    p.add_argument("mountpoint")
    add_store_arg(p)
    p.add_argument("--cache", metavar="DIR",
                   help="host chunk cache (default: $COLDSTART_CACHE, else /var/cache/coldstart "
                        "for root, else ~/.cache/coldstart)")
    p.add_argument("--cache-size", metavar="SIZE", type=size_arg,
                   help="host cache budget, e.g. 20G (default 10G)")
    p.add_argument("--foreground", action="store_true", help="serve in this process until unmounted")
    p.add_argument("--prefetch", action="store_true",
                   help="stream the tag's start-up profile ahead of demand, as coldstart run does")
    add_json_arg(p)
    p.set_defaults(func=cmd_mount)
    p = sub.add_parser("umount", help="unmount an image mount and stop its daemon")
    p.add_argument("mountpoint", nargs="?")
    p.add_argument("--all", action="store_true",
                   help="unmount every coldstart mount of this host (shared run mounts included)")
    p.set_defaults(func=cmd_umount)
    p = sub.add_parser("stats", help="counters of a mount: fetches, cache tiers, FUSE operations")
    p.add_argument("mountpoint")
    p.add_argument("--trace", action="store_true", help="print the access trace instead")
    add_json_arg(p)
    p.set_defaults(func=cmd_stats)


def cmd_mount(args: argparse.Namespace) -> int:
    verbose = int(getattr(args, "verbose", 0))
    profile = _tag_profile(args) if args.prefetch else ""
    if args.foreground:
        def ready(doc: dict[str, Any]) -> None:
            if doc.get("ok"):
                print(f"mounted {args.ref} at {args.mountpoint} (pid {doc['pid']})", flush=True)

        return mounts.serve_foreground(args.store, args.ref, args.mountpoint, cache_dir=args.cache,
                                       cache_size=args.cache_size, ready=ready, verbose=verbose,
                                       profile=profile)
    info = mounts.mount_image(args.store, args.ref, args.mountpoint, cache_dir=args.cache,
                              cache_size=args.cache_size, verbose=verbose, profile=profile)
    doc = {"mountpoint": info.mountpoint, "image": info.image_id, "pid": info.pid,
           "cache_dir": info.cache_dir, "cached_chunks": info.cached_chunks,
           "total_chunks": info.total_chunks, "log": info.log_path, "profile": profile}
    emit(args, doc, lambda: print(
        f"mounted {args.ref} ({info.image_id[:12]}) at {info.mountpoint}, daemon pid {info.pid}, "
        f"{info.cached_chunks}/{info.total_chunks} chunks already in the host cache"
        + (f", prefetching profile {profile[:12]}" if profile else "")))
    return 0


def _tag_profile(args: argparse.Namespace) -> str:
    """The start-up profile the tag links (an error if it links none)."""
    from imagefs.images import tag_profile
    from imagefs.store.factory import open_store

    with open_store(args.store or mounts.default_store_url()) as store:
        profile = tag_profile(store, args.ref)
    if not profile:
        raise MountError(f"--prefetch: {args.ref} is not a tag with a start-up profile")
    return profile


def cmd_umount(args: argparse.Namespace) -> int:
    if args.all == bool(args.mountpoint):
        raise MountError("give a MOUNTPOINT or --all")
    if args.mountpoint:
        mounts.unmount(args.mountpoint)
        return 0
    failed = 0
    for mp in _all_mounts():
        try:
            mounts.unmount(mp)
        except MountError as e:
            print(f"coldstart: {e}", file=sys.stderr)
            failed += 1
    if failed:
        raise MountError(f"{failed} mount(s) could not be unmounted")
    return 0


def _all_mounts() -> list[str]:
    """Every mount this host's run directory knows of (dead daemons included), and any coldstart
    FUSE mount below the run directory (the runner's shared image mounts). unmount() refuses a
    mountpoint that holds anything but a coldstart mount."""
    states = map(mounts.read_state, map(str, (mounts.run_dir() / "mounts").glob("*.json")))
    found = {str(s["mountpoint"]) for s in states if s and s.get("mountpoint")}
    found.update(mounts.coldstart_mounts(under=str(mounts.run_dir())))
    return sorted(found)


def cmd_stats(args: argparse.Namespace) -> int:
    if args.trace:
        json.dump(mounts.read_trace(args.mountpoint), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    stats = mounts.read_stats(args.mountpoint)
    emit(args, stats, lambda: _print_stats(stats))
    return 0


def _print_stats(s: dict[str, Any]) -> None:
    f = s["fetch"]
    print(f"mount     {s['mountpoint']}  image {s['image'][:12]}  pid {s['pid']}  up {s['uptime_s']:.0f}s")
    print(f"fetched   {f['chunks_fetched']} chunks, {human_bytes(f['bytes_fetched'])} "
          f"({human_bytes(f['raw_bytes_fetched'])} raw), {f['errors']} errors, {f['joined']} joined")
    for kind, c in f["by_kind"].items():
        print(f"  {kind:<10}{c['chunks']} chunks, {human_bytes(c['bytes'])}")
    _print_load_times(f.get("times") or {})
    m = f["memory"]
    print(f"memory    {m['hits']} hits, {m['misses']} misses, {m['chunks']} chunks "
          f"({human_bytes(m['bytes'])} of {human_bytes(m['max_bytes'])})")
    d = f.get("disk")
    if d:
        writes = "O_DIRECT" if d.get("direct_writes") else "buffered"
        print(f"host      {d['hits']} hits, {d['misses']} misses, {d['corrupt_dropped']} corrupt dropped, "
              f"{human_bytes(d['bytes'])} of {human_bytes(d['max_bytes'])} in {d['path']} "
              f"({writes} writes)")
    if f.get("pack_segments") or f.get("pack_dropped"):
        print(f"pack      {f['pack_segments']} read-set segments, {f['pack_reads']} reads served from them, "
              f"{f['pack_dropped']} dropped")
    names = s.get("names") or {}
    if names.get("total"):
        state = "running" if names["running"] else f"in {names['seconds']:.3f} s"
        print(f"names     {names['done']} of the profile's {names['total']} looked up or listed ahead, {state}")
    pushed = s.get("pushed") or {}
    if pushed.get("runs") or pushed.get("running"):
        state = "running" if pushed["running"] else f"in {pushed['seconds']:.3f} s"
        print(f"pushed    {human_bytes(pushed['bytes'])} of the pack into the page cache in "
              f"{pushed['runs']} runs, {state}")
    print(f"read      {human_bytes(s['fuse']['read_bytes'])} served, trace {s['trace']['events']} events")
    cpu = s.get("cpu", {})
    if "process_s" in cpu:
        loop = f" ({cpu['loop_s']:.2f} s serving FUSE requests)" if "loop_s" in cpu else ""
        print(f"cpu       {cpu['process_s']:.2f} s{loop}")
    print(f"{'op':<10}{'count':>9}{'errors':>8}{'p50 us':>9}{'p90 us':>9}{'p99 us':>9}{'max us':>10}")
    for name, o in s["fuse"]["ops"].items():
        print(f"{name:<10}{o['count']:>9}{o['errors']:>8}{o['p50_us']:>9}{o['p90_us']:>9}"
              f"{o['p99_us']:>9}{o['max_us']:>10}")


def _print_load_times(times: dict[str, Any]) -> None:
    """How long chunk loads took, per kind: from the store (and its request and decoding) and
    from the host cache; the total of the store loads is what readers of them waited at most."""
    rows = [(kind, t) for kind, t in times.items() if t["load"]["count"] or t["disk"]["count"]]
    if not rows:
        return
    print(f"{'loads':<12}{'from':<7}{'count':>7}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'total s':>9}"
          f"{'store p50':>11}{'decode p50':>12}")
    for kind, t in rows:
        for source, o in (("store", t["load"]), ("host", t["disk"])):
            if not o["count"]:
                continue
            parts = (f"{t['store']['p50_us'] / 1000:>11.2f}{t['decode']['p50_us'] / 1000:>12.2f}"
                     if source == "store" else "")
            print(f"  {kind:<10}{source:<7}{o['count']:>7}{o['p50_us'] / 1000:>9.2f}{o['p90_us'] / 1000:>9.2f}"
                  f"{o['p99_us'] / 1000:>9.2f}{o['total_ms'] / 1000:>9.3f}{parts}")

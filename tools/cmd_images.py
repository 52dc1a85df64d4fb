"""Image commands: import, export, images, inspect, rm, gc, fsck."""
from __future__ import annotations

import argparse
import time
from typing import Any

from imagefs import images
from imagefs.errors import ImageFSError
from imagefs.gc import fsck, gc, import_lease
from imagefs.importers import open_source
from imagefs.reader import ChunkReader
from imagefs.export import export_image
from imagefs.tree import BuildTree
from imagefs.writer import write_image
from tools.common import add_json_arg, add_store_arg, emit, human_bytes, progress_bar, store_from


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("import", help="import a rootfs dir, tar, oci:DIR[:REF], docker-archive:FILE or docker://REF")
    p.add_argument("src")
    p.add_argument("ref", metavar="NAME:TAG")
    p.add_argument("--tls-verify", default="true", choices=["true", "false"],
                   help="verify TLS for docker:// sources (false for local registries)")
    p.add_argument("--workers", type=int, default=4, help="parallel chunk uploads")
    _common(p, cmd_import)
    p = sub.add_parser("export", help="write an image's tree to a directory")
    p.add_argument("ref", metavar="NAME:TAG|ID")
    p.add_argument("dir")
    _common(p, cmd_export)
    _common(sub.add_parser("images", help="list tagged images"), cmd_images)
    p = sub.add_parser("inspect", help="metadata, sizes, chunk count and dedup of an image")
    p.add_argument("ref", metavar="NAME:TAG|ID")
    _common(p, cmd_inspect)
    p = sub.add_parser("rm", help="remove a tag (gc reclaims the data)")
    p.add_argument("refs", nargs="+", metavar="NAME:TAG")
    _common(p, cmd_rm)
    p = sub.add_parser("gc", help="delete chunks and indexes that no tag reaches")
    p.add_argument("--grace", type=float, default=900.0, help="never delete objects younger than this (s)")
    p.add_argument("--dry-run", action="store_true")
    _common(p, cmd_gc)
    p = sub.add_parser("fsck", help="check the store: tags, indexes, chunks")
    p.add_argument("--verify-chunks", action="store_true", help="also read and verify every chunk")
    _common(p, cmd_fsck)


def _common(p: argparse.ArgumentParser, func: Any) -> None:
    add_store_arg(p)
    add_json_arg(p)
    p.set_defaults(func=func)


def _tree_bytes(tree: BuildTree) -> int:
    seen, total = set(), 0
    for _, node in tree.walk():
        if id(node) not in seen and node.source is not None:
            seen.add(id(node))
            total += node.size
    return total


def cmd_import(args: argparse.Namespace) -> int:
    ref = images.parse_ref(args.ref)
    store = store_from(args)
    t0 = time.monotonic()
    with import_lease(store), open_source(args.src, tls_verify=args.tls_verify == "true") as imp:
        with progress_bar(args, f"import {ref}", _tree_bytes(imp.tree)) as advance:
            image_id, stats = write_image(store, imp.tree, imp.config, workers=args.workers, progress=advance)
        images.set_tag(store, ref, image_id)
    elapsed = time.monotonic() - t0
    doc = {"ref": str(ref), "image": image_id, "seconds": round(elapsed, 3),
           "mb_per_s": round(stats.file_bytes / 1e6 / max(elapsed, 1e-9), 1), **stats.as_dict()}
    emit(args, doc, lambda: print(
        f"{ref} -> {image_id}\n  {stats.files} files, {human_bytes(stats.file_bytes)} in {stats.chunks} chunks; "
        f"{stats.new_chunks} new ({human_bytes(stats.new_bytes)} stored), "
        f"{human_bytes(stats.reused_bytes)} reused; {elapsed:.2f} s, {doc['mb_per_s']} MB/s"))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    store = store_from(args)
    image_id = images.resolve(store, args.ref)
    index = images.load_index(store, image_id)
    with progress_bar(args, f"export {args.ref}", index.file_bytes) as advance:
        export_image(index, ChunkReader(store), args.dir, progress=advance)
    emit(args, {"image": image_id, "dir": args.dir}, lambda: print(f"exported {image_id} to {args.dir}"))
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    store = store_from(args)
    rows = [{"ref": str(ref), "image": doc["image"], "updated": doc.get("updated")}
            for ref, doc in images.list_tags(store)]
    rows.sort(key=lambda r: r["ref"])

    def human() -> None:
        print(f"{'NAME:TAG':40} IMAGE ID")
        for r in rows:
            print(f"{r['ref']:40} {r['image'][:16]}")
    emit(args, rows, human)
    return 0


def image_report(store: Any, image_id: str) -> dict[str, Any]:
    index = images.load_index(store, image_id)
    kinds: dict[str, int] = {}
    for ino in index.inodes:
        kind = _kind_name(ino.mode)
        kinds[kind] = kinds.get(kind, 0) + 1
    stored = {i.key[len("chunks/"):]: i.size for i in store.list("chunks/")}
    others: set[str] = set()
    for ref, doc in images.list_tags(store):
        if doc["image"] != image_id:
            try:
                others |= set(images.load_index(store, doc["image"]).chunks)
            except ImageFSError:  # another image's trouble (fsck reports it) is not this report's
                continue
    raw = sum(index.chunk_sizes)
    refs = [str(r) for r, d in images.list_tags(store) if d["image"] == image_id]
    return {"image": image_id, "tags": refs, "config": index.config.to_wire(), "entries": kinds,
            "file_bytes": index.file_bytes, "chunks": len(index.chunks), "chunk_bytes": raw,
            "stored_bytes": sum(stored.get(d, 0) for d in index.chunks),
            "shared_chunks": len(set(index.chunks) & others),
            "shared_bytes": sum(s for d, s in zip(index.chunks, index.chunk_sizes) if d in others)}


def _kind_name(mode: int) -> str:
    import stat
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "dir"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "chardev"), (stat.S_ISBLK, "blockdev"), (stat.S_ISFIFO, "fifo"),
                       (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "other"


def cmd_inspect(args: argparse.Namespace) -> int:
    store = store_from(args)
    rep = image_report(store, images.resolve(store, args.ref))

    def human() -> None:
        print(f"image    {rep['image']}\ntags     {', '.join(rep['tags']) or '-'}")
        print("entries  " + ", ".join(f"{v} {k}" for k, v in sorted(rep["entries"].items())))
        print(f"content  {human_bytes(rep['file_bytes'])} in {rep['chunks']} chunks "
              f"({human_bytes(rep['chunk_bytes'])} unique, {human_bytes(rep['stored_bytes'])} stored)")
        print(f"dedup    {rep['shared_chunks']} chunks ({human_bytes(rep['shared_bytes'])}) shared with other images")
        cfg = rep["config"]
        print(f"config   Entrypoint={cfg['Entrypoint']} Cmd={cfg['Cmd']} WorkingDir={cfg['WorkingDir']!r} "
              f"User={cfg['User']!r}\n         Env={cfg['Env']}")
    emit(args, rep, human)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    store = store_from(args)
    refs = [images.parse_ref(r) for r in args.refs]
    for ref in refs:
        images.remove_tag(store, ref)
    emit(args, {"removed": [str(r) for r in refs]}, lambda: [print(f"untagged {r}") for r in refs])
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    rep = gc(store_from(args), grace=args.grace, dry_run=args.dry_run)
    verb = "would delete" if rep.dry_run else "deleted"
    emit(args, rep.as_dict(), lambda: print(
        f"{verb} {len(rep.deleted_indexes)} images, {rep.deleted_chunks} chunks "
        f"({human_bytes(rep.deleted_bytes)}), {rep.deleted_profiles} profiles, {rep.deleted_temp_files} torn temp files; "
        f"kept {rep.kept_indexes} images ({rep.kept_young} young untagged)"))
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    rep = fsck(store_from(args), verify_chunks=args.verify_chunks)

    def human() -> None:
        for e in rep.errors:
            print(f"ERROR {e}")
        print(f"{rep.tags} tags, {rep.indexes} images, {rep.chunks} chunks; orphans: "
              f"{rep.orphan_indexes} images, {rep.orphan_chunks} chunks; {len(rep.errors)} errors")
    emit(args, rep.as_dict(), human)
    return 1 if rep.errors else 0

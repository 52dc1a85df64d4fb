"""coldstart export-oci: write a stored image as an OCI image layout (for skopeo, umoci, containerd)."""
from __future__ import annotations

import argparse

from imagefs import images
from imagefs.oci_export import write_oci_layout
from imagefs.reader import ChunkReader
from tools.common import add_json_arg, add_store_arg, emit, human_bytes, store_from


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("export-oci", help="write an image as an OCI image layout (one gzip layer)")
    p.add_argument("ref", metavar="NAME:TAG|ID")
    p.add_argument("dir", help="the layout directory (created, or added to)")
    p.add_argument("--oci-ref", default="latest", help="the name in index.json (default: latest)")
    p.add_argument("--level", type=int, default=6, choices=range(1, 10), metavar="1-9", help="gzip level")
    add_store_arg(p)
    add_json_arg(p)
    p.set_defaults(func=cmd_export_oci)


def cmd_export_oci(args: argparse.Namespace) -> int:
    store = store_from(args)
    image_id = images.resolve(store, args.ref)
    out = write_oci_layout(images.load_index(store, image_id), ChunkReader(store), args.dir, args.oci_ref,
                           level=args.level)
    doc = {"image": image_id, "dir": args.dir, **out.__dict__}
    emit(args, doc, lambda: print(
        f"{image_id[:12]} -> oci:{args.dir}:{out.ref} (manifest {out.manifest_digest[:19]}, "
        f"layer {human_bytes(out.layer_bytes)} of {human_bytes(out.tar_bytes)} tar)"))
    return 0

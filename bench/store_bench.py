"""Image-store benchmark: import speed (local and S3), dedup on re-import and on a one-package
change, index load time, and the chunks `import torch` needs. Every number comes from this run."""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Iterator

from bench import rootfs
from bench.util import drop_page_cache, machine, median, timed, write_json
from imagefs.images import load_index
from imagefs.importers.rootfs import import_rootfs
from imagefs.index import ImageIndex
from imagefs.store.base import BlobStore
from imagefs.store.factory import open_store
from imagefs.store.local import LocalStore
from imagefs.writer import write_image

IMPORT_TORCH = "import torch"


def _import(store: BlobStore, src: Path, *, cold: bool) -> dict[str, Any]:
    if cold:
        drop_page_cache()
    else:
        subprocess.run(["tar", "cf", "/dev/null", "."], cwd=src, check=True)  # warm the page cache
    secs, (image_id, stats) = timed(lambda: write_image(store, import_rootfs(src)))
    return {"image": image_id, "seconds": round(secs, 2), "mb_per_s": round(stats.file_bytes / 1e6 / secs, 1),
            **stats.as_dict()}


def opened_files(root: Path, code: str) -> list[str]:
    """Regular files a Python command opens in a chroot (strace), in first-open order."""
    with tempfile.NamedTemporaryFile(suffix=".strace") as log:
        subprocess.run(["strace", "-f", "-qq", "-e", "trace=open,openat", "-o", log.name,
                        shutil.which("chroot") or "chroot", str(root), "python3", "-c", code],
                       check=True, capture_output=True)
        text = Path(log.name).read_text(errors="replace")
    seen: dict[str, None] = {}
    for m in re.finditer(r'open(?:at)?\((?:[^,]+, )?"([^"]+)", [^)]*\) = \d+', text):
        path = m.group(1)
        if (root / path.lstrip("/")).is_file():
            seen.setdefault(path, None)
    return list(seen)


def working_set(index: ImageIndex, paths: list[str]) -> dict[str, Any]:
    """Chunks (and their bytes) covering the whole content of the files opened."""
    chunks: set[int] = set()
    file_bytes = 0
    for p in paths:
        ino = index.resolve(p)
        if ino is None:
            continue
        node = index.inode(ino)
        file_bytes += node.size
        ext = node.extents or []
        chunks.update(ext[i] for i in range(0, len(ext), 3))
    return {"files": len(paths), "file_bytes": file_bytes, "chunks": len(chunks),
            "chunk_bytes": sum(index.chunk_sizes[c] for c in chunks)}


def index_load_ms(store: BlobStore, image_id: str, repeat: int = 15) -> float:
    return round(1000 * median([timed(lambda: load_index(store, image_id))[0] for _ in range(repeat)]), 1)


def run(out: Path, s3_url: str | None) -> dict[str, Any]:
    torch_root, plus_root = rootfs.build_torch(), rootfs.build_torch_plus()
    res: dict[str, Any] = {"machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        cold_store = LocalStore(Path(tmp) / "cold")
        res["import_local_cold"] = _import(cold_store, torch_root, cold=True)
        store = LocalStore(Path(tmp) / "warm")
        res["import_local_warm"] = first = _import(store, torch_root, cold=False)
        res["reimport"] = _import(store, torch_root, cold=False)
        plus = res["import_plus_one_package"] = _import(store, plus_root, cold=False)
        plus["new_fraction"] = round(plus["new_raw_bytes"] / plus["file_bytes"], 4)
        res["index_load_ms"] = index_load_ms(store, first["image"])
        index = load_index(store, first["image"])
        res["entries"] = len(index.inodes)
        res["import_torch_working_set"] = working_set(index, opened_files(torch_root, IMPORT_TORCH))
    if s3_url == "auto":
        with _seaweed() as url:
            with open_store(url) as s3:
                res["import_s3_warm"] = _import(s3, torch_root, cold=False)
    elif s3_url:
        with open_store(s3_url) as s3:
            res["import_s3_warm"] = _import(s3, torch_root, cold=False)
    write_json(out / "store_bench.json", res)
    (out / "store_bench.md").write_text(report(res))
    return res


@contextmanager
def _seaweed() -> Iterator[str]:
    """A throwaway SeaweedFS S3 server on loopback, for the S3 import figure."""
    from bench.services import loopback_store

    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp, loopback_store(Path(tmp), "storebench") as url:
        yield url


def report(r: dict[str, Any]) -> str:
    ws, plus = r["import_torch_working_set"], r["import_plus_one_package"]
    rows = [
        ("import, local store, source in page cache", f"{r['import_local_warm']['mb_per_s']} MB/s",
         f"{r['import_local_warm']['seconds']} s"),
        ("import, local store, page cache dropped", f"{r['import_local_cold']['mb_per_s']} MB/s",
         f"{r['import_local_cold']['seconds']} s"),
    ]
    if "import_s3_warm" in r:
        rows.append(("import, SeaweedFS S3 on loopback", f"{r['import_s3_warm']['mb_per_s']} MB/s",
                     f"{r['import_s3_warm']['seconds']} s"))
    rows += [
        ("re-import of the same tree: new chunks", str(r["reimport"]["new_chunks"]), ""),
        ("same tree + one pip package: new bytes", f"{100 * plus['new_fraction']:.2f} %",
         f"{plus['new_chunks']} new chunks"),
        ("index load (median of 15)", f"{r['index_load_ms']} ms", f"{r['entries']} entries"),
        ("`import torch`: files opened / bytes", f"{ws['files']} / {ws['file_bytes'] / 1e6:.1f} MB", ""),
        ("`import torch`: chunks (fetches) / bytes", f"{ws['chunks']} / {ws['chunk_bytes'] / 1e6:.1f} MB", ""),
    ]
    lines = ["| measure | value | note |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    m = r["machine"]
    lines.append(f"\n{m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}; "
                 f"image: debootstrap bookworm + python3 + torch 2.13 CPU, {r['entries']} entries; {r['started']}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--s3", metavar="URL", default="auto",
                    help="also import into this S3 store URL ('auto': a SeaweedFS server it starts; '' to skip)")
    args = ap.parse_args()
    print(report(run(args.out, args.s3)))


if __name__ == "__main__":
    main()

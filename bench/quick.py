"""`make bench`: the quick benchmark. Until the cold-start suite lands this is the image-store
benchmark on the real debootstrap + torch rootfs (built on first use and cached)."""
from __future__ import annotations

from pathlib import Path

from bench import store_bench


def main() -> None:
    out = Path("bench-out")
    print(store_bench.report(store_bench.run(out, None)))
    print(f"results: {out}/store_bench.json, {out}/store_bench.md")


if __name__ == "__main__":
    main()

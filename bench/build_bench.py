"""Builder benchmark: debian_slim + the torch 2.13 CPU wheel end to end, a no-op rebuild, and a
rebuild where only the last step changed (time and bytes uploaded). Every figure from this run."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.util import write_json

SPEC = """import os
from imagefs import Image
WHEELS = os.environ.get("COLDSTART_WHEELS", "/opt/wheels")  # as in bench/specs/torch.py
app = (Image.debian_slim(python_version="3.11")
       .pip_install("torch==2.13.0", find_links=WHEELS if os.path.isdir(WHEELS) else None)
       .run_commands("echo {version} > /etc/app-version"))
"""


def _build(spec: Path, store: str, env: dict[str, str]) -> dict[str, Any]:
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "tools.cli", "build", f"{spec}::app", "--tag", "bench-build:1",
                        "--json", "--store", store], capture_output=True, text=True, env=env, timeout=1800)
    secs = time.monotonic() - t
    if r.returncode != 0:
        raise SystemExit(f"build failed:\n{r.stderr[-3000:]}")
    doc = json.loads(r.stdout)["app"]
    return {"seconds": round(secs, 2), "uploaded_bytes": doc["uploaded_bytes"],
            "steps": [(s["step"][:40], s["cached"], s["seconds"]) for s in doc["steps"]]}


def run(out: Path, store: str) -> dict[str, Any]:
    env = dict(os.environ, COLDSTART_CA_BUNDLE="/etc/ssl/certs/ca-certificates.crt")
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.py"
        spec.write_text(SPEC.format(version=f"v1-{time.time_ns()}"))
        first = _build(spec, store, env)
        noop = _build(spec, store, env)
        spec.write_text(SPEC.format(version=f"v2-{time.time_ns()}"))
        last = _build(spec, store, env)
    res = {"first": first, "noop_rebuild": noop, "last_step_changed": last, "store": store}
    write_json(out / "build_bench.json", res)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--store", default="file:///var/tmp/coldstart-build-bench/store",
                    help="store URL (a fresh one measures the full build; a used one, cache hits)")
    args = ap.parse_args()
    print(json.dumps(run(args.out, args.store), indent=2))


if __name__ == "__main__":
    main()

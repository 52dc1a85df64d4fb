"""The benchmark's workloads: an image spec in bench/specs and the command that shows it is ready."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPECS = Path(__file__).parent / "specs"
READY = r"^ready$"


@dataclass(frozen=True)
class Workload:
    name: str
    command: tuple[str, ...]
    gpu: bool = False

    @property
    def spec(self) -> Path:
        return SPECS / f"{self.name}.py"


WORKLOADS = {w.name: w for w in [
    Workload("hello", ("/bin/echo", "ready")),
    Workload("python", ("python3", "-c", "print('ready')")),
    Workload("numpy", ("python3", "-c", "import numpy; print('ready')")),
    Workload("torch", ("python3", "-c", "import torch; print('ready')")),
    Workload("weights", ("/bin/sh", "-c", "dd if=/weights.bin of=/dev/null bs=4M 2>/dev/null && echo ready")),
    Workload("gpu", ("python3", "-c", "import torch; torch.cuda.init(); a = torch.ones(512, 512, device='cuda'); "
                     "torch.cuda.synchronize(); print(float((a @ a).sum())); print('ready')"), gpu=True),
]}
SUITES = {
    "quick": (["hello", "python", "torch"], ["native", "pull", "cold", "warm"], 3),
    "full": (list(WORKLOADS), ["native", "pull", "cold", "warm", "prefetch", "guess", "containerd"], 5),
}

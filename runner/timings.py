"""Phase timestamps of one run, from time.monotonic() in the runner process."""
from __future__ import annotations

import json
import time
from pathlib import Path

PHASES = ("image_resolved", "mount_ready", "rootfs_ready", "spec_ready", "runc_create", "runc_start",
          "first_output", "ready", "exit")
_LABELS = {"image_resolved": "image resolved", "mount_ready": "mount ready", "rootfs_ready": "rootfs ready",
           "spec_ready": "spec written",
           "runc_create": "runc create", "runc_start": "runc start", "first_output": "first output byte",
           "ready": "ready (regex)", "exit": "exit"}


class Timings:
    """Seconds since the run began for each phase reached; the first mark of a phase wins."""

    def __init__(self, clock: object = time.monotonic) -> None:
        self._clock = clock if callable(clock) else time.monotonic
        self.start = self._clock()
        self.started_at = time.time()  # wall clock, to line up the phases of concurrent runs
        self.marks: dict[str, float] = {}
        self.mount_cold: bool | None = None
        self.total: float | None = None

    def mark(self, phase: str) -> None:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase}")
        self.marks.setdefault(phase, self._clock() - self.start)

    def finish(self) -> None:
        if self.total is None:
            self.total = self._clock() - self.start

    def as_dict(self) -> dict[str, float | bool | None]:
        doc: dict[str, float | bool | None] = {p: self.marks.get(p) for p in PHASES}
        doc["mount_cold"] = self.mount_cold
        doc["total"] = self.total
        doc["started_at"] = self.started_at
        return doc

    def human(self) -> str:
        lines = ["coldstart timings (ms since start):"]
        for phase in PHASES:
            if phase in self.marks:
                note = ""
                if phase == "mount_ready" and self.mount_cold is not None:
                    note = "  (cold)" if self.mount_cold else "  (warm)"
                lines.append(f"  {_LABELS[phase]:<18} {self.marks[phase] * 1000:9.1f}{note}")
        if self.total is not None:
            lines.append(f"  {'total':<18} {self.total * 1000:9.1f}")
        return "\n".join(lines)

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.as_dict(), indent=2) + "\n")

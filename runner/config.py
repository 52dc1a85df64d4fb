"""The image configuration the runner consumes, as a protocol so the image index can supply its own type."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class ImageConfigLike(Protocol):
    """What the runner reads from an image's config (the OCI/Docker `config` object)."""

    @property
    def env(self) -> list[str]: ...

    @property
    def entrypoint(self) -> list[str] | None: ...

    @property
    def cmd(self) -> list[str] | None: ...

    @property
    def working_dir(self) -> str: ...

    @property
    def user(self) -> str: ...

    @property
    def labels(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class ImageConfig:
    """A plain implementation of ImageConfigLike, for directories and tests."""

    env: list[str] = field(default_factory=list)
    entrypoint: list[str] | None = None
    cmd: list[str] | None = None
    working_dir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_oci(cls, doc: dict[str, object]) -> ImageConfig:
        """Build from an OCI image config's `config` object (keys Env, Entrypoint, Cmd, ...)."""
        def strings(key: str) -> list[str] | None:
            value = doc.get(key)
            return [str(v) for v in value] if isinstance(value, list) else None

        labels = doc.get("Labels")
        return cls(
            env=strings("Env") or [],
            entrypoint=strings("Entrypoint"),
            cmd=strings("Cmd"),
            working_dir=str(doc.get("WorkingDir") or ""),
            user=str(doc.get("User") or ""),
            labels={str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
        )

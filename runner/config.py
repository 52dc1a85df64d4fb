"""The image configuration the runner consumes, as a protocol so the image index can supply its own type."""
from __future__ import annotations

from typing import Protocol

from imagefs.index import ImageConfig as _IndexImageConfig


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


# The concrete config is the image index's own (env, entrypoint, cmd, working_dir, user, labels;
# ImageConfig.from_wire reads an OCI image config's `config` object).
ImageConfig = _IndexImageConfig

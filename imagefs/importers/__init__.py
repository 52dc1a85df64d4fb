"""Import sources: a rootfs directory, a tar file, oci:DIR[:REF], docker-archive:FILE, docker://REF.

open_source(spec) is a context manager giving an Imported (tree + OCI config); temporary spool
files the tree's sources read from live until the context ends, so write the image inside it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from imagefs.errors import InvalidSource
from imagefs.index import ImageConfig
from imagefs.tree import BuildTree


@dataclass
class Imported:
    tree: BuildTree
    config: ImageConfig = field(default_factory=ImageConfig)


@contextmanager
def open_source(spec: str, *, tls_verify: bool = True) -> Iterator[Imported]:
    """Parse and read an import source; see the module docstring for the forms."""
    if spec.startswith(("oci:", "docker-archive:", "docker://")) or (
            os.path.isfile(spec) and not os.path.isdir(spec)):
        from imagefs.importers.layers import open_layered_source  # tar, OCI, docker-archive, registry

        with open_layered_source(spec, tls_verify=tls_verify) as imported:
            yield imported
        return
    if os.path.isdir(spec):
        from imagefs.importers.rootfs import import_rootfs

        yield Imported(import_rootfs(spec))
        return
    raise InvalidSource(f"import source {spec!r} is not a directory, a file, oci:, docker-archive: or docker://")

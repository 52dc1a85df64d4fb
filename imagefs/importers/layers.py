"""Import layered images: a tar file, oci:DIR[:REF], docker-archive:FILE[:REF] and docker://REF.

A tar file (plain, gzip or zstd, told by its first bytes) is one layer. An OCI layout is read from
index.json: the manifest whose org.opencontainers.image.ref.name is REF (or the only one), through
any image index by platform (linux on this host's architecture, else linux/amd64). A docker-archive is
a `docker save` tar. docker://REF is copied by skopeo into a temporary OCI layout first.

Each layer is streamed into an uncompressed spool file in a temporary directory that lives as long as
the context; the tree's regular files read from it later (RangeSource), so write the image inside the
context. Every blob of an OCI layout is checked against its digest and size as it is read, and every
layer against its config diff_id where the config lists them. Layers are applied bottom first with
OCI whiteouts: `.wh.NAME` hides NAME of lower layers, `.wh..wh..opq` hides everything lower layers
had in its directory; neither hides entries of its own layer. `.wh..wh.*` aufs bookkeeping is skipped.

Hostile or odd entries (nothing is ever created outside the temporary directory):
- absolute names (and absolute hardlink targets) lose their leading '/', as tar does: `/etc/x` is
  `etc/x` inside the image;
- a '..' component in a name or a hardlink target: UnsafeInput;
- a symlink is data and is kept whatever it points at (it resolves inside the container's root), but
  an entry whose path goes through a symlink (`evil -> /etc`, then `evil/passwd`) is UnsafeInput, as
  is one below a non-directory;
- a hardlink to a missing entry, to a directory or to the root: UnsafeInput; a hardlink is the same
  Node as its target, which may come from a lower layer;
- a duplicate name: the later entry wins, as tar extraction does; a directory over a directory keeps
  what is already inside and takes the new metadata; anything else replaces the old entry whole;
- character and block devices and fifos are metadata only (mode and rdev), never made on the host;
- names and link targets that are not UTF-8 are kept byte for byte;
- what no Linux filesystem can hold is refused: a name longer than 255 bytes or a path deeper than
  256 directories (UnsafeInput), a symlink target with a NUL or of 4096 bytes or more (InvalidSource);
- a sparse member may declare at most 64 GiB (its holes are chunked like data), and its map must
  lie inside the file: InvalidSource otherwise;
- a truncated or corrupt gzip, zstd or tar stream (a tar must end with its end-of-archive marker:
  one cut at a member boundary is truncated too), a digest, size or diff_id mismatch, a missing
  blob, an unsupported entry type or compression: InvalidSource. Every message is one line.
Owners are the numeric uid/gid of the tar header; user and group names are ignored. xattrs come from
PAX SCHILY.xattr.* and LIBARCHIVE.xattr.* records (security.capability included); ACL records are not
imported.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

from imagefs.errors import InvalidSource
from imagefs.importers import Imported
from imagefs.importers.manifests import (LayerBlob, LayeredImage, open_docker_archive, pull_to_layout,
                                         read_oci_layout)
from imagefs.importers.spool import spool
from imagefs.importers.tarlayer import apply_layer
from imagefs.index import ImageConfig
from imagefs.tree import BuildTree

__all__ = ["open_layered_source", "image_config"]


@contextmanager
def open_layered_source(spec: str, *, tls_verify: bool = True) -> Iterator[Imported]:
    """Read every layer of spec into one BuildTree; spool files live until the context ends."""
    with tempfile.TemporaryDirectory(prefix="coldstart-import-") as workdir, ExitStack() as stack:
        image = stack.enter_context(_open_image(spec, workdir, tls_verify))
        tree = BuildTree()
        for n, layer in enumerate(image.layers):
            path = os.path.join(workdir, f"layer-{n:04d}.tar")
            _spool_layer(layer, path)
            apply_layer(tree, path, workdir, layer.what)
        yield Imported(tree, image_config(image.config, spec))


def _spool_layer(layer: LayerBlob, dest: str) -> None:
    try:
        stream = layer.open()
    except OSError as e:
        raise InvalidSource(f"{layer.what}: cannot open: {e.strerror}") from None
    with stream:
        spool(stream, dest, layer.what, layer.expect)


def _split_ref(rest: str) -> tuple[str, str | None]:
    """PATH[:REF], split at the first ':' as skopeo does."""
    path, sep, ref = rest.partition(":")
    return path, (ref if sep and ref else None)


@contextmanager
def _open_image(spec: str, workdir: str, tls_verify: bool) -> Iterator[LayeredImage]:
    if spec.startswith("oci:"):
        yield read_oci_layout(*_split_ref(spec[len("oci:"):]))
    elif spec.startswith("docker-archive:"):
        path, ref = _split_ref(spec[len("docker-archive:"):])
        with open_docker_archive(path, ref, workdir) as image:
            yield image
    elif spec.startswith("docker://"):
        yield read_oci_layout(pull_to_layout(spec[len("docker://"):], workdir, tls_verify=tls_verify),
                              "latest")
    elif os.path.isfile(spec):
        yield LayeredImage({}, [LayerBlob(f"tar {spec}", lambda: open(spec, "rb"))])
    else:
        raise InvalidSource(f"import source {spec!r} is not a tar file, oci:, docker-archive: or docker://")


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def image_config(doc: dict[str, Any], where: str) -> ImageConfig:
    """The runtime part of an OCI image config ('config': Env, Entrypoint, Cmd, ...), type-checked."""
    c = doc.get("config") or {}
    checks = [("config", isinstance(c, dict))]
    if isinstance(c, dict):
        labels = c.get("Labels") or {}
        checks += [("Env", c.get("Env") is None or _strings(c["Env"])),
                   ("Entrypoint", c.get("Entrypoint") is None or _strings(c["Entrypoint"])),
                   ("Cmd", c.get("Cmd") is None or _strings(c["Cmd"])),
                   ("WorkingDir", isinstance(c.get("WorkingDir") or "", str)),
                   ("User", isinstance(c.get("User") or "", str)),
                   ("Labels", isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values()))]
    bad = [name for name, ok in checks if not ok]
    if bad:
        raise InvalidSource(f"{where}: image config has a malformed {', '.join(bad)}")
    return ImageConfig.from_wire(c)

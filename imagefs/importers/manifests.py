"""Find an image's config and ordered layers in an OCI layout, a docker-save archive or a registry.

Each form gives a LayeredImage: the OCI config document and one LayerBlob per layer, bottom first,
with what its bytes must hash to. Nothing here reads a layer; imagefs.importers.layers does.
"""
from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import tarfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator

from imagefs.errors import InvalidSource
from imagefs.importers.spool import Expect, check_digest, hasher, spool
from imagefs.regular import NotRegularFile, open_regular

REF_ANNOTATION = "org.opencontainers.image.ref.name"
MAX_JSON = 64 << 20
MAX_NESTING = 4
PULL_TIMEOUT = 3600.0  # seconds a docker:// pull may take in all ($COLDSTART_PULL_TIMEOUT): multi-GB images
KILL_GRACE = 30.0  # past PULL_TIMEOUT, seconds before a skopeo that ignored its own deadline is killed
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "i686": "386",
         "i386": "386", "armv7l": "arm", "armv6l": "arm", "ppc64le": "ppc64le", "s390x": "s390x",
         "riscv64": "riscv64"}


@dataclass(frozen=True)
class LayerBlob:
    what: str  # names the layer in messages: its digest or its archive member
    open: Callable[[], BinaryIO]
    expect: Expect = Expect()


@dataclass
class LayeredImage:
    config: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerBlob] = field(default_factory=list)


def host_arch() -> str:
    machine = platform.machine().lower()
    return _ARCH.get(machine, machine)


def _load_json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidSource(f"{what}: not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidSource(f"{what}: not valid JSON: nested too deeply") from None


def _expect_dict(doc: Any, what: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise InvalidSource(f"{what}: expected a JSON object")
    return doc


def _strings_object(value: Any, keys: tuple[str, ...] | None = None) -> bool:
    """value is a JSON object whose values (those under keys, when given) are strings."""
    if not isinstance(value, dict):
        return False
    return all(isinstance(value.get(k, ""), str) for k in (value if keys is None else keys))


def _descriptor(desc: Any, what: str) -> dict[str, Any]:
    """desc if it is a descriptor whose optional fields have their OCI types, else InvalidSource."""
    desc = _expect_dict(desc, what)
    size = desc.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise InvalidSource(f"{what}: 'size' is not a byte count: {str(size)[:100]!r}")
    if desc.get("annotations") is not None and not _strings_object(desc["annotations"]):
        raise InvalidSource(f"{what}: 'annotations' is not an object of strings")
    if desc.get("platform") is not None and not _strings_object(desc["platform"], ("os", "architecture")):
        raise InvalidSource(f"{what}: 'platform' is not an object with string os and architecture")
    return desc


def attach_diff_ids(image: LayeredImage, what: str) -> None:
    """Give each layer the uncompressed digest its config records (rootfs.diff_ids), when it has them."""
    rootfs = image.config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if diff_ids is None:
        return
    if not isinstance(diff_ids, list) or len(diff_ids) != len(image.layers):
        raise InvalidSource(f"{what}: config lists {len(diff_ids) if isinstance(diff_ids, list) else 'no'} "
                            f"diff_ids for {len(image.layers)} layers")
    image.layers = [LayerBlob(layer.what, layer.open,
                              Expect(layer.expect.digest, layer.expect.size, check_digest(d, what)))
                    for layer, d in zip(image.layers, diff_ids)]


# -- OCI image layout -------------------------------------------------------------------------------

class OciLayout:
    """An OCI image layout directory: index.json, then blobs/ALG/HEX, each checked against its digest."""

    def __init__(self, root: str) -> None:
        self.root = root
        if not os.path.isfile(os.path.join(root, "index.json")):
            raise InvalidSource(f"{root} is not an OCI image layout (no index.json)")

    def blob_path(self, digest: str) -> str:
        alg, _, hexpart = digest.partition(":")
        return os.path.join(self.root, "blobs", alg, hexpart)

    def read_json(self, desc: dict[str, Any] | None, what: str) -> dict[str, Any]:
        """index.json (desc None) or the small blob a descriptor names, digest and size checked."""
        if desc is None:
            path, what = os.path.join(self.root, "index.json"), "index.json"
        else:
            digest = check_digest(desc.get("digest"), what)
            path, what = self.blob_path(digest), f"{what} {digest}"
        data = self._read_small(path, what)
        if desc is not None:
            _check_bytes(data, desc, what)
        return _expect_dict(_load_json(data, what), what)

    @staticmethod
    def _read_small(path: str, what: str) -> bytes:
        try:
            with _open_regular(path, what) as f:
                data = f.read(MAX_JSON + 1)
        except OSError as e:
            raise InvalidSource(f"{what}: cannot read: {e.strerror}") from None
        if len(data) > MAX_JSON:
            raise InvalidSource(f"{what}: larger than {MAX_JSON} bytes")
        return data

    def layer(self, desc: Any) -> LayerBlob:
        desc = _descriptor(desc, "layer descriptor")
        digest = check_digest(desc.get("digest"), "layer descriptor")
        path, what = self.blob_path(digest), f"layer {digest}"
        _open_regular(path, what).close()  # a missing blob fails now, before any layer is spooled
        return LayerBlob(what, lambda: _open_regular(path, what), Expect(digest, desc.get("size")))


def _open_regular(path: str, what: str) -> BinaryIO:
    """The blob at path opened for reading; InvalidSource when it is missing or not a regular file
    (a FIFO or a device is never waited on: imagefs.regular)."""
    try:
        return os.fdopen(open_regular(path), "rb")
    except NotRegularFile as e:
        raise InvalidSource(f"{what}: blob in the layout is {e.strerror}") from None
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidSource(f"{what}: blob missing from the layout") from None
    except OSError as e:
        raise InvalidSource(f"{what}: cannot read: {e.strerror}") from None


def _check_bytes(data: bytes, desc: dict[str, Any], what: str) -> None:
    digest = desc["digest"]
    h = hasher(digest)
    h.update(data)
    if f"{h.name}:{h.hexdigest()}" != digest:
        raise InvalidSource(f"{what}: digest mismatch: content hashes to {h.name}:{h.hexdigest()}")
    if isinstance(desc.get("size"), int) and desc["size"] != len(data):
        raise InvalidSource(f"{what}: blob is {len(data)} bytes, its descriptor says {desc['size']}")


def _descriptors(doc: dict[str, Any], what: str) -> list[dict[str, Any]]:
    found = doc.get("manifests")
    if not isinstance(found, list) or not all(isinstance(d, dict) for d in found):
        raise InvalidSource(f"{what}: 'manifests' is not a list of descriptors")
    return [_descriptor(d, f"{what}: manifests[{n}]") for n, d in enumerate(found)]


def _ref_names(descs: list[dict[str, Any]]) -> str:
    names = sorted({str((d.get("annotations") or {}).get(REF_ANNOTATION)) for d in descs
                    if isinstance(d.get("annotations"), dict) and REF_ANNOTATION in d["annotations"]})
    return ", ".join(names) or "none"


def _by_ref(descs: list[dict[str, Any]], ref: str | None, where: str) -> dict[str, Any] | None:
    """The descriptor named ref; with no ref, the only one (None: several, choose by platform)."""
    if ref is None:
        if not descs:
            raise InvalidSource(f"{where}: the layout holds no image")
        if len(descs) > 1 and not any(isinstance(d.get("platform"), dict) for d in descs):
            raise InvalidSource(f"{where}: the layout holds {len(descs)} images; name one as oci:DIR:REF "
                                f"(names: {_ref_names(descs)})")
        return descs[0] if len(descs) == 1 else None
    named = [d for d in descs if isinstance(d.get("annotations"), dict)
             and d["annotations"].get(REF_ANNOTATION) == ref]
    if not named:
        raise InvalidSource(f"{where}: no image named {ref!r} (names: {_ref_names(descs)})")
    return named[0] if len(named) == 1 else None


def _by_platform(descs: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """linux on this host's architecture, else linux/amd64."""
    def matching(arch: str) -> list[dict[str, Any]]:
        return [d for d in descs if isinstance(d.get("platform"), dict)
                and d["platform"].get("os") == "linux" and d["platform"].get("architecture") == arch]

    found = matching(host_arch()) or matching("amd64")
    if not found:
        plats = sorted({f"{(d.get('platform') or {}).get('os')}/{(d.get('platform') or {}).get('architecture')}"
                        for d in descs})
        raise InvalidSource(f"{where}: no image for linux/{host_arch()} or linux/amd64 "
                            f"(platforms: {', '.join(plats)}; names: {_ref_names(descs)})")
    return found[0]


def _manifest(layout: OciLayout, ref: str | None) -> dict[str, Any]:
    """Walk from index.json through any image indexes to one image manifest."""
    doc, where, chosen = layout.read_json(None, "index.json"), f"{layout.root}/index.json", None
    for depth in range(MAX_NESTING + 1):
        descs = _descriptors(doc, where)
        chosen = (_by_ref(descs, ref, where) if depth == 0 else None) or _by_platform(descs, where)
        doc, where = layout.read_json(chosen, "manifest"), f"manifest {chosen['digest']}"
        if "manifests" not in doc:
            return doc
    raise InvalidSource(f"{where}: image indexes nested more than {MAX_NESTING} deep")


def read_oci_layout(root: str, ref: str | None) -> LayeredImage:
    layout = OciLayout(root)
    manifest = _manifest(layout, ref)
    layers = manifest.get("layers")
    if not isinstance(manifest.get("config"), dict) or not isinstance(layers, list):
        raise InvalidSource(f"{root}: the chosen manifest has no config or no layers list")
    config = layout.read_json(_descriptor(manifest["config"], f"{root}: config descriptor"), "config")
    image = LayeredImage(config, [layout.layer(d) for d in layers])
    attach_diff_ids(image, f"{root}: config")
    return image


# -- docker save archive ----------------------------------------------------------------------------

class DockerArchive:
    """A `docker save` tar: manifest.json names a config and the layer members, bottom first."""

    def __init__(self, path: str, workdir: str) -> None:
        self.path = path
        tar_path = self._uncompressed(path, workdir)
        try:
            self.tar = tarfile.open(tar_path, "r:", encoding="utf-8", errors="surrogateescape")
        except (tarfile.TarError, OSError) as e:
            raise InvalidSource(f"docker-archive {path}: not a valid tar archive: {e}") from None
        try:
            self.members = {os.path.normpath(m.name): m for m in self.tar.getmembers()}
        except (tarfile.TarError, EOFError, OSError) as e:
            self.tar.close()
            raise InvalidSource(f"docker-archive {path}: not a valid tar archive: {e}") from None

    @staticmethod
    def _uncompressed(path: str, workdir: str) -> str:
        """The archive itself, or a spooled copy when it is gzip or zstd compressed."""
        try:
            with open(path, "rb") as f:
                head = f.read(4)
                if not head.startswith((b"\x1f\x8b", b"\x28\xb5\x2f\xfd")):
                    return path
                f.seek(0)
                dest = os.path.join(workdir, "docker-archive.tar")
                spool(f, dest, f"docker-archive {path}")
                return dest
        except OSError as e:
            raise InvalidSource(f"docker-archive {path}: cannot read: {e.strerror}") from None

    def close(self) -> None:
        self.tar.close()

    def member(self, name: Any, what: str) -> tarfile.TarInfo:
        """A regular member by name, following the symlinks docker save uses for repeated layers."""
        if not isinstance(name, str):
            raise InvalidSource(f"docker-archive {self.path}: {what} is not a file name")
        key = os.path.normpath(name)
        for _ in range(8):
            m = self.members.get(key)
            if m is None:
                raise InvalidSource(f"docker-archive {self.path}: {what} {name} is missing")
            if m.isreg():
                return m
            if not (m.issym() or m.islnk()):
                raise InvalidSource(f"docker-archive {self.path}: {what} {name} is not a file")
            base = os.path.dirname(key) if m.issym() else ""
            key = os.path.normpath(os.path.join(base, m.linkname))
        raise InvalidSource(f"docker-archive {self.path}: {what} {name}: too many links")

    def read(self, m: tarfile.TarInfo, what: str) -> bytes:
        if m.size > MAX_JSON:
            raise InvalidSource(f"docker-archive {self.path}: {what} is larger than {MAX_JSON} bytes")
        f = self.tar.extractfile(m)
        assert f is not None
        return f.read()

    def opener(self, m: tarfile.TarInfo) -> Callable[[], BinaryIO]:
        def open_member() -> BinaryIO:
            f = self.tar.extractfile(m)
            assert f is not None
            return f
        return open_member


def _pick_docker_entry(entries: Any, ref: str | None, where: str) -> dict[str, Any]:
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise InvalidSource(f"{where}: manifest.json is not a list of images")
    if ref is None:
        if len(entries) > 1:
            raise InvalidSource(f"{where}: holds {len(entries)} images; name one as docker-archive:FILE:REF")
        return entries[0]
    for e in entries:
        if ref in (e.get("RepoTags") or []):
            return e
    tags = sorted(t for e in entries for t in (e.get("RepoTags") or []) if isinstance(t, str))
    raise InvalidSource(f"{where}: no image tagged {ref!r} (tags: {', '.join(tags) or 'none'})")


@contextmanager
def open_docker_archive(path: str, ref: str | None, workdir: str) -> Iterator[LayeredImage]:
    archive = DockerArchive(path, workdir)
    try:
        where = f"docker-archive {path}"
        manifest = _load_json(archive.read(archive.member("manifest.json", "manifest.json"), "manifest"),
                              f"{where}: manifest.json")
        entry = _pick_docker_entry(manifest, ref, where)
        config_member = archive.member(entry.get("Config"), "config")
        config = _expect_dict(_load_json(archive.read(config_member, "config"), f"{where}: config"), where)
        names = entry.get("Layers")
        if not isinstance(names, list):
            raise InvalidSource(f"{where}: the image has no Layers list")
        members = [(name, archive.member(name, "layer")) for name in names]
        image = LayeredImage(config, [LayerBlob(f"{where}: layer {name}", archive.opener(m))
                                      for name, m in members])
        attach_diff_ids(image, f"{where}: config")
        yield image
    finally:
        archive.close()


# -- registry, through skopeo -----------------------------------------------------------------------

_FATAL = re.compile(r'msg="((?:[^"\\]|\\.)*)"')


def skopeo_error(stderr: str) -> str:
    """skopeo's last complaint, as one line (the msg of a logrus 'level=fatal' line where there is one)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else "skopeo failed without a message"
    found = _FATAL.search(last)
    if found:
        try:
            last = json.loads(f'"{found.group(1)}"')
        except ValueError:
            last = found.group(1)
    return " ".join(last.split())[:1000]


def registry_host(ref: str) -> str:
    """The registry a docker reference names: its first component when that is a host, else Docker Hub."""
    first, sep, _ = ref.partition("/")
    return first if sep and ("." in first or ":" in first or first == "localhost") else "docker.io"


def pull_timeout() -> float:
    """Seconds a docker:// pull may take: $COLDSTART_PULL_TIMEOUT, else PULL_TIMEOUT."""
    raw = os.environ.get("COLDSTART_PULL_TIMEOUT", "").strip()
    if not raw:
        return PULL_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise InvalidSource(f"COLDSTART_PULL_TIMEOUT must be a number of seconds > 0, not {raw!r}")
    return value


def pull_to_layout(ref: str, workdir: str, *, tls_verify: bool, timeout: float | None = None) -> str:
    """Copy docker://ref into an OCI layout under workdir with skopeo; returns the layout directory.

    The whole copy must finish within timeout seconds (pull_timeout() by default): skopeo is given
    that deadline itself and is killed KILL_GRACE seconds after it, so a registry that stalls cannot
    hang the import.
    """
    if shutil.which("skopeo") is None:
        raise InvalidSource("docker:// sources need skopeo, which is not installed")
    limit = pull_timeout() if timeout is None else timeout
    cmd = ["skopeo", "--command-timeout", f"{max(int(limit * 1000), 1)}ms", "copy", "--quiet"]
    if not tls_verify:
        cmd.append("--src-tls-verify=false")
    cmd += [f"docker://{ref}", "oci:pulled:latest"]  # relative: a ':' in workdir cannot confuse skopeo
    started = time.monotonic()
    try:
        done = subprocess.run(cmd, cwd=workdir, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, errors="replace", timeout=limit + KILL_GRACE)
    except subprocess.TimeoutExpired:
        done = None  # subprocess.run has killed skopeo
    if done is None or (done.returncode != 0 and time.monotonic() - started >= limit):
        raise InvalidSource(f"docker://{ref}: registry {registry_host(ref)} did not deliver the image "
                            f"within {limit:g} s")
    if done.returncode != 0:
        raise InvalidSource(f"docker://{ref}: {skopeo_error(done.stderr)}")
    return os.path.join(workdir, "pulled")

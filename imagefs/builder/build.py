"""Build a spec's images step by step, with a step cache kept in the store.

A step's cache key is the digest of its parent image ID and its definition (which, for copies,
includes the digest of the copied content). Hits cost one small GET. Command steps run in a
container on a lazy mount of the parent (through an Executor); the container's overlay upper
directory is the step's diff, merged into a child image that reuses every unchanged chunk.
A failed or interrupted build moves no tag: tags are set by the caller only after build() returns.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol

from imagefs import chunks as blobs
from imagefs.builder.diff import apply_upper, tree_from_index
from imagefs.builder.spec import Base, Image, SpecError, Step, local_files
from imagefs.chunks import Digest
from imagefs.errors import BlobNotFound, ImageFSError
from imagefs.images import load_index
from imagefs.importers import open_source
from imagefs.index import ImageConfig, ImageIndex
from imagefs.store.base import BlobStore
from imagefs.tree import FileSource, Node, new_dir, normalise
from imagefs.writer import write_image

CACHE_VERSION = 1
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}

log = logging.getLogger(__name__)


class StepFailed(ImageFSError):
    """A command step exited non-zero; the message carries the step and the tail of its log."""

    exit_code = 6


@dataclass
class StepRun:
    """What an Executor returns: the exit code, the kept upper dir, and the log's last lines."""

    exit_code: int
    upper: Path | None
    log_tail: list[str]


class Executor(Protocol):
    def run_step(self, image_id: Digest, script: str, env: dict[str, str], mounts: list[tuple[str, str]],
                 log: Callable[[bytes], None]) -> StepRun:
        """Run `sh -c script` in a container on image_id; keep and return its upper directory."""

    def discard(self, upper: Path) -> None:
        """Remove a kept upper directory."""


@dataclass
class StepEvent:
    index: int
    total: int
    step: str
    cached: bool = False
    seconds: float = 0.0
    image: str = ""


@dataclass
class BuildOptions:
    force: bool = False
    ca_bundle: Path | None = None
    on_event: Callable[[str, StepEvent], None] = lambda kind, ev: None
    log: Callable[[bytes], None] = lambda data: None


@dataclass
class BuildResult:
    image: Digest
    steps: list[StepEvent] = field(default_factory=list)
    uploaded_bytes: int = 0  # new chunks and indexes written by the steps that ran (stored bytes)


def cache_key(parent: str, definition: dict[str, Any]) -> str:
    doc = json.dumps({"v": CACHE_VERSION, "parent": parent, "step": definition}, sort_keys=True)
    return blobs.digest_of(doc.encode())


class Builder:
    def __init__(self, store: BlobStore, executor: Executor | None, options: BuildOptions) -> None:
        self.store, self.executor, self.opts = store, executor, options

    def build(self, image: Image) -> BuildResult:
        total = len(image.steps) + 1
        result = BuildResult(Digest(""))
        current = self._cached_or(0, total, f"base {image.base.kind} {image.base.ref}", "",
                                  _base_definition(image.base), lambda: self._make_base(image.base), result)
        for i, step in enumerate(image.steps, 1):
            parent = current
            current = self._cached_or(i, total, step.describe(), parent, step.definition(),
                                      lambda: self._make_step(parent, step, result), result)
        result.image = current
        return result

    def _cached_or(self, i: int, total: int, label: str, parent: str, definition: dict[str, Any],
                   make: Callable[[], Digest], result: BuildResult) -> Digest:
        ev = StepEvent(i, total, label)
        key = cache_key(parent, definition)
        hit = None if self.opts.force else self._lookup(key)
        self.opts.on_event("start", ev)
        t0 = time.monotonic()
        if hit is not None:
            ev.cached, ev.image = True, hit
        else:
            ev.image = make()
            self._remember(key, ev.image, label)
        ev.seconds = round(time.monotonic() - t0, 3)
        self.opts.on_event("done", ev)
        result.steps.append(ev)
        return Digest(ev.image)

    def _lookup(self, key: str) -> Digest | None:
        """The image a step-cache entry names, or None (a miss) if there is none, it is malformed,
        or its image is gone from the store."""
        try:
            blob = self.store.get(f"buildcache/{key}")
        except BlobNotFound:
            return None
        image = _cached_image(blob)
        if image is None:
            log.warning("ignoring malformed step-cache entry buildcache/%s; rebuilding the step", key)
            return None
        if self.store.exists(blobs.index_key(image)):
            return Digest(image)
        return None

    def _remember(self, key: str, image: str, label: str) -> None:
        doc = {"image": image, "step": label, "created": time.time()}
        self.store.put(f"buildcache/{key}", json.dumps(doc, sort_keys=True).encode())

    # -- bases ----------------------------------------------------------------------------------
    def _make_base(self, base: Base) -> Digest:
        if base.kind == "debootstrap":
            return self._debootstrap(base)
        spec = {"registry": f"docker://{base.ref}", "oci": f"oci:{base.ref}", "rootfs": base.ref}[base.kind]
        if base.kind == "rootfs" and not os.path.isdir(base.ref):
            raise SpecError(f"from_rootfs: {base.ref} is not a directory")
        with open_source(spec, tls_verify=base.tls_verify) as imp:
            return write_image(self.store, imp.tree, imp.config)[0]

    def _debootstrap(self, base: Base) -> Digest:
        from imagefs.builder.debian import debootstrap

        with tempfile.TemporaryDirectory(prefix="coldstart-debootstrap-", dir="/var/tmp") as tmp:
            root = Path(tmp) / "root"
            debootstrap(base.ref, base.variant, list(base.packages), root, log=self.opts.log)
            with open_source(str(root)) as imp:
                config = ImageConfig(env=["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                                     cmd=["/bin/bash"])
                return write_image(self.store, imp.tree, config)[0]

    # -- steps ----------------------------------------------------------------------------------
    def _make_step(self, parent: Digest, step: Step, result: BuildResult) -> Digest:
        index = load_index(self.store, parent)
        if step.runs_command:
            return self._run_command(parent, index, step, result)
        if step.kind in ("copy_local_file", "copy_local_dir"):
            return self._copy(index, step, result)
        return self._with_config(index, _config_after(index.config, step), step, result)

    def _with_config(self, index: ImageIndex, config: ImageConfig, step: Step, result: BuildResult) -> Digest:
        tree = tree_from_index(index)
        if step.kind == "workdir":
            _ensure_dir(tree, step.args[0])
        image, stats = write_image(self.store, tree, config)
        result.uploaded_bytes += stats.new_bytes + stats.index_bytes
        return image

    def _copy(self, index: ImageIndex, step: Step, result: BuildResult) -> Digest:
        tree = tree_from_index(index)
        dest = step.args[1]
        for rel, host in local_files(step):
            target = dest if not rel else f"{dest}/{rel}"
            parts = normalise(target)
            _ensure_dir(tree, "/" + "/".join(p.decode() for p in parts[:-1]))
            tree.put(parts, _host_node(host))
        image, stats = write_image(self.store, tree, index.config)
        result.uploaded_bytes += stats.new_bytes + stats.index_bytes
        return image

    def _run_command(self, parent: Digest, index: ImageIndex, step: Step, result: BuildResult) -> Digest:
        if self.executor is None:
            raise SpecError("command steps need a container runtime (runc)")
        script, env, mounts = _command_of(step, index.config, self.opts.ca_bundle)
        run = self.executor.run_step(parent, script, env, mounts, self.opts.log)
        try:
            if run.exit_code != 0:
                tail = "\n".join("    " + line for line in run.log_tail)
                raise StepFailed(f"step failed with exit code {run.exit_code}: {step.describe()}\n{tail}")
            assert run.upper is not None
            tree = tree_from_index(index)
            apply_upper(tree, run.upper)
            image, stats = write_image(self.store, tree, index.config)
            result.uploaded_bytes += stats.new_bytes + stats.index_bytes
            return image
        finally:
            if run.upper is not None:
                self.executor.discard(run.upper)


def _cached_image(blob: bytes) -> str | None:
    """The image ID in a step-cache entry; None unless it is a JSON object naming a valid ID."""
    try:
        doc = json.loads(blob)
    except ValueError:
        return None
    image = doc.get("image") if isinstance(doc, dict) else None
    return image if isinstance(image, str) and blobs.is_digest(image) else None


def _base_definition(base: Base) -> dict[str, Any]:
    """A base's cache key input. A host directory (rootfs or OCI layout) is keyed by a metadata
    fingerprint of every entry (path, type, mode, owner, size, mtime, inode), which changes when any
    file is replaced or edited; a registry base by its manifest digest; debootstrap by definition."""
    if base.kind in ("rootfs", "oci"):
        return {**base.definition(), "fingerprint": tree_fingerprint(base.ref.split(":")[0])}
    if base.kind == "registry":
        return {**base.definition(), "digest": _registry_digest(base)}
    return base.definition()


def tree_fingerprint(top: str) -> str:
    if not os.path.isdir(top):
        raise SpecError(f"{top} is not a directory")
    h = []
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames.sort()
        for name in [*dirnames, *sorted(filenames)]:
            st = os.lstat(os.path.join(dirpath, name))
            h.append(f"{dirpath}/{name}\0{st.st_mode}\0{st.st_uid}\0{st.st_gid}\0{st.st_size}\0"
                     f"{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}")
    return blobs.digest_of("\n".join(h).encode())


def _registry_digest(base: Base) -> str:
    cmd = ["skopeo", "inspect", "--format", "{{.Digest}}", f"docker://{base.ref}"]
    if not base.tls_verify:
        cmd.insert(2, "--tls-verify=false")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise SpecError(f"from_registry({base.ref}): {r.stderr.strip().splitlines()[-1:] or ['skopeo failed']}")
    return r.stdout.strip()


def _config_after(cfg: ImageConfig, step: Step) -> ImageConfig:
    if step.kind == "env":
        new = dict(step.args)
        env = [e for e in cfg.env if e.split("=", 1)[0] not in new] + [f"{k}={v}" for k, v in step.args]
        return replace(cfg, env=env)
    if step.kind == "workdir":
        return replace(cfg, working_dir=step.args[0])
    if step.kind == "entrypoint":
        return replace(cfg, entrypoint=list(step.args))
    if step.kind == "cmd":
        return replace(cfg, cmd=list(step.args))
    if step.kind == "user":
        return replace(cfg, user=step.args[0])
    raise SpecError(f"unknown step {step.kind}")


def _ensure_dir(tree: Any, path: str) -> None:
    parts = normalise(path)
    node = tree.root
    for i, p in enumerate(parts):
        child = node.children.get(p)
        if child is None:
            child = node.children[p] = new_dir(0o755, mtime_ns=time.time_ns())
        elif not child.is_dir:
            raise SpecError(f"{'/' + '/'.join(x.decode() for x in parts[:i + 1])} exists and is not a directory")
        node = child


def _host_node(path: Path) -> Node:
    st = path.lstat()
    node = Node(mode=st.st_mode, uid=0, gid=0, mtime_ns=st.st_mtime_ns)
    if stat.S_ISLNK(st.st_mode):
        node.target = os.fsencode(os.readlink(path))
    elif stat.S_ISREG(st.st_mode):
        node.source = FileSource(os.fsencode(path), st.st_size)
    else:
        raise SpecError(f"copy: {path} is not a regular file or symlink")
    return node


CA_PATH = "/run/coldstart/ca-bundle.crt"


def _command_of(step: Step, cfg: ImageConfig, ca: Path | None) -> tuple[str, dict[str, str], list[tuple[str, str]]]:
    """The shell script, extra environment and host mounts of a command step."""
    env, mounts = dict(APT_ENV), []
    if ca is not None:
        mounts.append((str(ca), CA_PATH))
        env.update(SSL_CERT_FILE=CA_PATH, PIP_CERT=CA_PATH, REQUESTS_CA_BUNDLE=CA_PATH, CURL_CA_BUNDLE=CA_PATH)
    if step.kind == "run_commands":
        return "set -e\n" + "\n".join(step.args), env, mounts
    if step.kind == "apt_install":
        pk = " ".join(shlex.quote(p) for p in step.args)
        ca_opt = f" -o Acquire::https::CAInfo={CA_PATH}" if ca else ""
        return (f"set -e\napt-get{ca_opt} update -qq\n"
                f"apt-get{ca_opt} install -y -q --no-install-recommends {pk}\n"
                "rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin\n"), env, mounts
    opts = step.opts
    args = ["python3", "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
            "--root-user-action=ignore", "--break-system-packages"]
    for name in ("index_url", "extra_index_url", "find_links"):
        if opts.get(name):
            args += ["--" + name.replace("_", "-"), opts[name]]
    if opts.get("find_links", "").startswith("/"):
        mounts.append((opts["find_links"], opts["find_links"]))
    if opts.get("pre"):
        args.append("--pre")
    args += list(step.args)
    return "set -e\n" + " ".join(shlex.quote(a) for a in args) + "\n", env, mounts

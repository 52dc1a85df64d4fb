"""Image specs written in Python, the way Modal users write them. Immutable values: every method
returns a new Image. Nothing runs until `coldstart build` builds the spec.

    from imagefs import Image
    app = Image.debian_slim(python_version="3.11").pip_install("numpy").cmd(["python3"])
"""
from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from imagefs.chunks import digest_of
from imagefs.errors import ImageFSError
from imagefs.regular import kind_of

SUPPORTED_PYTHON = {"bookworm": "3.11"}
SLIM_PACKAGES = ("python3", "python3-pip", "python3-venv", "ca-certificates")


class SpecError(ImageFSError):
    """A spec that cannot be built as written (bad argument, missing copy source, ...)."""

    exit_code = 2


# -- bases ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Base:
    kind: str  # registry | oci | rootfs | debootstrap
    ref: str  # registry ref, layout path, rootfs dir, or suite
    variant: str = "minbase"
    packages: tuple[str, ...] = ()
    tls_verify: bool = True

    def definition(self) -> dict[str, Any]:
        d: dict[str, Any] = {"base": self.kind, "ref": self.ref}
        if self.kind == "debootstrap":
            d.update(variant=self.variant, packages=list(self.packages))
        if self.kind == "registry":
            d["tls_verify"] = self.tls_verify
        return d


# -- steps ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    kind: str
    args: tuple[Any, ...] = ()
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    @property
    def runs_command(self) -> bool:
        return self.kind in ("apt_install", "pip_install", "run_commands")

    def describe(self) -> str:
        args = " ".join(str(a) for a in self.args)
        return f"{self.kind} {args}".strip()

    def definition(self) -> dict[str, Any]:
        """What the step's cache key covers; copies include the digest of what they copy."""
        d: dict[str, Any] = {"kind": self.kind, "args": list(self.args), "options": self.opts}
        if self.kind in ("copy_local_file", "copy_local_dir"):
            d["content"] = content_digest(self)
        return d


def _opts(**kw: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, _freeze(v)) for k, v in kw.items() if v not in (None, False, (), [])))


def _freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def _strings(values: Iterable[Any], what: str) -> tuple[str, ...]:
    out = tuple(values)
    for v in out:
        if not isinstance(v, str) or not v:
            raise SpecError(f"{what}: expected non-empty strings, got {v!r}")
    return out


@dataclass(frozen=True)
class Image:
    base: Base
    steps: tuple[Step, ...] = field(default=())

    # -- bases ----------------------------------------------------------------------------------
    @staticmethod
    def from_registry(ref: str, *, tls_verify: bool = True) -> "Image":
        return Image(Base("registry", ref, tls_verify=tls_verify))

    @staticmethod
    def from_oci(path: str) -> "Image":
        return Image(Base("oci", str(Path(path).resolve())))

    @staticmethod
    def from_rootfs(path: str) -> "Image":
        return Image(Base("rootfs", str(Path(path).resolve())))

    @staticmethod
    def debootstrap(suite: str = "bookworm", variant: str = "minbase",
                    packages: Sequence[str] = ()) -> "Image":
        return Image(Base("debootstrap", suite, variant, tuple(sorted(_strings(packages, "packages")))))

    @staticmethod
    def debian_slim(python_version: str | None = None, suite: str = "bookworm") -> "Image":
        """Debian with python3, pip and venv. python_version must be the suite's own python3."""
        have = SUPPORTED_PYTHON.get(suite)
        if python_version is not None and python_version != have:
            raise SpecError(f"debian_slim({suite}) provides Python {have}, not {python_version}")
        return Image.debootstrap(suite, "minbase", SLIM_PACKAGES)

    # -- steps ----------------------------------------------------------------------------------
    def _then(self, step: Step) -> "Image":
        return replace(self, steps=self.steps + (step,))

    def apt_install(self, *packages: str) -> "Image":
        return self._then(Step("apt_install", _strings(packages, "apt_install")))

    def pip_install(self, *packages: str, index_url: str | None = None,
                    extra_index_url: str | None = None, find_links: str | None = None,
                    pre: bool = False) -> "Image":
        return self._then(Step("pip_install", _strings(packages, "pip_install"),
                               _opts(index_url=index_url, extra_index_url=extra_index_url,
                                     find_links=find_links, pre=pre)))

    def run_commands(self, *commands: str) -> "Image":
        return self._then(Step("run_commands", _strings(commands, "run_commands")))

    def env(self, vars: Mapping[str, str]) -> "Image":
        if not isinstance(vars, Mapping) or not all(isinstance(k, str) and "=" not in k and k
                                                    for k in vars):
            raise SpecError(f"env: expected a mapping of names to strings, got {vars!r}")
        return self._then(Step("env", tuple(sorted((k, str(v)) for k, v in vars.items()))))

    def workdir(self, path: str) -> "Image":
        return self._then(Step("workdir", (_abs(path, "workdir"),)))

    def copy_local_file(self, local_path: str, remote_path: str) -> "Image":
        return self._then(Step("copy_local_file", (str(Path(local_path).resolve()), _abs(remote_path, "copy"))))

    def copy_local_dir(self, local_path: str, remote_path: str, ignore: Sequence[str] = ()) -> "Image":
        return self._then(Step("copy_local_dir", (str(Path(local_path).resolve()), _abs(remote_path, "copy")),
                               _opts(ignore=tuple(_strings(ignore, "ignore")))))

    def entrypoint(self, args: Sequence[str]) -> "Image":
        return self._then(Step("entrypoint", _strings(args, "entrypoint")))

    def cmd(self, args: Sequence[str]) -> "Image":
        return self._then(Step("cmd", _strings(args, "cmd")))

    def user(self, user: str) -> "Image":
        return self._then(Step("user", _strings([user], "user")))


def _abs(path: str, what: str) -> str:
    if not isinstance(path, str) or not path.startswith("/"):
        raise SpecError(f"{what}: container path must be absolute, got {path!r}")
    return os.path.normpath(path)


# -- local content ---------------------------------------------------------------------------------
def ignored(rel: str, patterns: Sequence[str]) -> bool:
    """A relative path matches an ignore pattern (fnmatch on the path or on any of its names)."""
    parts = rel.split("/")
    return any(fnmatch.fnmatch(rel, p) or any(fnmatch.fnmatch(x, p) for x in parts) for p in patterns)


def _refuse_special(path: Path, what: str) -> None:
    """SpecError for a FIFO, socket or device, found by lstat alone: reading one could block forever."""
    mode = path.lstat().st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
        raise SpecError(f"{what}: {path} is {kind_of(mode)}; only regular files, directories and symlinks "
                        "can be copied")


def local_files(step: Step) -> list[tuple[str, Path]]:
    """(relative path, host path) of what a copy step copies, sorted; SpecError if a source is
    missing or holds a FIFO, socket or device (checked with lstat, never opened)."""
    src = Path(step.args[0])
    if step.kind == "copy_local_file":
        if src.exists():
            _refuse_special(src, step.kind)
        if not src.is_file():
            raise SpecError(f"copy_local_file: {src} does not exist or is not a file")
        return [("", src)]
    if not src.is_dir():
        raise SpecError(f"copy_local_dir: {src} does not exist or is not a directory")
    patterns = step.opts.get("ignore", ())
    out = []
    for dirpath, dirnames, filenames in os.walk(src):
        rel_dir = os.path.relpath(dirpath, src)
        dirnames[:] = sorted(d for d in dirnames if not ignored(os.path.normpath(f"{rel_dir}/{d}"), patterns))
        for name in sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]):
            rel = os.path.normpath(f"{rel_dir}/{name}")
            if not ignored(rel, patterns):
                path = Path(dirpath) / name
                _refuse_special(path, step.kind)
                out.append((rel, path))
    return out


def content_digest(step: Step) -> str:
    """Digest of names, modes and contents of everything a copy step copies."""
    parts = []
    for rel, path in local_files(step):
        st = path.lstat()
        if stat.S_ISLNK(st.st_mode):
            body = os.fsencode(os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            body = path.read_bytes()
        else:  # replaced since local_files looked
            raise SpecError(f"{step.kind}: {path} is no longer a regular file or symlink")
        parts.append(f"{rel}\0{st.st_mode:o}\0{digest_of(body)}")
    return digest_of("\n".join(parts).encode())

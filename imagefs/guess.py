"""A start-up working set guessed from an image's index and the command it will run, for images
that have no recorded profile (imagefs.profile): what to prefetch before the first read asks.

The guess looks only at the index (paths, sizes, chunks), never at file contents:
  1. the executable, found on PATH and through symlinks as the kernel would;
  2. for a Python interpreter: the compiled standard library it loads at start-up (the top-level
     __pycache__, encodings) and its extension modules (lib-dynload);
  3. the packages the command imports (``python -c CODE`` parsed for import statements, or
     ``-m MODULE``), found in the interpreter's site and dist-packages directories: their compiled
     modules (every __pycache__ *.pyc, package roots first), then their shared libraries and
     those of ``NAME.libs`` beside them, smallest first.
Chunks come out in that order, each once, up to a byte budget. It is a guess: a recorded profile
(``coldstart profile record``) is exact and wins whenever the image has one.
"""
from __future__ import annotations

import ast
import posixpath
import re
import stat
from dataclasses import dataclass
from typing import Iterator

from imagefs.chunks import Digest
from imagefs.index import ROOT_INO, ImageIndex

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Bytes of chunks to prefetch. On `import torch` (torch image, 315 MB of chunks read) a budget of
# 128 / 256 / 512 MB covers 35 / 65 / 95 % of those bytes at 82 / 77 / 56 % precision, and the time
# to ready against no prefetch was (bench, 3 repeats) loopback 1.06 / 0.96 / 1.21x, regional
# 0.88 / 0.85 / 0.79x. 256 MB (the memory tier's size) helps on a real network and costs nothing
# on loopback, where a wrong guess competes for the 2 CPUs with the start-up itself.
DEFAULT_BUDGET = 256 << 20
MAX_LINKS = 40
_PYTHON = re.compile(rb"python(\d+(?:\.\d+)?)?$")
_SHARED_LIB = re.compile(rb"\.so(\.\d+)*$")
_LIB_DIRS = (b"/lib64", b"/lib/x86_64-linux-gnu", b"/usr/lib/x86_64-linux-gnu", b"/lib/aarch64-linux-gnu",
             b"/usr/lib/aarch64-linux-gnu", b"/lib", b"/usr/lib")
_CORE_LIB = re.compile(rb"(ld-linux[-\w.]*\.so[.\d]*|lib(c|m|dl|pthread|rt|z|expat|gcc_s|stdc\+\+|gomp|ffi)"
                       rb"\.so[.\d]*|ld-musl-[\w]+\.so\.1)$")
# Parts of the standard library a start-up seldom touches (its compiled modules are left out).
_STDLIB_SKIP = {b"test", b"idlelib", b"tkinter", b"lib2to3", b"ensurepip", b"turtledemo", b"pydoc_data",
                b"site-packages", b"dist-packages", b"config-3"}


@dataclass(frozen=True)
class Guess:
    chunks: list[tuple[Digest, int]]
    files: list[bytes]  # the files the chunks were taken from, in order (for logs and tests)
    executable: bytes | None


def resolve_path(index: ImageIndex, path: bytes, cwd: bytes = b"/") -> tuple[int, bytes] | None:
    """(inode, canonical path) of path inside the image, following symlinks; None if missing."""
    parts = [p for p in posixpath.join(cwd, path).split(b"/") if p]
    ino, here, links = ROOT_INO, b"/", 0
    while parts:
        name = parts.pop(0)
        if name == b".":
            continue
        if name == b"..":
            here = posixpath.dirname(here) or b"/"
            ino = index.resolve(here) or ROOT_INO
            continue
        child = index.lookup(ino, name)
        if child is None:
            return None
        node = index.inode(child)
        if stat.S_ISLNK(node.mode):
            links += 1
            if links > MAX_LINKS:
                return None
            target = node.target
            parts = [p for p in target.split(b"/") if p] + parts
            if target.startswith(b"/"):
                ino, here = ROOT_INO, b"/"
            continue
        ino, here = child, posixpath.join(here, name)
    return ino, here


def find_executable(index: ImageIndex, name: bytes, path_env: str, cwd: bytes = b"/") -> tuple[int, bytes] | None:
    """What execvp would run for name: a path as given, else the first regular file on PATH."""
    if b"/" in name:
        found = resolve_path(index, name, cwd)
        return found if found and index.inode(found[0]).is_reg else None
    for d in path_env.split(":"):
        found = resolve_path(index, posixpath.join(d.encode() or b".", name), cwd)
        if found and index.inode(found[0]).is_reg:
            return found
    return None


def imported_modules(argv: list[str]) -> list[str]:
    """Top-level module names a Python command line imports: -m MODULE, or the imports of -c CODE."""
    for i, arg in enumerate(argv[1:], 1):
        if arg == "-m" and i + 1 < len(argv):
            return [argv[i + 1].split(".")[0]]
        if arg.startswith("-m") and len(arg) > 2:
            return [arg[2:].split(".")[0]]
        if arg == "-c" and i + 1 < len(argv):
            return _imports_of(argv[i + 1])
        if not arg.startswith("-"):
            break  # a script: its imports are in a file the guess does not read
    return []


def _imports_of(code: str) -> list[str]:
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return []
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module.split(".")[0])
    return list(dict.fromkeys(names))


def guess(index: ImageIndex, argv: list[str], path: str = DEFAULT_PATH, cwd: str = "/",
          budget: int = DEFAULT_BUDGET) -> Guess:
    """The guessed start-up chunks of running argv in the image (see the module docstring)."""
    if not argv:
        return Guess([], [], None)
    exe = find_executable(index, argv[0].encode(), path, cwd.encode() or b"/")
    if exe is None:
        return Guess([], [], None)
    files = [exe[1], *_runtime_files(index)]
    version = _python_version(index, exe[1], argv[0].encode())
    if version is not None:
        files += _python_files(index, exe[1], version, imported_modules(argv))
    return Guess(_chunks_of(index, files, budget), files, exe[1])


def _runtime_files(index: ImageIndex) -> list[bytes]:
    """What a dynamically linked program loads first: the loader's cache, the loader, the C
    library and its usual companions, the C.UTF-8 locale."""
    out = [b"/etc/ld.so.cache"]
    for d in _LIB_DIRS:
        out += [p for p in _files_in(index, d, recurse=False) if _CORE_LIB.match(posixpath.basename(p))]
    out += _files_in(index, b"/usr/lib/locale/C.utf8", recurse=True)
    return [p for p in dict.fromkeys(out) if index.resolve(p) is not None]


def _python_version(index: ImageIndex, real: bytes, invoked: bytes) -> bytes | None:
    """'3.11' for a CPython interpreter (from its name, else its standard library directory)."""
    for name in (posixpath.basename(real), posixpath.basename(invoked)):
        m = _PYTHON.match(name)
        if m and m.group(1) and b"." in m.group(1):
            return m.group(1)
    if not any(_PYTHON.match(posixpath.basename(n)) for n in (real, invoked)):
        return None
    for lib in (b"/usr/local/lib", b"/usr/lib"):
        ino = index.resolve(lib)
        for name in sorted(index.children.get(ino, {}) if ino else (), reverse=True):
            m = _PYTHON.match(name)
            if m and m.group(1) and b"." in m.group(1):
                return m.group(1)
    return None


def _python_files(index: ImageIndex, exe: bytes, version: bytes, modules: list[str]) -> list[bytes]:
    prefix = posixpath.dirname(posixpath.dirname(exe))  # /usr for /usr/bin/python3.11
    libs = list(dict.fromkeys([posixpath.join(prefix, b"lib"), b"/usr/local/lib", b"/usr/lib"]))
    stdlibs = [posixpath.join(lib, b"python" + version) for lib in libs]
    out: list[bytes] = []
    for lib in libs:  # libpython, when the interpreter links it
        out += [p for p in _files_in(index, lib, recurse=False) if posixpath.basename(p).startswith(b"libpython")]
    for std in stdlibs:
        out += _files_in(index, posixpath.join(std, b"__pycache__"), recurse=False)
        out += _files_in(index, posixpath.join(std, b"encodings/__pycache__"), recurse=False)
        out += _files_in(index, posixpath.join(std, b"lib-dynload"), recurse=False)
    for std in stdlibs:  # the standard library's packages (re, json, logging, ...)
        for name, child in index.children.get(index.resolve(std) or 0, {}).items():
            if index.inode(child).is_dir and name not in _STDLIB_SKIP and not name.startswith(b"config-"):
                out += [p for p in _files_in(index, posixpath.join(std, name), recurse=True) if p.endswith(b".pyc")]
    site_dirs = [posixpath.join(std, sub) for std in stdlibs for sub in (b"site-packages", b"dist-packages")]
    site_dirs = [d for d in [*site_dirs, b"/usr/lib/python3/dist-packages"] if index.resolve(d)]
    for site in site_dirs:  # what site.py and importlib.metadata read: .pth files, entry points
        for name, child in index.children.get(index.resolve(site) or 0, {}).items():
            path = posixpath.join(site, name)
            if name.endswith(b".pth") or name == b"__pycache__":
                out += [path] if index.inode(child).is_reg else list(_files_in(index, path, recurse=False))
            elif name.endswith(b".dist-info"):
                out.append(posixpath.join(path, b"entry_points.txt"))
    for module in modules:
        out += _module_files(index, site_dirs, module.encode())
    return [p for p in dict.fromkeys(out) if index.resolve(p) is not None]


def _module_files(index: ImageIndex, site_dirs: list[bytes], name: bytes) -> list[bytes]:
    """A package's compiled modules (roots first), then its shared libraries, smallest first."""
    for site in site_dirs:
        pkg = posixpath.join(site, name)
        ino = index.resolve(pkg)
        if ino is not None and index.inode(ino).is_dir:
            everything = list(_files_in(index, pkg, recurse=True))
            pycs = [p for p in everything if p.endswith(b".pyc")]
            roots = [p for p in pycs if posixpath.basename(p).startswith(b"__init__.")]
            root_set = set(roots)
            libs = [p for p in everything if _SHARED_LIB.search(p)]
            libs += [p for p in _files_in(index, pkg + b".libs", recurse=True) if _SHARED_LIB.search(p)]
            libs.sort(key=lambda p: _size_of(index, p))
            return roots + [p for p in pycs if p not in root_set] + libs
        single = [posixpath.join(site, n) for n in index.children.get(index.resolve(site) or 0, {})
                  if n.startswith(name + b".") and (n.endswith(b".py") or _SHARED_LIB.search(n))]
        if single:
            return single
    return []


def _files_in(index: ImageIndex, directory: bytes, *, recurse: bool) -> Iterator[bytes]:
    """Regular files under a directory of the image, in tree order (none if it is missing)."""
    ino = index.resolve(directory)
    if ino is not None and index.inode(ino).is_dir:
        yield from _files_below(index, ino, directory.rstrip(b"/"), recurse)


def _files_below(index: ImageIndex, ino: int, directory: bytes, recurse: bool) -> Iterator[bytes]:
    for name, child in index.children.get(ino, {}).items():
        path = directory + b"/" + name
        node = index.inodes[child - 1]
        if stat.S_ISREG(node.mode):
            yield path
        elif recurse and stat.S_ISDIR(node.mode):
            yield from _files_below(index, child, path, True)


def _size_of(index: ImageIndex, path: bytes) -> int:
    ino = index.resolve(path)
    return index.inode(ino).size if ino is not None else 0


def _chunks_of(index: ImageIndex, files: list[bytes], budget: int) -> list[tuple[Digest, int]]:
    out: list[tuple[Digest, int]] = []
    seen: set[int] = set()
    total = 0
    for path in files:
        ino = index.resolve(path)
        if ino is None:
            continue
        node = index.inode(ino)
        for chunk, _off, _n, _foff in node.extents_for(0, node.size) if node.is_reg else ():
            if chunk in seen:
                continue
            size = index.chunk_sizes[chunk]
            if total + size > budget:
                return out
            seen.add(chunk)
            total += size
            out.append((index.chunks[chunk], size))
    return out

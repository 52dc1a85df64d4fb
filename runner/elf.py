"""Read DT_SONAME from a 64-bit little-endian ELF shared library (enough for driver libraries)."""
from __future__ import annotations

import struct
from pathlib import Path

_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_STRTAB, _DT_SONAME = 0, 5, 14


def soname(path: Path) -> str | None:
    """The library's DT_SONAME, or None (not ELF64 LE, no dynamic section, unreadable)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    try:
        return _soname(data)
    except (struct.error, IndexError, UnicodeDecodeError):
        return None


def _soname(data: bytes) -> str | None:
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    loads, dynamic = [], None
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == _PT_LOAD:
            loads.append((p_vaddr, p_offset, p_filesz))
        elif p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return None
    strtab = name_off = None
    for off in range(dynamic[0], dynamic[0] + dynamic[1], 16):
        tag, value = struct.unpack_from("<qQ", data, off)
        if tag == _DT_NULL:
            break
        if tag == _DT_STRTAB:
            strtab = value
        elif tag == _DT_SONAME:
            name_off = value
    if strtab is None or name_off is None:
        return None
    start = _file_offset(loads, strtab) + name_off
    return data[start:data.index(b"\0", start)].decode()


def _file_offset(loads: list[tuple[int, int, int]], vaddr: int) -> int:
    for seg_vaddr, seg_offset, size in loads:
        if seg_vaddr <= vaddr < seg_vaddr + size:
            return vaddr - seg_vaddr + seg_offset
    return vaddr  # some linkers leave file offsets in DT_STRTAB

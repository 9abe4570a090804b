"""The shared libraries an ELF object asks the dynamic loader for (its DT_NEEDED entries).

The compile Job reads them from each package's wrapper library: one that does not load a shared C++
runtime carries its own copy of libstdc++, and two copies in one process (the package's and torch's)
crash on first use of std::locale (std::regex in the package's constructor). Read from the bytes, so
no binutils are needed; 64-bit little-endian ELF (x86-64, aarch64) only.
"""

from __future__ import annotations

import struct

_PT_LOAD, _PT_DYNAMIC = 1, 2
_DT_NULL, _DT_NEEDED, _DT_STRTAB = 0, 1, 5
CXX_RUNTIMES = ("libstdc++.so", "libc++.so")


class NotElf(ValueError):
    """The bytes are not a 64-bit little-endian ELF object, or it is cut short."""


def needed_libraries(data: bytes) -> list[str]:
    """DT_NEEDED names in order; raises NotElf for anything this reader does not handle."""
    if data[:4] != b"\x7fELF" or data[4:6] != b"\x02\x01":
        raise NotElf("not a 64-bit little-endian ELF object")
    try:
        (phoff,) = struct.unpack_from("<Q", data, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
        loads: list[tuple[int, int, int]] = []  # (vaddr, offset, filesz)
        dynamic: tuple[int, int] | None = None
        for i in range(phnum):
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
                "<IIQQQQ", data, phoff + i * phentsize
            )
            if p_type == _PT_LOAD:
                loads.append((p_vaddr, p_offset, p_filesz))
            elif p_type == _PT_DYNAMIC:
                dynamic = (p_offset, p_filesz)
        if dynamic is None:
            return []  # statically linked: needs nothing
        needed: list[int] = []
        strtab = None
        for off in range(dynamic[0], dynamic[0] + dynamic[1], 16):
            tag, val = struct.unpack_from("<qQ", data, off)
            if tag == _DT_NULL:
                break
            if tag == _DT_NEEDED:
                needed.append(val)
            elif tag == _DT_STRTAB:
                strtab = val
        if strtab is None:
            raise NotElf("dynamic section without a string table")
        base = next((o + strtab - v for v, o, n in loads if v <= strtab < v + n), None)
        if base is None:
            raise NotElf("string table outside every loaded segment")
        names = []
        for at in needed:
            end = data.index(b"\0", base + at)
            names.append(data[base + at : end].decode("utf-8", "replace"))
        return names
    except NotElf:
        raise
    except (struct.error, ValueError) as e:  # a read past the end, a name without its NUL
        raise NotElf(f"truncated or malformed ELF object ({e})") from None

"""The compile Job's check that a package's libraries load a shared C++ runtime (esper.tezzeret.elf)."""

from __future__ import annotations

import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch

from esper.tezzeret.compile import _check_package
from esper.tezzeret.elf import NotElf, needed_libraries
from esper.tezzeret.exitcodes import CompilerUnusable

TORCH_LIB = Path(torch.__file__).parent / "lib"
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")


def _readelf_needed(path: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.*?)\]", out)


@pytest.mark.skipif(shutil.which("readelf") is None, reason="needs binutils' readelf")
@pytest.mark.parametrize("name", ["libtorch_cpu.so", "libc10.so", "libtorch_python.so"])
def test_needed_libraries_agree_with_readelf(name: str) -> None:
    path = TORCH_LIB / name
    want = _readelf_needed(path)
    assert want, "readelf found no NEEDED entries: the expected value would be empty"
    assert needed_libraries(path.read_bytes()) == want


@pytest.mark.parametrize(
    "data",
    [b"", b"MZ\x90\x00" + bytes(60), b"\x7fELF\x01\x01" + bytes(58), b"\x7fELF\x02\x02" + bytes(58)],
)
def test_what_is_not_a_64_bit_little_endian_elf_is_refused(data: bytes) -> None:
    with pytest.raises(NotElf):
        needed_libraries(data)


def test_a_cut_short_elf_is_refused() -> None:
    whole = (TORCH_LIB / "libc10.so").read_bytes()
    for size in (64, 0x40 + 8):  # the header alone; the header and part of a program header
        with pytest.raises(NotElf):
            needed_libraries(whole[:size])


def _library(tmp_path: Path, name: str, *flags: str) -> Path:
    src = tmp_path / "lib.cpp"
    src.write_text(
        '#include <regex>\n#include <string>\nextern "C" int matches(const char* s) '
        '{ return std::regex_match(std::string(s), std::regex("[a-z]+")); }\n'
    )
    out = tmp_path / name
    subprocess.run(["g++", "-shared", "-fPIC", "-O0", *flags, str(src), "-o", str(out)], check=True)
    return out


def _package(tmp_path: Path, lib: Path) -> Path:
    pkg = tmp_path / f"{lib.stem}.pt2"
    with zipfile.ZipFile(pkg, "w") as zf:
        zf.writestr("pkg/archive_format", "pt2")
        zf.write(lib, "pkg/data/aotinductor/model/abc.wrapper.so")
        zf.writestr("pkg/data/aotinductor/model/abc.wrapper.cpp", "// source")
    return pkg


@needs_gxx
def test_a_package_carrying_its_own_libstdcxx_is_refused(tmp_path: Path) -> None:
    shared = _library(tmp_path, "shared.so")
    static = _library(tmp_path, "static.so", "-static-libstdc++")
    if shutil.which("readelf"):  # the two builds differ as the test means them to
        assert "libstdc++.so.6" in _readelf_needed(shared) and "libstdc++.so.6" not in _readelf_needed(static)
    _check_package(_package(tmp_path, shared))
    with pytest.raises(CompilerUnusable, match=r"abc\.wrapper\.so loads no shared C\+\+ runtime"):
        _check_package(_package(tmp_path, static))


def test_a_package_with_a_pickle_is_still_refused(tmp_path: Path) -> None:
    pkg = tmp_path / "p.pt2"
    with zipfile.ZipFile(pkg, "w") as zf:
        zf.writestr("pkg/data/weights.pkl", b"\x80\x04K\x01.")
    with pytest.raises(RuntimeError, match="unexpected members"):
        _check_package(pkg)

"""keep_freed_memory: glibc keeps freed blocks for reuse, as observed through glibc's own mallinfo2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from esper.tezzeret import bench

# Runs in a child: the thresholds are process-wide and are not undone.
PROBE = r"""
import ctypes, json, sys
from esper.tezzeret.bench import keep_freed_memory

libc = ctypes.CDLL(None)
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 48 << 20  # above glibc's largest dynamic mmap threshold (32 MiB): mmapped under the defaults

def probe():
    before = libc.mallinfo2()
    block = libc.malloc(SIZE)
    during = libc.mallinfo2()
    libc.free(block)
    after = libc.mallinfo2()
    return {"mmapped": during.hblks - before.hblks, "heapKeptAfterFree": after.arena - before.arena}

first = probe()
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
print(json.dumps({"kept": kept, "defaults": first, "then": probe()}))
"""


def run_probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


glibc_only = pytest.mark.skipif(not bench.is_glibc(), reason="glibc's allocator only")


@glibc_only
def test_freed_memory_is_kept_in_the_heap_instead_of_unmapped() -> None:
    got = run_probe("keep")
    assert got["kept"] is True
    assert got["defaults"] == {"mmapped": 1, "heapKeptAfterFree": 0}  # glibc's defaults, before
    then = got["then"]
    assert then["mmapped"] == 0  # served from the heap ...
    # ... and kept there after the free, not trimmed (less whatever free space the heap had at its top)
    assert then["heapKeptAfterFree"] > 32 << 20


@glibc_only
def test_without_the_call_the_defaults_stay() -> None:
    got = run_probe("defaults")
    assert got["then"] == {"mmapped": 1, "heapKeptAfterFree": 0}


def test_not_glibc_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def unknown(name: str) -> str:
        raise ValueError(f"unrecognized configuration name {name!r}")

    monkeypatch.setattr(bench.os, "confstr", unknown)
    assert bench.keep_freed_memory() is False
    monkeypatch.setattr(bench.os, "confstr", lambda name: None)  # musl answers nothing
    assert bench.keep_freed_memory() is False

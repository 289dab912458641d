"""The service pins glibc's mmap threshold: a large buffer freed is given back to the system, and
the next one of that size is mapped again instead of being carved out of the heap."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import pytest

from tests.training.conftest import ROOT

PROBE = """
import ctypes, sys
from service.memory import fix_mmap_threshold
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split())]

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
size = 3 << 20  # an activation of a few MB
libc.free(libc.malloc(size))  # mapped (above the initial threshold), then unmapped
before = libc.mallinfo2().hblks
p = libc.malloc(size)  # the same size again: mapped, or from the heap?
print(libc.mallinfo2().hblks - before)
libc.free(p)
"""


def mapped_blocks(mode: str) -> int:
    env = {
        k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.strip())


@pytest.mark.skipif(
    not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33 (mallinfo2)"
)
def test_large_buffers_stay_mapped_with_the_fixed_threshold():
    assert mapped_blocks("default") == 0  # glibc's adjustment: the second buffer is heap
    assert mapped_blocks("fixed") == 1  # pinned: mapped again, unmapped on free


def test_operator_choice_is_kept(monkeypatch):
    from service.memory import fix_mmap_threshold

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert fix_mmap_threshold() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert fix_mmap_threshold() is False

"""Process memory: large buffers are mapped and unmapped, never parked in the malloc heap.

glibc serves allocations above a threshold with ``mmap`` and returns them to the system on
``free``, but by default it raises that threshold to the size of every such buffer freed, so after
a few batches the model's activations (megabytes each, a different mix for every batch size) are
carved out of the heap, whose fragments it does not give back. The service's resident memory
then climbs in steps for minutes and sits near twice what it needs. Setting the threshold
explicitly turns that adjustment off.
"""

from __future__ import annotations

import ctypes
import os

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold; False where that is not possible (not glibc) or where the
    operator chose one (``MALLOC_MMAP_THRESHOLD_`` or ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold``)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return mallopt(M_MMAP_THRESHOLD, nbytes) == 1

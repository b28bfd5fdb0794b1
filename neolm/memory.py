"""Weights in transparent huge pages (Linux): decoding streams every weight once per token, and with 4 KiB
pages the TLB misses cost ~20% of the bandwidth on a 1.4B model (bench/PROFILE.md).

PyTorch asks for huge pages only when THP_MEM_ALLOC_ENABLE=1 is set before it starts; `huge_empty`
advises them for one tensor's memory before it is first written, which works wherever the kernel's THP
mode is `always` or `madvise` and is a no-op elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap
import sys

import torch

log = logging.getLogger(__name__)

HUGE = 2 << 20  # bytes in a huge page (x86-64, aarch64 with 4 KiB base pages)
MIN_BYTES = 4 * HUGE  # smaller tensors are not worth it


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask the kernel to back t's (not yet touched) CPU memory with huge pages; False where it cannot."""
    madvise = _madvise()
    nbytes = t.untyped_storage().nbytes()
    if madvise is None or t.device.type != "cpu" or nbytes < MIN_BYTES:
        return False
    start = t.untyped_storage().data_ptr()
    lo, hi = -(-start // HUGE) * HUGE, (start + nbytes) // HUGE * HUGE  # whole huge pages inside
    if hi <= lo:
        return False
    if madvise(lo, hi - lo, mmap.MADV_HUGEPAGE) != 0:
        log.debug("madvise(MADV_HUGEPAGE) failed: errno %d", ctypes.get_errno())
        return False
    return True


def huge_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty on CPU, advised into huge pages before anything is written to it."""
    t = torch.empty(shape, dtype=dtype)
    advise_huge_pages(t)
    return t


def huge_copy(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of CPU tensor t (converted to dtype) in memory advised into huge pages."""
    out = huge_empty(t.shape, dtype or t.dtype)
    return out.copy_(t)

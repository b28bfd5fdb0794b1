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
def _libc() -> ctypes.CDLL | None:
    """The C library (Linux), for madvise and glibc's malloc_trim and mallopt; None elsewhere or if it will not load."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


@functools.cache
def _madvise():
    libc = _libc()
    if libc is None or not hasattr(mmap, "MADV_HUGEPAGE"):
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


@functools.cache
def _malloc_trim():
    fn = getattr(_libc(), "malloc_trim", None)  # glibc's
    if fn is None:
        return None
    fn.argtypes, fn.restype = (ctypes.c_size_t,), ctypes.c_int
    return fn


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)
HEAP_BLOCKS = 32 << 20  # blocks up to this size from the heap: glibc's own ceiling for its adaptive threshold
KEEP_FREE = 128 << 20  # free memory at the heap's top kept for reuse


@functools.cache
def reuse_freed() -> bool:
    """Have glibc's malloc keep freed memory for the next allocations instead of handing it back to the OS:
    blocks up to HEAP_BLOCKS from its heap, up to KEEP_FREE of free memory at its top kept (mallopt). A forward
    pass allocates and frees its activations layer after layer; with glibc's adaptive defaults, a 512-token
    prompt through pythia-1.4b gave ~350 MB back to the OS and faulted it in again (89k page faults, each page
    zeroed by the kernel: 7% of the prompt's time; none with these settings, and no higher peak). Process-wide,
    once; `release_freed` still trims on demand. False where the C library is not glibc."""
    mallopt = getattr(_libc(), "mallopt", None)  # glibc's
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, HEAP_BLOCKS) == 1 and mallopt(M_TRIM_THRESHOLD, KEEP_FREE) == 1
    log.debug("malloc keeps freed memory for reuse: %s", done)
    return done


def release_freed() -> None:
    """Give the allocator's freed pages back to the OS (glibc; a no-op elsewhere). Between steps that free
    large temporaries among long-lived tensors (quantizing a model layer by layer), the heap otherwise keeps
    the holes: pythia-1.4b quantized to int8 while loading peaked anywhere from 2.5 to 3.6 GB."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def huge_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty on CPU, advised into huge pages before anything is written to it.

    A tensor of MIN_BYTES or more gets a private anonymous mapping of its own (Linux), aligned to a huge
    page and unmapped when the tensor is freed. From the allocator's heap, weights that live only for a
    while (a float matrix read to be quantized) left their pages behind between long-lived ones, and with
    huge pages advised the freed holes stayed resident (pythia-160m quantized while loading: 1.15 GB
    resident instead of 0.73).
    """
    shape = torch.Size(shape)
    nbytes = shape.numel() * dtype.itemsize
    if nbytes < MIN_BYTES or _madvise() is None:
        t = torch.empty(shape, dtype=dtype)
        advise_huge_pages(t)
        return t
    region = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE)  # untouched pages cost nothing
    region.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # holds the mapping until the last view is freed
    offset = -raw.data_ptr() % HUGE
    return raw[offset : offset + nbytes].view(dtype).view(shape)


def huge_copy(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of CPU tensor t (converted to dtype) in memory advised into huge pages."""
    out = huge_empty(t.shape, dtype or t.dtype)
    return out.copy_(t)

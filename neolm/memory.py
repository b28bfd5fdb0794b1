"""Process memory for weights and the C allocator's handling of freed activations (Linux, glibc).

Weights of 8 MiB or more get a private anonymous mapping of their own (`weight_empty`), page-aligned and
returned to the OS when freed. Huge pages are not asked for: with the native kernels prefetching 4 KiB ahead,
decoding and prompts ran as fast from 4 KiB pages (bench/PROFILE.md, session 20), while on a VM the kernel's
huge-page faults made loads 1.5-4x slower.
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

MIN_BYTES = 8 << 20  # smaller tensors come from the allocator's heap


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library (Linux), for glibc's malloc_trim and mallopt; None elsewhere or if it will not load."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


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


def weight_empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty on CPU for a long-lived weight.

    A tensor of MIN_BYTES or more gets a private anonymous mapping of its own (Linux), unmapped when the
    tensor is freed. From the allocator's heap, weights that live only for a while (a float matrix read to be
    quantized) left their pages behind between long-lived ones (pythia-160m quantized while loading: 1.15 GB
    resident instead of 0.73).
    """
    shape = torch.Size(shape)
    nbytes = shape.numel() * dtype.itemsize
    if nbytes < MIN_BYTES or not sys.platform.startswith("linux"):
        return torch.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)  # untouched pages cost nothing
    return torch.frombuffer(region, dtype=dtype).view(shape)  # holds the mapping until the last view is freed


def weight_copy(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of CPU tensor t (converted to dtype) in memory of its own (`weight_empty`)."""
    out = weight_empty(t.shape, dtype or t.dtype)
    return out.copy_(t)

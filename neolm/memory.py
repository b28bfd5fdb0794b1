"""Process memory for weights and the C allocator's handling of freed activations (Linux, glibc).

Weights of 8 MiB or more get a private anonymous mapping of their own (`weight_empty`), page-aligned and
returned to the OS when freed. Huge pages are not asked for by default: on the Xeon of bench/PROFILE.md's
session 20 decoding and prompts ran as fast from 4 KiB pages, while that VM's huge-page faults made loads 1.5-4x
slower. On a Zen 4 EPYC VM they decode 1.02-1.12x faster (session 43), so `into_huge_pages` moves a loaded
model's weights into them on request (`neolm.load(huge_pages=True)`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import mmap
import re
import sys
from collections.abc import Iterable
from pathlib import Path

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
    storage = torch.frombuffer(region, dtype=dtype).untyped_storage()  # holds the mapping until it is freed
    # a tensor of its own on that storage, not a view: a view's base would keep the storage after `into_huge_pages`
    # moved the view (`set_`) elsewhere (an int8 pythia-1.4b then held 1.2 GB of old codes for good)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def weight_copy(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of CPU tensor t (converted to dtype) in memory of its own (`weight_empty`)."""
    out = weight_empty(t.shape, dtype or t.dtype)
    return out.copy_(t)


HUGE_PAGE = 2 << 20  # the kernel's transparent huge page (x86-64, and arm64 with 4 KiB pages)
HUGE_MIN_BYTES = 64 << 10  # smaller storages (biases, norms) stay where they are
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages() -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise" or "never"); None where it has none."""
    try:
        found = re.search(r"\[(\w+)\]", THP_ENABLED.read_text())
    except OSError:
        return None
    return found.group(1) if found else None


def huge_page_bytes(start: int, end: int) -> int:
    """Bytes of this process's address range [start, end) that the kernel backs with huge pages (its smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's first line: "lo-hi perms ..."
                lo, hi = (int(a, 16) for a in head.split("-"))
                inside = lo < end and hi > start
            elif inside and head == "AnonHugePages:":
                total += int(line.split()[1]) << 10
    return total


def module_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every tensor `model`'s modules hold: parameters, buffers, tensor attributes (kernel copies of weights) and
    the tensor attributes of the plain objects they keep (neolm.native's packed codes)."""
    found: list[torch.Tensor] = []
    for module in model.modules():
        found += [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
        for value in vars(module).values():
            if isinstance(value, torch.Tensor):
                found.append(value)
            elif isinstance(getattr(value, "__dict__", None), dict) and not isinstance(value, torch.nn.Module):
                found += [t for t in value.__dict__.values() if isinstance(t, torch.Tensor)]
    return found


def into_huge_pages(tensors: Iterable[torch.Tensor]) -> tuple[int, int]:
    """Move the storages of CPU `tensors` of HUGE_MIN_BYTES or more into one private mapping advised for
    transparent huge pages (madvise MADV_HUGEPAGE), in place (`Tensor.set_`: every reference to these tensor
    objects sees the new memory; views of a storage keep sharing it). Tensors not listed that share a moved
    storage keep the old one. The old memory is freed as its last tensor moves; the mapping is unmapped when the
    last tensor in it is freed. Returns (bytes moved, bytes the kernel backs with huge pages: less where it is
    short of free 2 MiB blocks, 0 where it has none to give). Linux only."""
    views: dict[int, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for t in tensors:
        if id(t) in seen or t.device.type != "cpu" or t.untyped_storage().nbytes() < HUGE_MIN_BYTES:
            continue
        seen.add(id(t))
        views.setdefault(t.untyped_storage().data_ptr(), []).append(t)
    if not views:
        return 0, 0
    offsets, used = {}, 0
    for key, ts in views.items():
        offsets[key] = used
        used += -(-ts[0].untyped_storage().nbytes() // mmap.PAGESIZE) * mmap.PAGESIZE
    size = -(-used // HUGE_PAGE) * HUGE_PAGE
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # room to start on a huge page's boundary
    whole = torch.frombuffer(region, dtype=torch.uint8)  # (its storage holds the mapping)
    skip = -whole.data_ptr() % HUGE_PAGE
    region.madvise(mmap.MADV_HUGEPAGE, skip, size)  # before the first write: faults then take 2 MiB at a time
    storage = whole.untyped_storage()
    with torch.no_grad():
        for key, ts in views.items():
            old = ts[0].untyped_storage()
            start = skip + offsets[key]
            whole[start : start + old.nbytes()].copy_(torch.empty(0, dtype=torch.uint8).set_(old))
            for t in ts:
                offset = (start + t.storage_offset() * t.element_size()) // t.element_size()
                t.set_(storage, offset, t.shape, t.stride())
    del old, ts
    release_freed()
    begin = whole.data_ptr() + skip
    return used, min(used, huge_page_bytes(begin, begin + size))

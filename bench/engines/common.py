"""Shared by the engine modules (standard library only: they also run in the peers' environments)."""

import os


class Unavailable(Exception):
    """The engine cannot run this model/precision (not installed, not supported, not implemented yet)."""


def module_stream_bytes(model) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer once (shared ones once),
    except embedding tables, of which a step reads one row (a tied output head counts as a matrix)."""
    import torch

    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
            if t is None or t.data_ptr() in seen or t.is_meta or t.dtype == torch.bool:  # bool: masks
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def folder_files(folder) -> list[str]:
    """The regular files directly in folder (an engine's model folder, for `Engine.files`)."""
    return [e.path for e in os.scandir(folder) if e.is_file()] if os.path.isdir(folder) else []


def read_through(paths, chunk: int = 16 << 20) -> int:
    """Read each file once, so that the load timed next finds it in the page cache: at the larger shapes the
    previous engines' files evict it, and whichever engine ran first then paid the disk (a pythia-1.4b fp32
    load read 15-20 s first, 1-4 s after another engine). Returns the bytes read."""
    total, buf = 0, bytearray(chunk)
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total

"""Shared by the engine modules (standard library only: they also run in the peers' environments)."""


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

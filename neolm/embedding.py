"""Text embeddings from a language model: the final hidden states (after the last LayerNorm) of each text's tokens,
pooled into one vector, as vLLM's embedding runner pools a causal LM (its default for them: the last token's state,
L2-normalised) and llama.cpp's --embeddings with --pooling mean or last.

A base model's states are not trained to be embeddings: they serve for similarity as far as the model's features
do. The server's POST /v1/embeddings and LanguageModel.embed are this function.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neolm.errors import NeolmError
from neolm.generate import left_pad
from neolm.model import GPT

POOLINGS = ("last", "mean")
"""last: the last token's state (it has seen the whole text); mean: the average over the text's tokens."""


def embed(model: GPT, seqs: Sequence[Sequence[int]], pooling: str = "last", normalize: bool = True,
          batch_size: int = 8) -> torch.Tensor:  # fmt: skip
    """(N, C) fp32: one vector per token sequence, `pooling` over its final hidden states, of unit length if
    `normalize`. Sequences are read batch_size at a time, the longest together (left-padded)."""
    if pooling not in POOLINGS:
        raise NeolmError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    for i, seq in enumerate(seqs):
        if not seq:
            raise NeolmError(f"text {i} has no tokens: there is nothing to embed")
        if len(seq) > model.config.n_positions:
            raise NeolmError(f"text {i} is {len(seq)} tokens, more than the model's context of "
                             f"{model.config.n_positions}")  # fmt: skip
    device = model.ln_f.weight.device
    out = torch.empty(len(seqs), model.config.d_model)
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # similar lengths share a batch: less padding
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            rows = order[b : b + batch_size]
            tokens, positions, filled = left_pad([seqs[i] for i in rows], 0, device)  # (n, W)
            final = model(tokens, positions, key_valid=filled, head=False).float()  # (n, W, C), after ln_f
            for k, i in enumerate(rows):
                states = final[k, tokens.shape[1] - len(seqs[i]) :]  # (T, C): the text's own slots
                out[i] = (states[-1] if pooling == "last" else states.mean(dim=0)).cpu()
    return torch.nn.functional.normalize(out, dim=-1) if normalize else out

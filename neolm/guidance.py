"""Classifier-free guidance (transformers' guidance_scale and negative_prompt_ids; Sanchez et al. 2023, "Stay on
topic with classifier-free guidance"): each sequence's next-token log-probabilities are pushed away from those of
an unconditional context, scale * (cond - uncond) + uncond. The unconditional context is the negative prompt,
else the prompt's last token alone; it runs beside its sequence in a KV cache of its own and is fed the same new
tokens, so every step costs a second forward of the batch."""

from __future__ import annotations

import torch

from neolm.model import GPT, KVCache, prefill


class Guidance:
    """The unconditional contexts of a batch's rows (N), read and then fed one token per step alongside them."""

    def __init__(self, model: GPT, tokens: torch.Tensor, positions: torch.Tensor, filled: torch.Tensor | None,
                 room: int, chunk: int | None = None):  # fmt: skip
        """tokens, positions (N, W): the contexts left-padded (generate.left_pad), with `filled` for the padding;
        room: slots for the new tokens; chunk: read this many columns at a time (model.prefill)."""
        self.model = model
        self.cache = KVCache(model.config, tokens.shape[0], tokens.shape[1] + room, model.cache_dtype, tokens.device)
        self.cache.hide_padding(filled)
        self.positions = positions[:, -1:]  # (N, 1)
        self.logits = prefill(model, tokens, self.cache, positions, chunk, last_only=True)[:, -1].float()  # (N, V)

    def feed(self, token: torch.Tensor) -> None:
        """Each row's new token (N,): the contexts' next logits."""
        self.positions = self.positions + 1
        self.logits = self.model(token[:, None], self.positions, self.cache)[:, -1].float()

    def unconditional(self, index: torch.Tensor | None) -> torch.Tensor:
        """The rows' (`index`; None: all) unconditional log-probabilities of the next token (n, V)."""
        logits = self.logits if index is None else self.logits[index]
        return torch.log_softmax(logits, dim=-1)


def guide(scores: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """Guided log-probabilities (N, V) from the sequences' scores (N, V) and their contexts' log-probabilities."""
    scores = torch.log_softmax(scores, dim=-1)
    return scale * (scores - unconditional) + unconditional

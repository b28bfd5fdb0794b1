"""Contrastive search (penalty_alpha with top_k; Su et al. 2022, "A Contrastive Framework for Neural Text
Generation"), as transformers ran it natively up to version 4 (its _contrastive_search; in version 5 it is the hub's
transformers-community/contrastive-search).

Each step takes the top_k likeliest next tokens (after the logits processors), reads each candidate in one
forward of k rows, and picks the one that maximises

    (1 - penalty_alpha) * p(candidate) - penalty_alpha * max cosine(h(candidate), h(t) for every t before it)

where h is the last hidden state (after the final LayerNorm) and the context is the prompt and the tokens so far:
likely tokens that do not restate what the text already says, against greedy decoding's loops. The chosen row's
logits and hidden state carry on to the next step, so a step costs one forward of k rows. One sequence runs at a
time (as assisted generation). With low_memory=True (transformers 4's option) the k candidates are read one at a
time into a cache of one row, and the chosen one once more: k + 1 one-row forwards a step, for a k-th of the
cache's memory (the candidates' hidden states from one-row forwards round otherwise, so a near-tie may flip).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from neolm.generate import check_alone, each_alone
from neolm.generation_config import GenerationConfig
from neolm.model import GPT, KVCache, prefill
from neolm.sampling import Ending, Processors
from neolm.speculative import Picker


def contrastive_generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    gc: GenerationConfig,
    decode: Callable[[list[int]], str] | None = None,
    on_token: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (eos included). on_token(sequence, logits, scores), if given, gets each token's
    logits (V,) and the processed scores (V,) its candidates were taken from."""
    prompts, deadline = check_alone(model, prompts, gc, decode), gc.deadline()
    return each_alone(prompts, gc, lambda p, index, report: _tokens(model, p, gc, decode, deadline, index, report),
                      on_token)  # fmt: skip


def contrastive_tokens(
    model: GPT, prompt: Sequence[int], gc: GenerationConfig, decode: Callable[[list[int]], str] | None = None
) -> Iterator[int]:
    """The new tokens of one prompt as they are chosen (for streaming). Bad arguments raise here."""
    (prompt,) = check_alone(model, [prompt], gc, decode)
    return _tokens(model, prompt, gc, decode, gc.deadline(), 0, None)


@torch.inference_mode()
def _tokens(model: GPT, prompt: list[int], gc: GenerationConfig, decode, deadline: float, prompt_index: int,
            on_token: Callable | None) -> Iterator[int]:  # fmt: skip
    config, device = model.config, model.ln_f.weight.device
    budget = gc.new_token_budget(len(prompt))
    if budget == 0:
        return
    k, alpha = min(gc.top_k, config.vocab_size), gc.penalty_alpha
    eos_ids = gc.eos_ids(config.eos_token_id)
    ending = Ending(gc, eos_ids, decode, len(prompt), budget, deadline)
    processors = Processors(gc, eos_ids, config.vocab_size, device)
    picker = Picker(gc, processors, len(prompt), budget, config.vocab_size, device, None, prompt_index)
    cache = KVCache(config, 1, len(prompt) + budget, model.cache_dtype, device)
    x = torch.tensor([prompt], device=device)
    hidden = prefill(model, x, cache, chunk=gc.prefill_chunk_size, head=False)[0]  # (T, C) after ln_f
    logits = model.lm_head(hidden[-1:]).float()  # (1, V)
    context = _unit(hidden.float())  # (T, C) the unit hidden states of the text so far
    low = bool(gc.low_memory)
    if not low:
        cache = cache.rows(torch.zeros(k, dtype=torch.long, device=device), extra=budget)  # a row per candidate
    seq = list(prompt)
    while True:
        raw = logits[0].clone() if on_token is not None else None  # (the processors may write into logits)
        scores = picker.scores(logits, seq, [])  # (1, V)
        probs, candidates = torch.topk(scores.softmax(dim=-1)[0], k)  # (k,) each
        if low:
            hidden = torch.cat([_read(model, candidates[i : i + 1], len(seq), cache) for i in range(k)])  # (k, C)
        else:
            positions = torch.full((k, 1), len(seq), device=device)
            hidden = model(candidates[:, None], positions, cache, head=False)[:, 0]  # (k, C)
        unit = _unit(hidden.float())
        penalty = (unit @ context.T).max(dim=-1).values  # (k,) the likeliest restatement of each candidate
        chosen = int(torch.argmax((1 - alpha) * probs - alpha * penalty))
        token = int(candidates[chosen])
        if on_token is not None:
            on_token(raw, scores[0])
        seq.append(token)
        yield token
        if ending.reached(seq, scores[0]):
            return
        logits = model.lm_head(hidden[chosen : chosen + 1]).float()
        context = torch.cat((context, unit[chosen : chosen + 1]))
        if low:
            if chosen != k - 1:  # (the slot holds the last candidate read)
                _read(model, candidates[chosen : chosen + 1], len(seq) - 1, cache)
        else:
            cache.reorder(torch.full((k,), chosen, device=device), start=cache.length - 1)  # every row: its slot


def _read(model: GPT, token: torch.Tensor, slot: int, cache: KVCache) -> torch.Tensor:
    """The hidden state (1, C) of one token (1,) at position `slot`, written there in the one-row cache (over the
    candidate read there before)."""
    cache.length = slot
    return model(token[:, None], torch.full((1, 1), slot, device=token.device), cache, head=False)[:, 0]


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to length 1 (cosine similarity by matmul)."""
    return x / x.norm(dim=-1, keepdim=True)

"""DoLa, decoding by contrasting layers (dola_layers; Chuang et al. 2024, "DoLa: Decoding by Contrasting Layers
Improves Factuality in Large Language Models"), as transformers ran it natively up to version 4 (in version 5 it
is the hub's transformers-community/dola).

Each step reads the output head over the hidden states of some earlier ("premature") layers as well as the last:
of the candidate layers ("low": the lower half of the model, every second layer; "high": the upper half; or a
list, where 0 is the embeddings), the one whose next-token distribution is furthest from the final one
(by transformers' divergence: KL(m || p) + KL(m || q), m the mean of the final p and the layer's q, where
Jensen-Shannon's has KL(p || m) + KL(q || m)) is subtracted from it in log-probabilities, over the tokens within a tenth of the likeliest's
probability (the rest are ruled out), so that what the later layers add is amplified. As transformers, the early
layers' hidden states go to the head without the final LayerNorm, and the logits processors then apply to the
contrast; its authors advise repetition_penalty 1.2. The layer is chosen per sequence (transformers: once for its
whole batch). One sequence runs at a time; forward hooks read the layers (so the native decode step stands aside).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from neolm.errors import NeolmError
from neolm.generate import check_alone, each_alone
from neolm.generation_config import GenerationConfig
from neolm.model import GPT, KVCache, prefill
from neolm.sampling import Ending, Processors, seeded_generator
from neolm.speculative import Picker

RELATIVE_TOP = 0.1  # tokens below this fraction of the likeliest's probability are ruled out


def candidate_layers(dola_layers: str | list[int], n_layer: int, tied_head: bool) -> list[int]:
    """The hidden-state indices (0: embeddings, i: block i's output) whose heads DoLa contrasts, as transformers
    chooses them: with a head tied to the embeddings, from layer 2 (the embeddings would read as themselves)."""
    start = 0 if not tied_head else 2 if n_layer > 2 else 1 if n_layer == 2 else 0
    if dola_layers == "low":
        if start == n_layer // 2:
            return [start]
        return list(range(start, n_layer // 2, 2)) if n_layer <= 40 else list(range(start, 20, 2))
    if dola_layers == "high":
        return list(range(n_layer // 2, n_layer, 2)) if n_layer <= 40 else list(range(n_layer - 20, n_layer, 2))
    layers = [i for i in dola_layers if i < n_layer]
    if not layers:
        raise NeolmError(f"dola_layers {dola_layers} names no layer below the model's {n_layer}")
    return layers


def contrast(final: torch.Tensor, premature: dict[int, torch.Tensor]) -> torch.Tensor:
    """DoLa's scores (V,) from the final logits (V,) and each candidate layer's (V,): the final log-probabilities
    less those of the layer furthest from them (transformers' divergence, above), -inf below a tenth of the likeliest's
    probability."""
    layers = list(premature)
    base = premature[layers[0]]
    if len(layers) > 1:
        stacked = torch.stack([premature[i] for i in layers])  # (L, V)
        mean = 0.5 * (final.softmax(dim=-1)[None] + stacked.softmax(dim=-1))
        js = 0.5 * (F.kl_div(final.log_softmax(dim=-1)[None], mean, reduction="none").mean(-1)
                    + F.kl_div(stacked.log_softmax(dim=-1), mean, reduction="none").mean(-1))  # fmt: skip
        base = premature[layers[int(js.argmax())]]
    final, base = final.log_softmax(dim=-1), base.log_softmax(dim=-1)
    ruled_out = final < final.max() + math.log(RELATIVE_TOP)
    return torch.where(ruled_out, -float("inf"), final - base)


def dola_generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    gc: GenerationConfig,
    decode: Callable[[list[int]], str] | None = None,
    on_token: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """The new tokens of every sequence (prompts x num_return_sequences, prompt-major; eos included).
    on_token(sequence, logits, scores), if given, gets each token's final logits (V,) and the processed contrast
    (V,) it was picked from."""
    prompts, deadline = check_alone(model, prompts, gc, decode), gc.deadline()
    generator = seeded_generator(gc.seed, model.ln_f.weight.device) if gc.do_sample else None
    return each_alone(prompts, gc, lambda p, index, report: _tokens(model, p, gc, decode, generator, deadline, index,
                                                                      report), on_token)  # fmt: skip


def dola_tokens(
    model: GPT, prompt: Sequence[int], gc: GenerationConfig, decode: Callable[[list[int]], str] | None = None
) -> Iterator[int]:
    """The new tokens of one prompt as they are chosen (for streaming). Bad arguments raise here."""
    (prompt,) = check_alone(model, [prompt], gc, decode)
    generator = seeded_generator(gc.seed, model.ln_f.weight.device) if gc.do_sample else None
    return _tokens(model, prompt, gc, decode, generator, gc.deadline(), 0, None)


@torch.inference_mode()
def _tokens(model: GPT, prompt: list[int], gc: GenerationConfig, decode, generator, deadline: float,
            prompt_index: int, on_token: Callable | None) -> Iterator[int]:  # fmt: skip
    config, device = model.config, model.ln_f.weight.device
    budget = gc.new_token_budget(len(prompt))
    if budget == 0:
        return
    layers = candidate_layers(gc.dola_layers, config.n_layer, config.tie_embeddings)
    eos_ids = gc.eos_ids(config.eos_token_id)
    ending = Ending(gc, eos_ids, decode, len(prompt), budget, deadline)
    processors = Processors(gc, eos_ids, config.vocab_size, device)
    picker = Picker(gc, processors, len(prompt), budget, config.vocab_size, device, generator, prompt_index)
    cache = KVCache(config, 1, len(prompt) + budget, model.cache_dtype, device)
    seq, x = list(prompt), torch.tensor([prompt], device=device)
    with _reading(model, layers) as hidden:
        while True:
            final = prefill(model, x, cache, chunk=gc.prefill_chunk_size, last_only=True)[0, -1].float()  # (V,)
            premature = {i: model.lm_head(hidden[i]).float() for i in layers}  # (as transformers: no ln_f)
            scores = picker.scores(contrast(final, premature)[None], seq, [])  # (1, V)
            token = picker.pick(scores)[0]
            if on_token is not None:
                on_token(final, scores[0])
            seq.append(token)
            yield token
            if ending.reached(seq, scores[0]):
                return
            x = torch.tensor([[token]], device=device)


@contextlib.contextmanager
def _reading(model: GPT, layers: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """{layer: its hidden state at the last position (C,)} as the model runs: 0 the first block's input, i block
    i's output (hooks, removed afterwards)."""
    hidden: dict[int, torch.Tensor] = {}
    handles = []
    for i in layers:
        if i == 0:
            handles.append(model.blocks[0].register_forward_pre_hook(
                lambda module, args: hidden.__setitem__(0, args[0][0, -1].clone())))  # fmt: skip
        else:
            handles.append(model.blocks[i - 1].register_forward_hook(
                lambda module, args, out, i=i: hidden.__setitem__(i, out[0, -1].clone())))  # fmt: skip
    try:
        yield hidden
    finally:
        for handle in handles:
            handle.remove()

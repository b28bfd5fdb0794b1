"""A forward pass that shows its work, for interpretability and training-dynamics research: every layer's hidden
states, every head's attention weights, the logits and each token's log-probability, as transformers gives them
with `output_hidden_states=True` and `output_attentions=True` (tests/test_trace.py holds them to it).

The model knows nothing of this. For the length of one call, hooks on its blocks and attention modules record what
passes through them, and they are removed afterwards. Each record is a plain tensor, so the usual tools apply: a
logit lens of any hidden state h is `model.lm_head(model.ln_f(h))`, and a probe trains on `hidden_states[i]`.
Quantized and native models are traced as they run.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from neolm.errors import NeolmError
from neolm.generate import left_pad
from neolm.model import GPT, Attention
from neolm.sampling import vocab_logprobs

DEFAULT_BATCH_SIZE = 8  # sequences per forward


@dataclass
class Trace:
    """One sequence's forward pass. T is its length, C the model's width, H its heads, V its vocabulary."""

    tokens: list[int]  # the token ids (T)
    token_logprobs: torch.Tensor  # (T - 1,) fp32: log p(tokens[t] | tokens[:t]) for t = 1 .. T - 1
    logits: torch.Tensor | None = None  # (T, V) fp32: position t's logits for the token after it
    # n_layer + 1 of (T, C), in the model's dtype: the embeddings (token + learned position embeddings), then each
    # block's output; the last is the final block's output after the final LayerNorm (transformers' convention)
    hidden_states: tuple[torch.Tensor, ...] | None = None
    # n_layer of (H, T, T) fp32: row i is query i's softmax weights over keys 0 .. i (0 elsewhere, and 0 outside
    # a local layer's window)
    attentions: tuple[torch.Tensor, ...] | None = None
    # the outputs (T, ...) of the modules asked for by name (`modules=`), e.g. "blocks.3.mlp", "blocks.0.attn.qkv"
    records: dict[str, torch.Tensor] | None = None

    @property
    def surprisal(self) -> torch.Tensor:
        """(T - 1,) -log2 p of each token after the first, in bits."""
        return -self.token_logprobs / math.log(2)

    def ranks(self) -> torch.Tensor:
        """(T - 1,) each token's rank among the model's predictions for its position (1: the likeliest)."""
        logits = self._predictions()
        chosen = logits.gather(1, torch.tensor(self.tokens[1:], device=logits.device)[:, None])  # (T - 1, 1)
        return (logits > chosen).sum(dim=1) + 1

    def top(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k likeliest tokens after each position but the last: ids and log-probabilities, (T - 1, k) each."""
        best = torch.topk(torch.log_softmax(self._predictions(), dim=-1), min(k, self._predictions().shape[1]))
        return best.indices, best.values

    def _predictions(self) -> torch.Tensor:
        if self.logits is None:
            raise NeolmError("this trace kept no logits (output_logits=False)")
        return self.logits[:-1]  # (T - 1, V)


def attention_weights(attn: Attention, x: torch.Tensor, rope, mask) -> torch.Tensor:
    """The softmax weights (B, H, T, S) fp32 that `attn` gives queries x (B, T, C) over themselves as keys, with the
    mask it was called with (model._masks: "causal", None, or True where a query may see a key)."""
    q, k, _ = attn.heads(x, rope)  # (B, H, T, D) each
    scores = (q.float() @ k.float().transpose(-1, -2)) * attn.scale  # (B, H, T, T)
    if isinstance(mask, str):  # "causal"
        T = scores.shape[-1]
        mask = torch.ones(T, T, dtype=torch.bool, device=scores.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1)


def matching_modules(model: GPT, patterns: Sequence[str]) -> dict[str, torch.nn.Module]:
    """The model's modules whose names (model.named_modules(): "blocks.3.mlp", "ln_f", ...) match any of the
    shell-style patterns ("blocks.*.mlp"); NeolmError for a pattern that matches none."""
    named = {name: m for name, m in model.named_modules() if name != "lm_head"}  # (the logits are the head's)
    chosen = {}
    for pattern in patterns:
        hits = {name: m for name, m in named.items() if name and fnmatch.fnmatchcase(name, pattern)}
        if not hits:
            examples = ", ".join(name for name in named if name.startswith("blocks.0."))
            raise NeolmError(f"no module of the model is called {pattern!r}; the first block's are {examples}, "
                             "and there are wte, blocks.N and ln_f")  # fmt: skip
        chosen |= hits
    return chosen


@contextlib.contextmanager
def _recording(
    model: GPT, hidden: bool, attentions: bool, modules: dict[str, torch.nn.Module]
) -> Iterator[tuple[list, list, dict]]:
    """(hidden states, attention weights, records) that fill as the model runs: the first block's input, then
    each block's output (B, T, C); each attention module's weights (B, H, T, T); each named module's output
    (B, T, ...), which the model leaves as it is while a hook watches it (neolm.model._watched)."""
    states: list[torch.Tensor] = []
    weights: list[torch.Tensor] = []
    records: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():
        handles.append(module.register_forward_hook(
            lambda module, args, out, name=name: records.__setitem__(name, out)))  # fmt: skip
    if hidden:
        handles.append(model.blocks[0].register_forward_pre_hook(lambda module, args: states.append(args[0])))
        for block in model.blocks:
            handles.append(block.register_forward_hook(lambda module, args, out: states.append(out)))
    if attentions:
        for block in model.blocks:
            handles.append(block.attn.register_forward_hook(
                lambda module, args, out: weights.append(attention_weights(module, *args[:3]))))  # fmt: skip
    try:
        yield states, weights, records
    finally:
        for handle in handles:
            handle.remove()


def _check(model: GPT, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    config = model.config
    out = []
    for i, p in enumerate(prompts):
        p = list(p)
        which = f"sequence {i}" if len(prompts) > 1 else "the sequence"
        if not p:
            raise NeolmError(f"{which} is empty: give at least one token")
        if len(p) > config.n_positions:
            raise NeolmError(f"{which} has {len(p)} tokens, more than the model's context of {config.n_positions}")
        bad = [t for t in p if not 0 <= t < config.vocab_size]
        if bad:
            raise NeolmError(f"token id {bad[0]} is outside the model's vocabulary of {config.vocab_size}")
        out.append(p)
    return out


@torch.no_grad()  # (not inference_mode: its tensors could not feed a probe's autograd graph)
def trace(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    hidden_states: bool = False,
    attentions: bool = False,
    logits: bool = True,
    batch_size: int = DEFAULT_BATCH_SIZE,
    modules: Sequence[str] = (),
) -> list[Trace]:
    """A Trace of each token sequence: its tokens' log-probabilities, and as asked its logits, hidden states,
    attention weights and the outputs of the `modules` named (shell-style patterns of model.named_modules()'
    names: "blocks.*.mlp"). Sequences of different lengths are batched with left padding, and each one's numbers
    are what it gets alone. Attention weights cost one more q/k projection per layer and O(T^2) memory per head."""
    prompts = _check(model, prompts)
    if batch_size < 1:
        raise NeolmError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(modules, str):
        modules = [modules]
    chosen = matching_modules(model, modules)
    out: list[Trace] = []
    for i in range(0, len(prompts), batch_size):
        out += _batch(model, prompts[i : i + batch_size], hidden_states, attentions, logits, chosen)
    return out


def _batch(model: GPT, seqs: list[list[int]], hidden: bool, attentions: bool, keep_logits: bool,
           modules: dict[str, torch.nn.Module]) -> list[Trace]:  # fmt: skip
    device = model.ln_f.weight.device
    tokens, positions, filled = left_pad(seqs, 0, device)  # (N, W) each
    with _recording(model, hidden, attentions, modules) as (states, weights, records):
        final = model(tokens, positions, key_valid=filled, head=False)  # (N, W, C), after ln_f
    if hidden:
        states[-1] = final  # as transformers: the last hidden state is the final LayerNorm's output
    width = tokens.shape[1]
    traces = []
    for row, seq in enumerate(seqs):
        start = width - len(seq)  # the sequence's first slot
        h = final[row, start:]  # (T, C)
        targets = torch.tensor(seq[1:], device=device)[:, None]  # (T - 1, 1)
        if keep_logits:
            row_logits = model.lm_head(h).float()  # (T, V)
            picked = torch.log_softmax(row_logits[:-1], dim=-1).gather(1, targets)[:, 0]
        else:  # a chunk of positions at a time: (P, V), not (T, V)
            row_logits = None
            parts = [lp[: len(targets) - i].gather(1, targets[i : i + len(lp)]) for i, lp in vocab_logprobs(model, h)]
            picked = torch.cat(parts)[:, 0]
        traces.append(Trace(
            tokens=seq,
            token_logprobs=picked,
            logits=row_logits,
            hidden_states=tuple(s[row, start:] for s in states) if hidden else None,
            attentions=tuple(w[row, :, start:, start:] for w in weights) if attentions else None,
            records={name: r[row, start:] for name, r in records.items()} if modules else None,
        ))  # fmt: skip
    return traces

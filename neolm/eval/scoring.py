"""Batched log-likelihood of continuations given contexts: the engine under `neolm eval` and `neolm perplexity`.

A request is (context tokens, continuation tokens); its score is the summed log-probability of the
continuation and whether greedy decoding would produce it, exactly as lm-evaluation-harness's `hf`
backend defines them: the model reads context + continuation without its last token, and a request
longer than max_len + 1 tokens loses its oldest tokens (the harness's left truncation).

What makes it fast, without changing any number:
- requests are sorted by length and batched, right-padded, one forward per batch;
- only the positions that are scored go through the final LayerNorm and the vocabulary projection;
- requests that share a context (a multiple-choice question's answers) run that context once into a
  KV cache, and the continuations, sorted by length and batched, read it from there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from neolm.errors import NeolmError
from neolm.generate import left_pad
from neolm.model import GPT, KVCache
from neolm.sampling import vocab_logprobs

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (requests done, tokens scored) since the last call


@dataclass
class _Request:
    index: int
    context: list[int]  # after truncation: the model reads context + continuation[:-1]
    continuation: list[int]


def prepare(requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_len: int) -> list[_Request]:
    """Check requests and apply the harness's left truncation to max_len + 1 tokens."""
    out, truncated = [], 0
    for i, (context, continuation) in enumerate(requests):
        context, continuation = list(context), list(continuation)
        if not context or not continuation:
            raise NeolmError(f"request {i}: context and continuation must each have at least one token")
        if len(continuation) > max_len:
            raise NeolmError(
                f"request {i}: its continuation has {len(continuation)} tokens, more than the model's context of "
                f"{max_len}; it cannot be scored"
            )
        whole = context + continuation
        if len(whole) > max_len + 1:
            truncated += 1
            context = whole[-(max_len + 1) : -len(continuation)]
        out.append(_Request(i, context, continuation))
    if truncated:
        log.warning("%d request(s) longer than the context of %d tokens lost their oldest tokens", truncated, max_len)
    return out


@contextmanager
def _scored_hidden(model: GPT, rows: torch.Tensor, cols: torch.Tensor):
    """Within the block, a forward keeps the final hidden states at positions (rows[i], cols[i]) in the
    yielded list and hands the final LayerNorm and vocabulary projection one position only; `_project`
    then scores the kept states in chunks."""
    kept: list[torch.Tensor] = []

    def keep(module, args):
        kept.append(args[0][rows, cols])
        return (args[0][:1, :1],)

    handle = model.ln_f.register_forward_pre_hook(keep)
    try:
        yield kept
    finally:
        handle.remove()


def _place(model: GPT) -> tuple[torch.device, torch.dtype]:
    """Device and compute dtype, from the embedding (a quantized model's Linear layers have no .weight tensor)."""
    return model.wte.weight.device, model.wte.weight.dtype


def _pick(logprobs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log p(target) and whether target is the argmax."""
    return logprobs.gather(1, targets[:, None])[:, 0], logprobs.argmax(dim=-1) == targets


def _project(model: GPT, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and greedy hit for the kept hidden states (N, C) (before the final LayerNorm), in fp32."""
    picked = [
        _pick(logprobs, targets[i : i + len(logprobs)]) for i, logprobs in vocab_logprobs(model, model.ln_f(hidden))
    ]
    return torch.cat([p for p, _ in picked]), torch.cat([h for _, h in picked])


def _score(model: GPT, rows, cols, targets, **forward) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(target) and greedy hit at positions (rows, cols) of model(**forward)."""
    device = _place(model)[0]
    rows = torch.as_tensor(rows, dtype=torch.long, device=device)
    cols = torch.as_tensor(cols, dtype=torch.long, device=device)
    targets = torch.as_tensor(targets, dtype=torch.long, device=device)
    with _scored_hidden(model, rows, cols) as kept:
        model(**forward)
    return _project(model, kept[0], targets)


class Scorer:
    """Accumulates per-request sums; each pass adds its positions' scores."""

    def __init__(self, n: int):
        self.logprob = [0.0] * n
        self.greedy = [True] * n

    def add(self, owners: list[int], logp: torch.Tensor, hit: torch.Tensor) -> None:
        for i, lp, h in zip(owners, logp.tolist(), hit.tolist()):
            self.logprob[i] += lp
            self.greedy[i] = self.greedy[i] and h


@torch.inference_mode()
def _plain_batch(model: GPT, batch: list[_Request], scorer: Scorer) -> None:
    """One forward over context + continuation[:-1] of each request, right-padded."""
    device = _place(model)[0]
    inputs = [(r.context + r.continuation)[:-1] for r in batch]
    ids = torch.zeros(len(batch), max(map(len, inputs)), dtype=torch.long, device=device)
    rows, cols, targets, owners = [], [], [], []
    for row, (r, inp) in enumerate(zip(batch, inputs)):
        ids[row, : len(inp)] = torch.tensor(inp)
        n = len(r.continuation)
        rows += [row] * n
        cols += range(len(inp) - n, len(inp))
        targets += r.continuation
        owners += [r.index] * n
    scorer.add(owners, *_score(model, rows, cols, targets, idx=ids))


def _context_cache(model: GPT, contexts: list[list[int]]) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
    """Run contexts (left-padded) into a KV cache: (cache, lengths, fp32 log-probs (G, V) after each)."""
    device, config = _place(model)[0], model.config
    ids, positions, filled = left_pad(contexts, 0, device)
    cache = KVCache(config, len(contexts), ids.shape[1], model.cache_dtype, device)
    cache.hide_padding(filled)  # from every query
    lengths = torch.tensor([len(c) for c in contexts], device=device)
    logits = model(ids, positions, cache, last_only=True)[:, -1]  # (G, V): one position per context
    return cache, lengths, torch.log_softmax(logits.float(), dim=-1)


@torch.inference_mode()
def _shared_batch(model: GPT, groups: list[list[_Request]], scorer: Scorer, batch_size: int) -> None:
    """Each group's common context once (one forward for all groups, into a KV cache), then every
    continuation on top of its context's cache rows, batch_size continuations per forward, sorted by length."""
    device, n_positions = _place(model)[0], model.config.n_positions
    cache, lengths, first = _context_cache(model, [g[0].context for g in groups])
    members = [(g, r) for g, group in enumerate(groups) for r in group]
    rows = [g for g, _ in members]
    firsts = torch.tensor([r.continuation[0] for _, r in members], device=device)
    scorer.add([r.index for _, r in members], *_pick(first[rows], firsts))
    members = sorted((m for m in members if len(m[1].continuation) > 1), key=lambda m: -len(m[1].continuation))
    for i in range(0, len(members), batch_size):
        chunk = members[i : i + batch_size]
        width = len(chunk[0][1].continuation) - 1
        index = torch.tensor([g for g, _ in chunk], device=device)
        ids = torch.zeros(len(chunk), width, dtype=torch.long, device=device)
        rows, cols, targets, owners = [], [], [], []
        for row, (_, r) in enumerate(chunk):
            tail = r.continuation[:-1]
            ids[row, : len(tail)] = torch.tensor(tail)
            rows += [row] * len(tail)
            cols += range(len(tail))
            targets += r.continuation[1:]
            owners += [r.index] * len(tail)
        # right padding may run past the last position; it is never scored, so clamp it into range
        positions = (lengths[index][:, None] + torch.arange(width, device=device)).clamp(max=n_positions - 1)
        cache_rows = cache.rows(index, width)
        scorer.add(owners, *_score(model, rows, cols, targets, idx=ids, positions=positions, cache=cache_rows))


def loglikelihoods(
    model: GPT,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    max_len: int | None = None,
    batch_size: int = 8,
    share_context: bool = True,
    progress: Progress | None = None,
) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy?) per request, in request order.

    max_len: the context the model may read (default: the model's). batch_size: sequences per forward
    (shared contexts, or continuations on top of them, count one each). share_context=False scores each
    request alone.
    """
    max_len = max_len or model.config.n_positions
    prepared = prepare(requests, max_len)
    scorer = Scorer(len(prepared))
    groups: dict[tuple[int, ...], list[_Request]] = {}
    for r in prepared:
        groups.setdefault(tuple(r.context) if share_context else (r.index,), []).append(r)
    singles = sorted((g[0] for g in groups.values() if len(g) == 1), key=lambda r: -len(r.context + r.continuation))
    shared = sorted((g for g in groups.values() if len(g) > 1), key=lambda g: -len(g[0].context))
    for i in range(0, len(singles), batch_size):
        batch = singles[i : i + batch_size]
        _plain_batch(model, batch, scorer)
        if progress:
            progress(len(batch), sum(len(r.continuation) for r in batch))
    for i in range(0, len(shared), batch_size):  # batch_size contexts per forward, then their continuations
        batch = shared[i : i + batch_size]
        _shared_batch(model, batch, scorer, batch_size)
        if progress:
            progress(sum(map(len, batch)), sum(len(r.continuation) for g in batch for r in g))
    return list(zip(scorer.logprob, scorer.greedy))

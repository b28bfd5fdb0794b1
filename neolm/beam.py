"""Beam search (num_beams > 1), as transformers' generate runs it (its vectorised _beam_search).

Each prompt keeps num_beams running sequences ("beams"). A step scores every continuation of every beam by
its summed log-probability (the log-softmax of the logits, then the logits processors), takes the best
max(2, 1 + len(eos)) x num_beams, and sorts them into:
  - finished hypotheses: those among the first num_beams that end (an eos token, a stop string, or the token
    budget), scored by log-probability / (new tokens ** length_penalty); the num_beams best are kept;
  - the next running beams: the num_beams best that do not end.
A prompt is done when its budget is spent, or when no running beam can beat its worst finished hypothesis
(early_stopping False: judged at the current length; "never": at the longest length allowed, when
length_penalty > 0; True: as soon as num_beams hypotheses have finished). With do_sample the continuations
are drawn (without replacement) from the softmax of the summed scores, after the sampling warpers.

Prompts are batched (left-padded) but each gets what it would alone: its own lengths and budget. The KV
cache holds a row per beam; each step moves the rows to follow the beams that were kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from neolm.errors import NeolmError
from neolm.generate import left_pad
from neolm.generation_config import GenerationConfig, fit_prompts
from neolm.model import GPT, KVCache
from neolm.sampling import Processors, RowState, StopStrings, criteria_met, seeded_generator

LOST = -1.0e9  # the score of a candidate that cannot be chosen (transformers' value)


@torch.inference_mode()
def beam_search(
    model: GPT, prompts: Sequence[Sequence[int]], gc: GenerationConfig, decode: Callable[[list[int]], str] | None = None
) -> list[list[int]]:
    """The new tokens of each prompt's num_return_sequences best hypotheses, best first (prompt-major; an eos
    that ended one is included). `decode` (token ids -> text) is needed for stop_strings."""
    return beam_hypotheses(model, prompts, gc, decode).sequences


@dataclass
class Hypotheses:
    """beam_search's hypotheses (prompt-major, best first) with their scores."""

    sequences: list[list[int]]  # each hypothesis's new tokens
    scores: list[float]  # sum of its tokens' log-probabilities (processed) / new tokens ** length_penalty
    token_scores: list[torch.Tensor] | None = None  # (new tokens, V): the processed log-probabilities each came from
    token_logits: list[torch.Tensor] | None = None  # (new tokens, V): the model's logits each came from


@torch.inference_mode()
def beam_hypotheses(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    gc: GenerationConfig,
    decode: Callable[[list[int]], str] | None = None,
    keep_scores: bool = False,
    keep_logits: bool = False,
) -> Hypotheses:
    """beam_search's hypotheses and their scores, transformers' sequences_scores (0 for a prompt with no budget);
    with keep_scores / keep_logits, each token's row of the step that chose it, from the beam it continued
    (transformers' scores / logits gathered along its beam_indices)."""
    config, device = model.config, model.ln_f.weight.device
    prompts = fit_prompts(prompts, gc, config.n_positions, config.vocab_size)
    gc.check_vocab(config.vocab_size)
    P, B, V = len(prompts), gc.num_beams, config.vocab_size
    budgets = [gc.new_token_budget(len(p)) for p in prompts]
    if not prompts or max(budgets) == 0:
        n = P * gc.num_return_sequences
        empty = [torch.empty(0, V) for _ in range(n)]
        return Hypotheses([[] for _ in range(n)], [0.0] * n, empty if keep_scores else None,
                          empty if keep_logits else None)  # fmt: skip
    eos_ids = gc.eos_ids(config.eos_token_id)
    if gc.stop_strings and decode is None:
        raise NeolmError("stop_strings need a tokenizer to decode the text")
    stops = StopStrings(gc.stop_strings, decode) if gc.stop_strings else None
    processors = Processors(gc, eos_ids, V, device, min_tokens_to_keep=len(eos_ids) + 1)
    K = max(2, 1 + len(eos_ids)) * B  # candidates kept per step
    generator = seeded_generator(gc.seed, device) if gc.do_sample else None
    T = max(budgets)
    deadline = gc.deadline()

    # the prompts, read once each, then a cache row per beam
    tokens, positions, filled = left_pad(prompts, eos_ids[0] if eos_ids else 0, device)
    cache = KVCache(config, P, tokens.shape[1], model.cache_dtype, device)
    cache.hide_padding(filled)
    logits = model(tokens, positions, cache, last_only=True)[:, -1].float().repeat_interleave(B, 0)  # (P*B, V)
    cache = cache.rows(torch.arange(P, device=device).repeat_interleave(B), extra=T)
    positions = positions[:, -1:].repeat_interleave(B, 0)  # (P*B, 1)

    budget = torch.tensor(budgets, device=device)[:, None]  # (P, 1)
    running = torch.zeros(P, B, T, dtype=torch.long, device=device)  # the beams' new tokens
    running_rows = torch.zeros(P, B, T, dtype=torch.long, device=device)  # the row (p * B + beam) each came from
    running_scores = torch.full((P, B), LOST, device=device)
    running_scores[:, 0] = 0  # at first all beams are the same: only one may continue
    finished = torch.zeros(P, B, T, dtype=torch.long, device=device)
    finished_scores = torch.full((P, B), LOST, device=device)
    finished_lengths = torch.zeros(P, B, dtype=torch.long, device=device)
    finished_rows = torch.zeros(P, B, T, dtype=torch.long, device=device)
    kept: dict[str, list[torch.Tensor]] = {"scores": [], "logits": []}  # per step (P * B, V)
    is_finished = torch.zeros(P, B, dtype=torch.bool, device=device)
    open_ = torch.ones(P, dtype=torch.bool, device=device)  # may still improve
    first_b = torch.arange(K, device=device) < B  # (K,) only the best num_beams candidates may finish
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)

    for t in range(T):
        state = _state(processors.needs, prompts, budgets, running, t, B, V)
        log_probs = processors(torch.log_softmax(logits, dim=-1), state)
        if keep_scores:
            kept["scores"].append(log_probs)
        if keep_logits:
            kept["logits"].append(logits)
        scores = (log_probs.view(P, B, V) + running_scores[:, :, None]).view(P, B * V)
        if gc.do_sample:
            picked = torch.multinomial(scores.softmax(dim=-1), K, generator=generator)
            top_scores = scores.gather(1, picked)
        else:
            top_scores, picked = torch.topk(scores, K)  # (P, K)
        origin, token = picked // V, picked % V
        candidates = running.gather(1, origin[:, :, None].expand(P, K, T)).clone()  # (P, K, T)
        candidates[:, :, t] = token
        rows = origin + torch.arange(P, device=device)[:, None] * B  # (P, K) the beams' rows
        candidate_rows = running_rows.gather(1, origin[:, :, None].expand(P, K, T)).clone()
        candidate_rows[:, :, t] = rows
        ends = torch.isin(token, eos) | (t + 1 >= budget)  # (P, K)
        if time.monotonic() > deadline:  # max_time: every candidate ends here, as at the length limit
            ends = torch.ones_like(ends)
        if stops is not None:
            ends |= _stop_hits(stops, prompts, candidates, t)
        if gc.stopping_criteria:
            ends |= _criteria_hits(gc.stopping_criteria, prompts, candidates, t, log_probs, rows)

        # the next running beams: the best candidates that do not end
        keep = torch.topk(top_scores + ends.float() * LOST, B).indices  # (P, B)
        running_scores = (top_scores + ends.float() * LOST).gather(1, keep)
        running = candidates.gather(1, keep[:, :, None].expand(P, B, T))
        running_rows = candidate_rows.gather(1, keep[:, :, None].expand(P, B, T))
        beam_rows = (origin.gather(1, keep) + torch.arange(P, device=device)[:, None] * B).view(-1)

        # finished hypotheses: merge those that end among the first num_beams into the best num_beams
        ended = ends & first_b
        normed = top_scores / float(t + 1) ** gc.length_penalty
        full = is_finished.all(dim=1, keepdim=True) & (gc.early_stopping is True)
        normed = normed + (full | ~open_[:, None]).float() * LOST + (~ended).float() * LOST
        merged_scores = torch.cat((finished_scores, normed), 1)
        best = torch.topk(merged_scores, B).indices  # (P, B)
        finished_scores = merged_scores.gather(1, best)
        finished = torch.cat((finished, candidates), 1).gather(1, best[:, :, None].expand(P, B, T))
        finished_rows = torch.cat((finished_rows, candidate_rows), 1).gather(1, best[:, :, None].expand(P, B, T))
        new_lengths = torch.cat((finished_lengths, torch.full_like(token, t + 1)), 1)
        finished_lengths = new_lengths.gather(1, best)
        is_finished = torch.cat((is_finished, ended), 1).gather(1, best)

        # which prompts may still improve: the best running beam against the worst finished hypothesis
        longest = budget if gc.early_stopping == "never" and gc.length_penalty > 0 else torch.full_like(budget, t + 1)
        best_possible = running_scores[:, :1] / longest.float() ** gc.length_penalty
        worst = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True).values, LOST)
        open_ &= (best_possible > worst).any(dim=1)
        open_ &= ~(is_finished.all(dim=1) & (gc.early_stopping is True)) & ~ends.all(dim=1) & (t + 1 < budget[:, 0])
        if not bool(open_.any()):
            break
        if not torch.equal(beam_rows, torch.arange(P * B, device=device)):
            cache.reorder(beam_rows)
        positions = positions + 1
        logits = model(running[:, :, t].reshape(-1, 1), positions, cache)[:, -1].float()

    n = gc.num_return_sequences
    lengths_out = finished_lengths[:, :n].tolist()
    sequences, scores = finished[:, :n].tolist(), finished_scores[:, :n].tolist()
    lengths = [length if budgets[p] else 0 for p in range(P) for length in lengths_out[p]]
    out = Hypotheses([seq[:length] for seq, length in zip((s for p in sequences for s in p), lengths)],
                     [score if budgets[p] else 0.0 for p in range(P) for score in scores[p]])  # fmt: skip
    rows = finished_rows[:, :n].reshape(P * n, T)
    for name, steps in kept.items():
        if steps:  # each hypothesis's token t: row `rows[h, t]` of step t
            table = torch.stack(steps)  # (steps, P * B, V)
            picked = [table[torch.arange(length, device=device), rows[h, :length]] for h, length in enumerate(lengths)]
            setattr(out, f"token_{name}", picked)
    return out


def _state(needs: RowState, prompts, budgets, running: torch.Tensor, t: int, B: int, V: int) -> RowState:
    """What the processors read of each beam (rows prompt-major), at step t (t new tokens so far)."""
    P = len(prompts)
    device = running.device
    new = running[:, :, :t].reshape(P * B, t)
    state = RowState()
    if needs.new or needs.lengths or needs.budgets:
        state.new = torch.full((P * B,), t, device=device)
        state.lengths = torch.tensor([len(p) + t for p in prompts], device=device).repeat_interleave(B)
        state.budgets = torch.tensor(budgets, device=device).repeat_interleave(B)
    if needs.seen:
        state.seen = torch.zeros(P * B, V, dtype=torch.bool, device=device)
        for p, prompt in enumerate(prompts):
            state.seen[p * B : (p + 1) * B, torch.tensor(prompt)] = True
        state.seen.scatter_(1, new, True)
    if needs.made:
        state.made = torch.zeros(P * B, V, dtype=torch.int32, device=device)
        state.made.scatter_add_(1, new, torch.ones_like(new, dtype=torch.int32))
    if needs.tokens:
        held = new.tolist()
        state.tokens = [list(prompts[row // B]) + held[row] for row in range(P * B)]
    if needs.prompts:
        state.prompts = [row // B for row in range(P * B)]
    return state


def _criteria_hits(criteria, prompts, candidates: torch.Tensor, t: int, log_probs: torch.Tensor,
                   rows: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(P, K) whether a stopping criterion ends each candidate, given its tokens (prompt and new) and the scores
    (V,) its last token was chosen from (its beam's row of log_probs (P * B, V))."""
    held, origin = candidates[:, :, : t + 1].tolist(), rows.tolist()
    hits = [[criteria_met(criteria, list(prompts[p]) + seq, log_probs[row]) for seq, row in zip(held[p], origin[p])]
            for p in range(len(prompts))]  # fmt: skip
    return torch.tensor(hits, dtype=torch.bool, device=candidates.device)


def _stop_hits(stops: StopStrings, prompts, candidates: torch.Tensor, t: int) -> torch.Tensor:
    """(P, K) whether each candidate's text now ends in a stop string."""
    held = candidates[:, :, : t + 1].tolist()
    hits = [[stops.hit(list(prompts[p]) + seq) for seq in held[p]] for p in range(len(prompts))]
    return torch.tensor(hits, dtype=torch.bool, device=candidates.device)

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

Diverse beam search (num_beam_groups > 1; Vijayakumar et al. 2016, as transformers 4 ran it, now on the hub):
the num_beams beams split into groups of num_beams / num_beam_groups, each a beam search of its own as above
(its own finished hypotheses, its own "done"). Within a step the groups choose in turn, and a group's
log-probabilities lose diversity_penalty per time a group before it chose the token at this step (after the
sequence biases, before repetition_penalty, where transformers' HammingDiversityLogitsProcessor sits); a group
that is done counts as choosing the pad token. The result is the best hypotheses of all groups.

Prompts are batched (left-padded) but each gets what it would alone: its own lengths and budget. The KV
cache holds a row per beam; each step moves the rows to follow the beams that were kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from neolm.errors import NeolmError
from neolm.generate import left_pad, prompt_tokens
from neolm.generation_config import GenerationConfig, fit_prompts
from neolm.model import GPT, KVCache, prefill
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
    if gc.force_words_ids is not None or gc.constraints is not None:
        from neolm.constrained import constrained_hypotheses  # (it builds on this module)

        return constrained_hypotheses(model, prompts, gc, keep_scores, keep_logits)
    config, device = model.config, model.ln_f.weight.device
    prompts = fit_prompts(prompts, gc, config.n_positions, config.vocab_size)
    gc.check_vocab(config.vocab_size)
    P, B, V = len(prompts), gc.num_beams, config.vocab_size
    G = gc.num_beam_groups
    S, Q = B // G, P * G  # beams per group; searches (one per prompt and group, prompt-major)
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
    K = max(2, 1 + len(eos_ids)) * S  # candidates kept per search and step
    generator = seeded_generator(gc.seed, device) if gc.do_sample else None
    T = max(budgets)
    deadline = gc.deadline()
    # a group that is done chooses the pad token from then on (transformers pads it), which later groups avoid
    pad = gc.pad_token_id if gc.pad_token_id is not None else eos_ids[0] if eos_ids else 0

    # the prompts, read once each, then a cache row per beam (row p * B + g * S + s = search q * S + s)
    tokens, positions, filled = left_pad(prompts, eos_ids[0] if eos_ids else 0, device)
    cache = KVCache(config, P, tokens.shape[1], model.cache_dtype, device)
    cache.hide_padding(filled)
    logits = prefill(model, tokens, cache, positions, gc.prefill_chunk_size, last_only=True)[:, -1].float()
    logits = logits.repeat_interleave(B, 0)  # (P*B, V)
    cache = cache.rows(torch.arange(P, device=device).repeat_interleave(B), extra=T)
    positions = positions[:, -1:].repeat_interleave(B, 0)  # (P*B, 1)

    budget = torch.tensor(budgets, device=device).repeat_interleave(G)[:, None]  # (Q, 1)
    running = torch.zeros(Q, S, T, dtype=torch.long, device=device)  # the beams' new tokens
    running_rows = torch.zeros(Q, S, T, dtype=torch.long, device=device)  # the row (q * S + beam) each came from
    running_scores = torch.full((Q, S), LOST, device=device)
    running_scores[:, 0] = 0  # at first all beams are the same: only one per search may continue
    finished = torch.zeros(Q, S, T, dtype=torch.long, device=device)
    finished_scores = torch.full((Q, S), LOST, device=device)
    finished_lengths = torch.zeros(Q, S, dtype=torch.long, device=device)
    finished_rows = torch.zeros(Q, S, T, dtype=torch.long, device=device)
    kept: dict[str, list[torch.Tensor]] = {"scores": [], "logits": []}  # per step (P * B, V)
    is_finished = torch.zeros(Q, S, dtype=torch.bool, device=device)
    open_ = torch.ones(Q, dtype=torch.bool, device=device)  # may still improve
    first_b = torch.arange(K, device=device) < S  # (K,) only the best S candidates may finish
    eos = torch.tensor(eos_ids, dtype=torch.long, device=device)

    for t in range(T):
        state = row_state(processors.needs, prompts, budgets, running.view(P, B, T), t, B, V)
        raw = torch.log_softmax(logits, dim=-1).view(Q, S, V)
        parts: dict[str, list[torch.Tensor]] = {"log_probs": [], "scores": [], "candidates": [], "rows": [], "ends": []}
        chosen = torch.zeros(P, V, device=device)  # the tokens the groups before chose this step, per prompt
        for g in range(G):  # the groups in turn (one: plain beam search), each of all prompts at once
            group_state = state if G == 1 else state.take(torch.arange(Q * S, device=device).view(Q, S)[g::G].flatten())
            if gc.diversity_penalty:
                group_state.diversity = chosen.repeat_interleave(S, 0)
            log_probs = processors(raw[g::G].reshape(P * S, V), group_state)  # (P*S, V)
            scores = (log_probs.view(P, S, V) + running_scores[g::G, :, None]).view(P, S * V)
            if gc.do_sample:
                picked = torch.multinomial(scores.softmax(dim=-1), K, generator=generator)
                top_scores = scores.gather(1, picked)
            else:
                top_scores, picked = torch.topk(scores, K)  # (P, K)
            origin, token = picked // V, picked % V
            candidates = running[g::G].gather(1, origin[:, :, None].expand(P, K, T)).clone()  # (P, K, T)
            candidates[:, :, t] = token
            rows = origin + (torch.arange(P, device=device)[:, None] * G + g) * S  # (P, K) the beams' rows
            candidate_rows = running_rows[g::G].gather(1, origin[:, :, None].expand(P, K, T)).clone()
            candidate_rows[:, :, t] = rows
            stopped = torch.isin(token, eos)  # (P, K)
            if stops is not None:
                stopped |= _stop_hits(stops, prompts, candidates, t)
            if gc.stopping_criteria:
                own_rows = origin + torch.arange(P, device=device)[:, None] * S  # rows of log_probs
                stopped |= _criteria_hits(gc.stopping_criteria, prompts, candidates, t, log_probs, own_rows)
            ends = stopped | (t + 1 >= budget[g::G])
            if time.monotonic() > deadline:  # max_time: every candidate ends here, as at the length limit
                ends = torch.ones_like(ends)
            for name, part in zip(parts, (log_probs.view(P, S, V), top_scores, candidates, candidate_rows, ends)):
                parts[name].append(part)
            if g + 1 < G:  # the tokens of the group's best S candidates that go on (the pad token where it is done)
                going_on = torch.sort(stopped.to(torch.uint8), dim=1, stable=True).indices[:, :S]  # (best first)
                next_tokens = token.gather(1, going_on).masked_fill(~open_[g::G, None], pad)
                chosen.scatter_add_(1, next_tokens, torch.ones_like(next_tokens, dtype=chosen.dtype))
        log_probs, top_scores, candidates, candidate_rows, ends = map(_interleave, parts.values())
        log_probs = log_probs.view(P * B, V)
        if keep_scores:
            kept["scores"].append(log_probs)
        if keep_logits:
            kept["logits"].append(logits)
        token = candidates[:, :, t]

        # the next running beams: the best candidates that do not end
        keep = torch.topk(top_scores + ends.float() * LOST, S).indices  # (Q, S)
        running_scores = (top_scores + ends.float() * LOST).gather(1, keep)
        running = candidates.gather(1, keep[:, :, None].expand(Q, S, T))
        running_rows = candidate_rows.gather(1, keep[:, :, None].expand(Q, S, T))
        beam_rows = running_rows[:, :, t].reshape(-1)

        # finished hypotheses: merge those that end among the first S into the best S of the search
        ended = ends & first_b
        normed = top_scores / float(t + 1) ** gc.length_penalty
        full = is_finished.all(dim=1, keepdim=True) & (gc.early_stopping is True)
        normed = normed + (full | ~open_[:, None]).float() * LOST + (~ended).float() * LOST
        merged_scores = torch.cat((finished_scores, normed), 1)
        best = torch.topk(merged_scores, S).indices  # (Q, S)
        finished_scores = merged_scores.gather(1, best)
        finished = torch.cat((finished, candidates), 1).gather(1, best[:, :, None].expand(Q, S, T))
        finished_rows = torch.cat((finished_rows, candidate_rows), 1).gather(1, best[:, :, None].expand(Q, S, T))
        new_lengths = torch.cat((finished_lengths, torch.full_like(token, t + 1)), 1)
        finished_lengths = new_lengths.gather(1, best)
        is_finished = torch.cat((is_finished, ended), 1).gather(1, best)

        # which searches may still improve: the best running beam against the worst finished hypothesis
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

    # each prompt's best num_return_sequences hypotheses, over its groups
    n = gc.num_return_sequences
    order = torch.sort(finished_scores.view(P, B), dim=1, descending=True, stable=True).indices[:, :n]  # (P, n)
    scores_out = finished_scores.view(P, B).gather(1, order).tolist()
    lengths_out = finished_lengths.view(P, B).gather(1, order).tolist()
    sequences = finished.view(P, B, T).gather(1, order[:, :, None].expand(P, n, T)).tolist()
    lengths = [length if budgets[p] else 0 for p in range(P) for length in lengths_out[p]]
    out = Hypotheses([seq[:length] for seq, length in zip((s for p in sequences for s in p), lengths)],
                     [score if budgets[p] else 0.0 for p in range(P) for score in scores_out[p]])  # fmt: skip
    rows = finished_rows.view(P, B, T).gather(1, order[:, :, None].expand(P, n, T)).reshape(P * n, T)
    for name, steps in kept.items():
        if steps:  # each hypothesis's token t: row `rows[h, t]` of step t
            table = torch.stack(steps)  # (steps, P * B, V)
            picked = [table[torch.arange(length, device=device), rows[h, :length]] for h, length in enumerate(lengths)]
            setattr(out, f"token_{name}", picked)
    return out


def _interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """Each group's (P, ...) part of a step, back in search order (Q = P * G, ...): search q = p * G + g."""
    return parts[0] if len(parts) == 1 else torch.stack(parts, 1).flatten(0, 1)


def row_state(needs: RowState, prompts, budgets, running: torch.Tensor, t: int, B: int, V: int) -> RowState:
    """What the processors read of each beam (rows prompt-major), at step t (t new tokens so far)."""
    P = len(prompts)
    device = running.device
    new = running[:, :, :t].reshape(P * B, t)
    state = RowState()
    if needs.new or needs.lengths or needs.budgets:
        state.new = torch.full((P * B,), t, device=device)
        state.lengths = torch.tensor([len(p) + t for p in prompts], device=device).repeat_interleave(B)
        state.budgets = torch.tensor(budgets, device=device).repeat_interleave(B)
    if needs.seen or needs.prompted:
        prompted = prompt_tokens(prompts, V, device).repeat_interleave(B, 0)  # (P*B, V)
        state.prompted = prompted if needs.prompted else None
        state.seen = prompted.clone().scatter_(1, new, True) if needs.seen else None
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

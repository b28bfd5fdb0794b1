"""Constrained beam search (force_words_ids, constraints; Hokamp & Liu 2017, Post & Vilar 2018), as transformers 4
ran it (its _constrained_beam_search and ConstrainedBeamSearchScorer; transformers 5 moved it to the hub, as
transformers-community/constrained-beam-search).

Each constraint is a phrase (token ids that must appear in order, together) or a choice of phrases (any one of
them). A sequence's progress is its constraints fulfilled, in any order, one at a time, from the start of the
sequence (prompt included): the "bank" of a beam is how far it has come (max phrase length per fulfilled
constraint, plus the tokens of the one in progress). A step is beam search's (the best 2 x num_beams
continuations; those ending at eos become finished hypotheses, but only if they fulfil every constraint), and
then every beam also proposes the tokens that would advance its constraints. Of all these, the next beams are
taken in turns from the banks, best bank first (the best of each bank, then the second best of each, ...), so
beams that made progress survive beside likelier ones that did not. At the length limit, the beams that fulfil
every constraint become hypotheses; when fewer than num_return_sequences do, the others are taken too.

It is best effort, as in transformers: a beam that has met every constraint proposes nothing more and competes on
likelihood alone, so it may fall out for likelier beams that then meet the constraints again later.

Prompts run one at a time, each with a KV cache row per beam.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence

import torch

from neolm.generation_config import GenerationConfig, fit_prompts
from neolm.model import GPT, KVCache, prefill
from neolm.sampling import Processors

LOST = -1.0e9  # the starting score of all beams but the first (transformers' value)


class Phrase:
    """Token ids that must appear in order (transformers' PhrasalConstraint). constraints=[Phrase(ids), ...] is
    force_words_ids=[ids, ...]."""

    def __init__(self, ids: Sequence[int]):
        self.token_ids, self.length = list(ids), len(ids)
        self.done = 0  # tokens fulfilled
        self.completed = False

    def next_tokens(self) -> list[int]:
        return [] if self.completed else [self.token_ids[self.done]]

    def update(self, token: int) -> tuple[bool, bool]:
        """(stepped, broken): the token advances the phrase, or breaks its progress."""
        if token in self.next_tokens():
            self.done += 1
            self.completed = self.done == self.length
            return True, False
        return False, True

    def remaining(self) -> int:
        return self.length - self.done


class Choice:
    """Any one of several phrases (transformers' DisjunctiveConstraint), followed through their trie.
    constraints=[Choice([ids, ids]), ...] is force_words_ids=[[ids, ids], ...]."""

    def __init__(self, phrases: Sequence[Sequence[int]]):
        self.token_ids = [list(p) for p in phrases]
        self.trie: dict = {}
        for phrase in self.token_ids:
            node = self.trie
            for token in phrase:
                node = node.setdefault(token, {})
        self.length = max(len(p) for p in self.token_ids)
        self.seq: list[int] = []
        self.completed = False

    def next_tokens(self) -> list[int]:
        node = self.trie
        for token in self.seq:
            node = node[token]
        return list(node)

    def update(self, token: int) -> tuple[bool, bool]:
        stepped = token in self.next_tokens()
        self.seq = [*self.seq, token] if stepped else []
        self.completed = not self.next_tokens()  # a leaf: a whole phrase
        return stepped, not stepped

    def remaining(self) -> int:
        return 0 if self.completed else self.length - len(self.seq)


def make_constraint(spec: list) -> Phrase | Choice:
    """A phrase from [ids], a choice from [[ids], [ids], ...], at its start."""
    return Choice(spec) if isinstance(spec[0], list) else Phrase(spec)


class Progress:
    """How far a sequence has come through the constraints (transformers' ConstraintListState): those fulfilled,
    the one in progress (at most one), those pending."""

    def __init__(self, specs: list[list]):
        self.specs = specs
        self.longest = max(make_constraint(s).length for s in specs)
        self.reset(())

    def reset(self, tokens: Sequence[int]) -> Progress:
        """The progress of a sequence of these tokens, from the start."""
        self.fulfilled: list[Phrase | Choice] = []
        self.current: Phrase | Choice | None = None
        self.pending = [make_constraint(s) for s in self.specs]
        self.completed = False
        for token in tokens:
            self.add(token)
            if self.completed:
                break
        return self

    def bank(self) -> int:
        partial = self.longest - self.current.remaining() if self.current is not None else 0
        return len(self.fulfilled) * self.longest + partial

    def next_tokens(self) -> list[int]:
        """The tokens that would advance a constraint (the one in progress, else any pending one)."""
        if self.current is not None:
            return self.current.next_tokens()
        return [t for c in self.pending for t in c.next_tokens()]

    def add(self, token: int) -> None:
        if self.completed:
            return
        if self.current is not None:
            _, broken = self.current.update(token)
            if broken:  # back to pending, from its start (the token is not tried on the others: transformers')
                self.pending.append(make_constraint(self.current.token_ids))
                self.current = None
            elif self.current.completed:
                self.fulfilled.append(self.current)
                self.current = None
                self.completed = not self.pending
            return
        for i, constraint in enumerate(self.pending):
            if token in constraint.next_tokens():
                constraint.update(token)
                if constraint.completed:
                    self.fulfilled.append(constraint)
                else:
                    self.current = constraint
                del self.pending[i]
                self.completed = not self.pending and self.current is None
                break  # one token steps one constraint at most


class Finished:
    """A prompt's finished hypotheses, the num_beams best kept (transformers' BeamHypotheses)."""

    def __init__(self, gc: GenerationConfig, budget: int):
        self.size, self.length_penalty, self.early_stopping, self.budget = gc.num_beams, gc.length_penalty, \
            gc.early_stopping, budget  # fmt: skip
        self.kept: list[tuple[float, list[int], list[int]]] = []  # (score, new tokens, the row of each step)
        self.worst = 1e9

    def add(self, tokens: list[int], rows: list[int], log_prob: float) -> None:
        score = log_prob / len(tokens) ** self.length_penalty
        if len(self.kept) < self.size or score > self.worst:
            self.kept.append((score, tokens, rows))
            if len(self.kept) > self.size:
                ranked = sorted((s, i) for i, (s, _, _) in enumerate(self.kept))
                del self.kept[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def done(self, best_log_prob: float, new_tokens: int) -> bool:
        if len(self.kept) < self.size:
            return False
        if self.early_stopping is True:
            return True
        longest = self.budget if self.early_stopping == "never" and self.length_penalty > 0 else new_tokens
        return self.worst >= best_log_prob / longest**self.length_penalty

    def best(self, n: int) -> list[tuple[float, list[int], list[int]]]:
        ranked = sorted(self.kept, key=lambda h: h[0])
        return [ranked.pop() for _ in range(n)]


@torch.inference_mode()
def constrained_hypotheses(model: GPT, prompts: Sequence[Sequence[int]], gc: GenerationConfig, keep_scores: bool,
                           keep_logits: bool):  # fmt: skip
    """beam.Hypotheses of constrained beam search (gc.constraint_specs()), prompt-major."""
    from neolm.beam import Hypotheses  # (beam.py hands constrained search to this module)

    config = model.config
    prompts = fit_prompts(prompts, gc, config.n_positions, config.vocab_size)
    gc.check_vocab(config.vocab_size)
    specs = gc.constraint_specs()
    out = Hypotheses([], [], [] if keep_scores else None, [] if keep_logits else None)
    deadline = gc.deadline()
    for prompt in prompts:
        hypotheses = _search(model, list(prompt), gc, specs, deadline, keep_scores, keep_logits)
        for score, tokens, scores, logits in hypotheses:
            out.sequences.append(tokens)
            out.scores.append(score)
            if keep_scores:
                out.token_scores.append(scores)
            if keep_logits:
                out.token_logits.append(logits)
    return out


def _search(model: GPT, prompt: list[int], gc: GenerationConfig, specs: list[list], deadline: float,
            keep_scores: bool, keep_logits: bool) -> list[tuple]:  # fmt: skip
    """One prompt's num_return_sequences best hypotheses: (score, new tokens, their scores rows, logits rows)."""
    from neolm.beam import row_state

    config, device = model.config, model.ln_f.weight.device
    B, V, n = gc.num_beams, config.vocab_size, gc.num_return_sequences
    budget = gc.new_token_budget(len(prompt))
    if budget == 0:
        return [(0.0, [], torch.empty(0, V), torch.empty(0, V)) for _ in range(n)]
    eos_ids = gc.eos_ids(config.eos_token_id)
    processors = Processors(gc, eos_ids, V, device, min_tokens_to_keep=len(eos_ids) + 1)
    K = max(2, 1 + len(eos_ids)) * B
    cache = KVCache(config, 1, len(prompt), model.cache_dtype, device)
    x = torch.tensor([prompt], device=device)
    logits = prefill(model, x, cache, chunk=gc.prefill_chunk_size, last_only=True)[:, -1].float()
    logits = logits.expand(B, V)
    cache = cache.rows(torch.zeros(B, dtype=torch.long, device=device), extra=budget)
    positions = torch.full((B, 1), len(prompt), device=device)
    beams: list[list[int]] = [[] for _ in range(B)]  # new tokens
    rows: list[list[int]] = [[] for _ in range(B)]  # the row each token was chosen from, step by step
    scores = torch.full((B,), LOST, device=device)
    scores[0] = 0.0
    finished = Finished(gc, budget)
    kept: dict[str, list[torch.Tensor]] = {"scores": [], "logits": []}
    for t in range(budget):
        running = torch.tensor([beams], dtype=torch.long, device=device).view(1, B, t)
        state = row_state(processors.needs, [prompt], [budget], running, t, B, V)
        log_probs = processors(torch.log_softmax(logits, dim=-1), state)
        if keep_scores:
            kept["scores"].append(log_probs)
        if keep_logits:
            kept["logits"].append(logits)
        totals = log_probs + scores[:, None]  # (B, V)
        top, picked = torch.topk(totals.view(-1), K)
        chosen: list[tuple[float, int, int]] = []  # (score, token, beam) of the next beams
        for rank, (score, index) in enumerate(zip(top.tolist(), picked.tolist())):
            beam, token = divmod(index, V)
            if token in eos_ids:
                if rank < B and Progress(specs).reset(prompt + beams[beam]).completed:
                    finished.add(beams[beam] + [token], rows[beam] + [beam], score)
            else:
                chosen.append((score, token, beam))
            if len(chosen) == B:
                break
        chosen = _advance(specs, prompt, beams, chosen, totals)
        done = finished.done(top.max().item(), t + 1)
        beams = [beams[b] + [token] for _, token, b in chosen]
        rows = [rows[b] + [b] for _, _, b in chosen]
        scores = torch.tensor([score for score, _, _ in chosen], device=device)
        if done or t + 1 == budget or time.monotonic() > deadline:
            break
        order = torch.tensor([b for _, _, b in chosen], device=device)
        if not torch.equal(order, torch.arange(B, device=device)):
            cache.reorder(order)
        logits = model(torch.tensor([[token] for _, token, _ in chosen], device=device), positions + t, cache)
        logits = logits[:, -1].float()
    if not done:  # the beams that fulfil every constraint; others too when there are not enough
        fulfil = [Progress(specs).reset(prompt + seq).completed for seq in beams]
        for b in range(B):
            if fulfil[b]:
                finished.add(beams[b], rows[b], scores[b].item())
        if sum(fulfil) < n:
            for b in range(B):
                if not fulfil[b]:
                    finished.add(beams[b], rows[b], scores[b].item())
    out = []
    for score, tokens, token_rows in finished.best(n):
        steps = torch.arange(len(tokens))
        picked = {name: torch.stack(table)[steps, token_rows] if table else None for name, table in kept.items()}
        out.append((score, tokens, picked["scores"], picked["logits"]))
    return out


def _advance(specs: list[list], prompt: list[int], beams: list[list[int]], chosen: list[tuple[float, int, int]],
             totals: torch.Tensor) -> list[tuple[float, int, int]]:  # fmt: skip
    """The next beams (score, token, beam) from beam search's choice and, beside it, each beam continued by every
    token that advances its constraints: taken in turns from the banks, best bank first, best score first."""
    candidates = [(score, token, b, Progress(specs).reset(prompt + beams[b] + [token]).bank())
                  for score, token, b in chosen]  # fmt: skip
    seen = [beams[b] + [token] for _, token, b in chosen]
    for b, seq in enumerate(beams):
        progress = Progress(specs).reset(prompt + seq)
        if progress.completed:
            continue
        for token in progress.next_tokens():
            if seq + [token] in seen:  # (the same sequence once)
                continue
            seen.append(seq + [token])
            after = copy.deepcopy(progress)
            after.add(token)
            candidates.append((totals[b, token].item(), token, b, after.bank()))
    if len(candidates) == len(chosen):
        return chosen
    banks = torch.tensor([c[3] for c in candidates])
    order = (banks * 100 + torch.tensor([c[0] for c in candidates])).sort(descending=True).indices.tolist()
    turn, previous, turns = -1, None, []
    for bank in banks[order].tolist():  # each candidate's rank within its bank
        turn = turn + 1 if bank == previous else 0
        previous = bank
        turns.append(turn)
    by_turn = sorted(range(len(order)), key=lambda i: turns[i])  # (stable: best bank first within a turn)
    return [candidates[order[i]][:3] for i in by_turn[: len(chosen)]]

"""One step's choice of tokens: transformers' logits processors and warpers, greedy and sampled picks, stop
strings, and the model's log-probabilities of tokens (for the server and for scoring)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from neolm import native
from neolm.errors import NeolmError
from neolm.guidance import guide
from neolm.structured import Follower, Guide
from neolm.synthid import SynthID
from neolm.watermark import marker

if TYPE_CHECKING:
    from neolm.generation_config import GenerationConfig
    from neolm.model import GPT


@dataclass
class RowState:
    """What the processors read of each row (N rows) besides its logits; a field is None when no processor of
    the settings in use reads it (Processors.needs)."""

    lengths: torch.Tensor | None = None  # (N,) prompt + new tokens
    new: torch.Tensor | None = None  # (N,) new tokens so far
    budgets: torch.Tensor | None = None  # (N,) new tokens allowed
    seen: torch.Tensor | None = None  # (N, V) bool: the tokens the sequence holds (repetition_penalty)
    prompted: torch.Tensor | None = None  # (N, V) bool: the tokens its prompt holds (encoder_repetition_penalty)
    made: torch.Tensor | None = None  # (N, V) int: how often each was generated (presence/frequency penalty)
    tokens: Sequence[Sequence[int]] | None = None  # prompt + new tokens (n-grams, sequence biases)
    prompts: Sequence[int] | None = None  # which prompt of its generate() call (prefix_allowed_tokens_fn's batch_id)
    unconditional: torch.Tensor | None = None  # (N, V) guidance's unconditional log-probabilities (neolm.guidance)
    diversity: torch.Tensor | None = None  # (N, V) diverse beam search: how often the groups before chose each token

    def take(self, rows: torch.Tensor) -> RowState:
        """The state of these rows only (N' indices)."""
        index = rows.tolist()
        taken = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, torch.Tensor):
                value = value[rows]
            elif value is not None:
                value = [value[i] for i in index]
            taken[field.name] = value
        return RowState(**taken)


class Processors:
    """transformers' logits processors and warpers for one GenerationConfig, in transformers' order (its
    generate's _get_logits_processor), applied to fp32 scores (N, V): logits, or log-probabilities in beam
    search. Each row is one sequence as it would be alone: its own prompt, lengths and history (no padding).
    Two additions of OpenAI's API are applied after repetition_penalty, as vLLM does: presence_penalty and
    frequency_penalty, over the tokens generated so far."""

    def __init__(self, gc: GenerationConfig, eos_ids: list[int], vocab: int, device, min_tokens_to_keep: int = 1):
        self.gc, self.eos_ids, self.vocab, self.keep = gc, eos_ids, vocab, min_tokens_to_keep
        self.bias, self.sequence_biases = _biases(gc.sequence_bias or {}, vocab, device)
        bad = [w for w in gc.bad_words_ids or [] if not (len(w) == 1 and w[0] in eos_ids)]  # eos is never banned
        self.ban, self.bad_sequences = _biases({tuple(w): -float("inf") for w in bad}, vocab, device)
        self.suppress = _mask(gc.suppress_tokens, vocab, device)
        self.begin_suppress = _mask(gc.begin_suppress_tokens, vocab, device)
        self.eos = torch.tensor(eos_ids, dtype=torch.long, device=device)
        self.watermark = None if gc.watermarking_config is None else marker(gc.watermarking_config, vocab, device)
        forced = gc.forced_eos_token_id
        self.forced_eos = None if forced is None else torch.tensor([forced] if isinstance(forced, int) else forced,
                                                                   dtype=torch.long, device=device)  # fmt: skip
        self.follower = None
        if gc.structured_outputs is not None:
            if not isinstance(gc.structured_outputs, Guide):
                raise NeolmError("structured_outputs must be compiled against the tokenizer: generate through the text "
                                 "API (LanguageModel), or pass neolm.structured.compile(spec, tokenizer)")  # fmt: skip
            if not eos_ids:
                raise NeolmError("structured outputs need an eos token to end the text once it is whole")
            self.follower = Follower(gc.structured_outputs, eos_ids, vocab, device)
        counts_new = (gc.min_new_tokens, forced is not None, gc.exponential_decay_length_penalty,
                      gc.begin_suppress_tokens, gc.encoder_no_repeat_ngram_size)  # fmt: skip
        self.needs = RowState(
            lengths=(gc.min_length > 0 or gc.forced_bos_token_id is not None) or None,
            new=(any(counts_new) or isinstance(self.watermark, SynthID) or self.follower) or None,
            budgets=(forced is not None) or None,
            seen=(gc.repetition_penalty != 1.0) or None,
            prompted=(gc.encoder_repetition_penalty != 1.0) or None,
            made=(gc.presence_penalty != 0 or gc.frequency_penalty != 0) or None,
            tokens=(gc.no_repeat_ngram_size or gc.encoder_no_repeat_ngram_size or self.sequence_biases
                    or self.bad_sequences or gc.logits_processor or gc.prefix_allowed_tokens_fn or self.watermark
                    or self.follower) or None,
            prompts=(gc.prefix_allowed_tokens_fn is not None) or None,
        )  # fmt: skip

    def __call__(self, scores: torch.Tensor, rows: RowState) -> torch.Tensor:
        """Processed scores (N, V). May write into `scores` (the caller's own tensor: a copy of 8 x 50k logits
        took ~0.15 ms a step in cProfile)."""
        gc, inf = self.gc, float("inf")
        if rows.unconditional is not None:  # first, as transformers
            scores = guide(scores, rows.unconditional, gc.guidance_scale)
        if self.bias is not None:
            scores = scores + self.bias
        if self.sequence_biases:
            scores = scores + _sequence_bias(self.sequence_biases, rows.tokens, scores)
        if rows.diversity is not None:  # (transformers' HammingDiversityLogitsProcessor, in its place)
            scores = scores - gc.diversity_penalty * rows.diversity
        if gc.encoder_repetition_penalty != 1.0:  # the prompt's tokens: logits > 0 multiplied, < 0 divided
            boosted = torch.where(scores < 0, scores / gc.encoder_repetition_penalty,
                                  scores * gc.encoder_repetition_penalty)  # fmt: skip
            scores = torch.where(rows.prompted, boosted, scores)
        if gc.repetition_penalty != 1.0:
            penalized = torch.where(scores < 0, scores * gc.repetition_penalty, scores / gc.repetition_penalty)
            scores = torch.where(rows.seen, penalized, scores)
        if rows.made is not None and (gc.presence_penalty or gc.frequency_penalty):
            scores = scores - gc.frequency_penalty * rows.made - gc.presence_penalty * (rows.made > 0)
        if gc.no_repeat_ngram_size:
            banned = _repeated_ngrams(rows.tokens, gc.no_repeat_ngram_size, scores.shape, scores.device)
            scores = scores.masked_fill(banned, -inf)
        if gc.encoder_no_repeat_ngram_size:  # no n-gram of the prompt is copied
            prompts = [len(held) - new for held, new in zip(rows.tokens, rows.new.tolist())]
            n = gc.encoder_no_repeat_ngram_size
            banned = _repeated_ngrams(rows.tokens, n, scores.shape, scores.device, prompts)
            scores = scores.masked_fill(banned, -inf)
        if self.ban is not None:
            scores = scores + self.ban
        if self.bad_sequences:
            scores = scores + _sequence_bias(self.bad_sequences, rows.tokens, scores)
        if self.eos_ids and (gc.min_length or gc.min_new_tokens):
            block = torch.zeros(len(scores), dtype=torch.bool, device=scores.device)
            if gc.min_length:
                block |= rows.lengths < gc.min_length
            if gc.min_new_tokens:
                block |= rows.new < gc.min_new_tokens
            eos = scores[:, self.eos]  # (N, E); no host sync (GPUs): where `block`, -inf
            scores[:, self.eos] = eos.masked_fill(block[:, None], -inf)
        if gc.prefix_allowed_tokens_fn is not None:
            scores = scores + _allowed(gc.prefix_allowed_tokens_fn, rows, scores)
        if gc.forced_bos_token_id is not None:  # transformers: where the sequence so far is one token
            first = rows.lengths == 1
            if first.any():
                forced = torch.full_like(scores, -inf)
                forced[:, gc.forced_bos_token_id] = 0
                scores = torch.where(first[:, None], forced, scores)
        if self.forced_eos is not None:
            last = rows.new == rows.budgets - 1  # the last token allowed
            if last.any():
                forced = torch.full_like(scores, -inf)
                forced[:, self.forced_eos] = 0
                scores = torch.where(last[:, None], forced, scores)
        if gc.remove_invalid_values:
            scores = torch.nan_to_num(scores, nan=0.0)  # and +-inf the largest floats
        if gc.exponential_decay_length_penalty and self.eos_ids:
            start, factor = gc.exponential_decay_length_penalty
            past = (rows.new - start).clamp(min=0).tolist()  # transformers: prompt + new > prompt + start
            if any(past):
                eos = scores[:, self.eos]
                scale = torch.tensor([factor**k - 1 for k in past], device=scores.device)  # as transformers' floats
                penalty = eos.abs() * scale[:, None]
                scores = scores.clone()
                scores[:, self.eos] = eos + penalty.masked_fill(~torch.isfinite(eos), 0.0)
        if self.suppress is not None:
            scores = scores.masked_fill(self.suppress, -inf)
        if self.begin_suppress is not None:
            scores = scores.masked_fill((rows.new == 0)[:, None] & self.begin_suppress, -inf)
        if gc.logits_processor:  # the caller's own, after the built-in ones and before the warpers, as transformers
            scores = torch.cat([_call_each(gc.logits_processor, tokens, row[None])
                                for tokens, row in zip(rows.tokens, scores)])  # fmt: skip
        if self.follower is not None:  # structured outputs, before the warpers (so top_k keeps allowed tokens)
            scores = self.follower(scores, rows.tokens, rows.new)
        if gc.do_sample:
            scores = self.warp(scores)
        if self.watermark is not None:  # after the warpers, as transformers
            scores = self.watermark.apply(rows.tokens, rows.new, scores)
        if gc.renormalize_logits:  # log-probabilities again after all the processing (the same picks)
            scores = torch.log_softmax(scores, dim=-1)
        return scores

    def warp(self, scores: torch.Tensor) -> torch.Tensor:
        """The sampling warpers: temperature, top_k, top_p, min_p, typical_p, epsilon_cutoff, eta_cutoff."""
        gc, keep, inf = self.gc, self.keep, float("inf")
        if gc.temperature != 1.0:
            scores = scores / gc.temperature
        if gc.top_h is not None:
            scores = _top_h(scores, gc.top_h)
        if gc.top_k:
            kth = torch.topk(scores, min(max(gc.top_k, keep), scores.shape[-1])).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -inf)
        if gc.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= 1 - gc.top_p
            remove[..., -keep:] = False  # keep at least `keep` tokens
            scores = scores.masked_fill(remove.scatter(1, order, remove), -inf)
        if gc.min_p is not None:
            probs = scores.softmax(dim=-1)
            remove = probs < gc.min_p * probs.amax(dim=-1, keepdim=True)
            remove.scatter_(-1, torch.topk(probs, min(keep, probs.shape[-1])).indices, False)
            scores = scores.masked_fill(remove, -inf)
        if gc.typical_p is not None and gc.typical_p < 1.0:
            scores = _typical(scores, gc.typical_p, keep)
        for cutoff, eta in ((gc.epsilon_cutoff, False), (gc.eta_cutoff, True)):
            if cutoff is not None and 0 < cutoff < 1:
                probs = scores.softmax(dim=-1)
                floor = torch.tensor(cutoff, device=scores.device)
                if eta:  # min(eta, sqrt(eta) * exp(-entropy))
                    entropy = torch.distributions.Categorical(logits=scores).entropy()
                    floor = torch.min(floor, floor.sqrt() * torch.exp(-entropy))[..., None]
                kth = torch.topk(scores, min(keep, scores.shape[-1])).values[..., -1:]
                scores = scores.masked_fill((probs < floor) & (scores < kth), -inf)
        return scores


def _mask(ids: Sequence[int] | None, vocab: int, device) -> torch.Tensor | None:
    """(V,) True at `ids` (None for none)."""
    if not ids:
        return None
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    mask[torch.tensor([i for i in ids if i < vocab], dtype=torch.long)] = True
    return mask


def _biases(biases: dict, vocab: int, device) -> tuple[torch.Tensor | None, list]:
    """sequence_bias {(token, ...): bias} as (a (V,) bias of the one-token sequences, or None; [(prefix, last
    token, bias)] of the longer ones)."""
    single = {seq[0]: b for seq, b in biases.items() if len(seq) == 1}
    table = None
    if single:
        table = torch.zeros(vocab, device=device)
        table[torch.tensor(list(single), dtype=torch.long)] = torch.tensor(list(single.values()), device=device)
    return table, [(tuple(seq[:-1]), seq[-1], b) for seq, b in biases.items() if len(seq) > 1]


def _sequence_bias(entries: list, tokens: Sequence[Sequence[int]], scores: torch.Tensor) -> torch.Tensor:
    """(N, V) the bias of each longer sequence whose prefix the row's tokens end with, at its last token."""
    bias = torch.zeros_like(scores)
    for row, held in enumerate(tokens):
        for prefix, last, b in entries:
            if len(prefix) <= len(held) and tuple(held[len(held) - len(prefix) :]) == prefix:
                bias[row, last] += b
    return bias


def _repeated_ngrams(tokens: Sequence[Sequence[int]], n: int, shape, device, within=None) -> torch.Tensor:
    """(N, V) True at each token that would complete an n-gram the row already holds (within: in its first
    within[row] tokens, its prompt)."""
    banned = torch.zeros(shape, dtype=torch.bool)  # built on the CPU, where the histories are
    for row, held in enumerate(tokens):
        source = held if within is None else held[: within[row]]
        if len(source) < n:
            continue
        windows = torch.as_tensor(source, dtype=torch.long).unfold(0, n, 1)  # (W, n)
        match = (windows[:, :-1] == torch.as_tensor(held[len(held) + 1 - n :], dtype=torch.long)).all(dim=-1)
        banned[row, windows[match, -1].clamp(max=shape[1] - 1)] = True  # (vocab-wide ids only: from the model)
    return banned.to(device)


def _call_each(processors, tokens: Sequence[int], scores: torch.Tensor) -> torch.Tensor:
    """transformers-style logits processors (input_ids (1, L), scores (1, V)) -> scores, called in turn on one row
    (rows differ in length: each is called with its own tokens, as when it is generated alone)."""
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=scores.device)
    shape = scores.shape
    for processor in processors:
        scores = processor(ids, scores)
        if not isinstance(scores, torch.Tensor) or scores.shape != shape:
            raise NeolmError(f"logits processor {processor!r} must return the scores as a {tuple(shape)} tensor")
    return scores


class Ending:
    """When one sequence generated alone (assisted generation, contrastive search, DoLa) ends: an eos token, its
    token budget, a stop string, a stopping criterion, or max_time's deadline."""

    def __init__(self, gc: GenerationConfig, eos_ids: list[int], decode, prompt_len: int, budget: int,
                 deadline: float):  # fmt: skip
        self.gc, self.eos_ids, self.prompt_len, self.budget, self.deadline = gc, eos_ids, prompt_len, budget, deadline
        self.stops = StopStrings(gc.stop_strings, decode) if gc.stop_strings else None

    def reached(self, seq: list[int], scores: torch.Tensor) -> bool:
        """Whether the sequence (prompt and new tokens) ends with its last token, picked from scores (V,)."""
        criteria = self.gc.stopping_criteria
        return (seq[-1] in self.eos_ids or len(seq) - self.prompt_len >= self.budget
                or (self.stops is not None and self.stops.hit(seq))
                or bool(criteria and criteria_met(criteria, seq, scores)) or time.monotonic() > self.deadline)  # fmt: skip


def criteria_met(criteria, tokens: Sequence[int], scores: torch.Tensor) -> bool:
    """Whether any of transformers-style stopping criteria (input_ids (1, L), scores (1, V)) -> bool or a bool
    tensor (1,) ends one sequence, given its tokens (prompt and new) and the scores (V,) of its last token."""
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=scores.device)
    return any(bool(torch.as_tensor(criterion(ids, scores[None])).all()) for criterion in criteria)


def _allowed(fn, rows: RowState, scores: torch.Tensor) -> torch.Tensor:
    """prefix_allowed_tokens_fn(batch_id, tokens) -> allowed ids, as transformers' PrefixConstrainedLogitsProcessor:
    0 at each row's allowed tokens, -inf elsewhere."""
    mask = torch.full_like(scores, -float("inf"))
    for row, (prompt, tokens) in enumerate(zip(rows.prompts, rows.tokens)):
        allowed = fn(prompt, torch.tensor(list(tokens), dtype=torch.long, device=scores.device))
        if len(allowed) == 0:
            raise NeolmError(f"prefix_allowed_tokens_fn allowed no token after {len(tokens)} tokens of prompt {prompt}")
        mask[row, allowed] = 0
    return mask


def _top_h(scores: torch.Tensor, top_h: float, candidates: int = 100) -> torch.Tensor:
    """Top-H (Potraghloo et al. 2025), as transformers' TopHLogitsWarper: of the `candidates` likeliest tokens, in
    order, keep those while their entropy terms -p log p (p renormalised over the candidates) sum to at most
    top_h x the candidates' entropy; the likeliest always."""
    top, index = torch.topk(scores, min(candidates, scores.shape[-1]))  # (N, c) sorted
    dist = torch.distributions.Categorical(logits=top)
    p = dist.probs
    terms = -p * torch.log(p)  # (a probability of 0 gives nan: that token and those after it are not kept)
    keep = terms.cumsum(dim=-1) <= top_h * dist.entropy()[:, None]
    keep[:, 0] = True
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, index, keep)
    return scores.masked_fill(~kept, -float("inf"))


def _typical(scores: torch.Tensor, mass: float, keep: int) -> torch.Tensor:
    """Locally typical sampling (Meister et al.): keep the tokens whose surprise is nearest the entropy, up to
    `mass` of the probability."""
    logp = torch.log_softmax(scores, dim=-1)
    entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
    shifted = (-logp - entropy).abs()
    sorted_shift, order = torch.sort(shifted, descending=False)
    cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=1).clamp_(max=sorted_shift.shape[-1] - 1)
    remove = sorted_shift > sorted_shift.gather(1, last.view(-1, 1))
    remove[..., :keep] = False
    return scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))


class StopStrings:
    """transformers' rule: stop when a stop string ends within the text of the newest token."""

    def __init__(self, stop_strings: list[str], decode: Callable[[list[int]], str]):
        self.stop_strings, self.decode = stop_strings, decode
        self.window = max(len(s) for s in stop_strings) + 2  # tokens; each decodes to >= 1 character

    def hit(self, tokens: list[int]) -> bool:
        tail = tokens[-self.window :]
        before, text = len(self.decode(tail[:-1])), self.decode(tail)
        return any(text.find(s, max(before - len(s) + 1, 0)) != -1 for s in self.stop_strings)


@dataclass
class TokenLogprobs:
    """Log-probabilities of tokens under the model (a step's, one per sequence; or a prompt's, one per position):
    the fp32 log-softmax of the raw logits, before any processing (repetition penalty, temperature,
    top-k/top-p), as vLLM reports them by default. In a step, the rows of finished sequences are filler."""

    chosen: list[float]  # of the token each sequence got (each position holds)
    top_ids: list[list[int]]  # the `logprobs` most likely tokens, most likely first
    top: list[list[float]]  # and their log-probabilities

    def pairs(self, row: int, k: int | None = None) -> tuple[tuple[int, float], ...]:
        """Row `row`'s k (default: all) most likely (token id, log p), most likely first."""
        return tuple(zip(self.top_ids[row][:k], self.top[row][:k]))


PROJECT_CHUNK = 1024  # positions per vocabulary projection: bounds the (positions, vocabulary) fp32 log-probs


def vocab_logprobs(model: GPT, hidden: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first position, fp32 log-softmax over the vocabulary) for final hidden states (P, C), after ln_f
    (model(..., head=False)), PROJECT_CHUNK positions at a time."""
    for i in range(0, len(hidden), PROJECT_CHUNK):
        yield i, torch.log_softmax(model.lm_head(hidden[i : i + PROJECT_CHUNK]).float(), dim=-1)


def project_logprobs(model: GPT, hidden: torch.Tensor, targets: Sequence[int], top: int | None) -> TokenLogprobs:
    """TokenLogprobs of `targets` (P,) from final hidden states (P, C), with the `top` most likely tokens at
    each position."""
    out = TokenLogprobs([], [], [])
    targets = torch.as_tensor(targets, dtype=torch.long, device=hidden.device)
    for i, logprobs in vocab_logprobs(model, hidden):
        out.chosen += logprobs.gather(1, targets[i : i + len(logprobs), None])[:, 0].tolist()
        best = torch.topk(logprobs, top) if top else None
        out.top_ids += best.indices.tolist() if best else [[] for _ in range(len(logprobs))]
        out.top += best.values.tolist() if best else [[] for _ in range(len(logprobs))]
    return out


def seeded_generator(seed: int | None, device) -> torch.Generator:
    """The random generator of a sampling run: seeded with `seed` (reproducible), else from fresh entropy."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed) if seed is not None else generator.seed()
    return generator


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits (N, V) -> (N,) token ids, as torch.argmax (neolm's native one on CPU: ~0.3 ms less a step at 8 rows)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and "f32" in native.available()[0]:
        return native.argmax(logits.contiguous())
    return logits.argmax(dim=-1)

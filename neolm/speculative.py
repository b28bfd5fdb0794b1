"""Assisted generation (speculative decoding), as transformers' generate runs it for one sequence at a time
with `assistant_model` or `prompt_lookup_num_tokens`.

Each round guesses the next few tokens cheaply; the model then reads its newest token and the guesses in one
forward, whose logits give its own choice at every guessed position. The guesses it agrees with are kept, and
so is its choice after the last of them, so a round makes 1 to guesses + 1 tokens for one pass over the
weights (single-stream decoding is bound by reading them: a forward of a few tokens costs about what one of
one token does). The guesses come from
  - prompt lookup (prompt_lookup_num_tokens=N): the N tokens that followed the first earlier occurrence of the
    sequence's last n-gram (max_matching_ngram_size, default 2, down to 1; prompt included). Free, and right
    where the text repeats or quotes its prompt: summaries, extraction, code edits, loops;
  - an assistant model: a smaller model with the same tokenizer (pythia-70m/160m for the larger Pythias,
    gpt-neo-125M for the larger GPT-Neos), up to num_assistant_tokens of its own picks, stopping early once its
    probability of its pick falls below assistant_confidence_threshold;
  - an assistant model with another tokenizer (neolm.universal.Universal: transformers' universal assisted
    generation, e.g. gpt-neo-125M for a Pythia), its greedy guesses carried over in bytes, its sampled ones
    in the tokens the vocabularies share;
  - an early exit of the model itself (assistant_early_exit=k): its first k layers, then its final LayerNorm and
    head, as the assistant model (LayerSkip's self-speculative decoding), sharing its weights. Its guesses are
    as good as those layers' logit lens: models trained for early exit guess well, the Pythias and GPT-Neos
    less so (bench/speculative.py --early-exit measures it).
Greedy, the tokens are the model's greedy tokens. Sampled, each is drawn from the model's distribution: with
prompt lookup the model samples at every position and keeps the guesses its samples equal; with an assistant
by the rejection rule of speculative sampling (Leviathan et al. 2023, algorithm 1), which needs the
assistant's probabilities (with another tokenizer, it samples in the tokens both vocabularies share).
assistant_ensemble_weight=w checks an assistant's guesses against w * p + (1 - w) * q instead of the model's p
(DIVERSE's static ensemble, as transformers): more are kept, and the text leans toward the assistant's. Every
logits processor sees each position's own history. A forward over several positions rounds otherwise than
one-token steps, so near-ties can go the other way than in plain decoding, as in transformers; and a seed draws
other samples than plain sampling with that seed.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence

import torch

from neolm.errors import NeolmError
from neolm.generate import check_alone, each_alone, prompt_tokens, shared_prefix
from neolm.generation_config import GenerationConfig
from neolm.model import GPT, KVCache, prefill
from neolm.sampling import Ending, Processors, RowState, argmax, seeded_generator
from neolm.universal import TextGuesser, Universal

log = logging.getLogger(__name__)

DEFAULT_NGRAM = 2  # transformers' max_matching_ngram_size default


class Picker:
    """The processors and the pick of one sequence: processed scores for positions with their own histories,
    and which guesses the model's picks keep."""

    def __init__(self, gc: GenerationConfig, processors: Processors, prompt_len: int, budget: int, vocab: int,
                 device, generator: torch.Generator | None, prompt_index: int = 0):  # fmt: skip
        self.gc, self.processors, self.prompt_len, self.budget = gc, processors, prompt_len, budget
        self.vocab, self.device, self.generator = vocab, device, generator
        self.prompt_index = prompt_index  # which prompt of the generate() call (prefix_allowed_tokens_fn's batch_id)

    def scores(self, logits: torch.Tensor, seq: list[int], guesses: Sequence[int]) -> torch.Tensor:
        """Processed scores (N, V) of fp32 logits (N, V) whose row j follows seq + guesses[:j]."""
        needs, N = self.processors.needs, len(logits)
        state = RowState()
        if needs.lengths or needs.new or needs.budgets:
            state.lengths = torch.arange(len(seq), len(seq) + N, device=self.device)
            state.new = state.lengths - self.prompt_len
            state.budgets = torch.full((N,), self.budget, device=self.device)
        if needs.seen or needs.made or needs.tokens:
            histories = [seq + list(guesses[:j]) for j in range(N)]
            if needs.tokens:
                state.tokens = histories
            if needs.seen:
                state.seen = prompt_tokens(histories, self.vocab, self.device)
            if needs.made:
                state.made = torch.zeros(N, self.vocab, dtype=torch.int32, device=self.device)
                for row, h in enumerate(histories):
                    made = torch.tensor(h[self.prompt_len :], dtype=torch.long, device=self.device)
                    state.made[row] = torch.bincount(made, minlength=self.vocab)[: self.vocab].to(torch.int32)
        if needs.prompted:
            state.prompted = prompt_tokens([seq[: self.prompt_len]], self.vocab, self.device).expand(N, -1)
        if needs.prompts:
            state.prompts = [self.prompt_index] * N
        return self.processors(logits, state)

    def pick(self, scores: torch.Tensor) -> list[int]:
        """One token per row of processed scores: greedy, or sampled."""
        if self.gc.do_sample:
            return torch.multinomial(scores.softmax(dim=-1), 1, generator=self.generator)[:, 0].tolist()
        return argmax(scores).tolist()

    def keep(self, scores: torch.Tensor, guesses: list[int], q: torch.Tensor | None) -> list[int]:
        """The round's tokens from the model's processed scores (c + 1, V) at the guesses' c positions and after
        them: the guesses kept, then one token of the model's own. q (c, V): the assistant's probabilities of
        its sampled guesses (speculative sampling), else None."""
        c, w = len(guesses), self.gc.assistant_ensemble_weight
        if q is None or not self.gc.do_sample:
            picks = self.pick(scores)
            if q is not None and w is not None and c:  # the guesses against the mixture's likeliest
                picks[:c] = argmax(w * scores[:c].softmax(dim=-1) + (1 - w) * q).tolist()
            m = next((j for j in range(c) if guesses[j] != picks[j]), c)
            return guesses[:m] + [picks[m]]
        p = scores.softmax(dim=-1)
        index, rows = torch.tensor(guesses, device=self.device), torch.arange(c, device=self.device)
        ratio = p[rows, index] / q[rows, index]  # q > 0 at its own samples
        if w is not None:  # v / q for v = w p + (1 - w) q; the residual below is v's too ([v - q]+ = w [p - q]+)
            ratio = 1 - w + w * ratio
        accepted = torch.rand(c, generator=self.generator, device=self.device) <= ratio
        m = int((accepted.long().cumprod(0)).sum())
        if m < c:  # rejected: draw from the part of p that q does not cover
            rest = (p[m] - q[m]).clamp(min=0)
            p_m = rest / rest.sum() if float(rest.sum()) > 0 else p[m]
        else:
            p_m = p[c]
        return guesses[:m] + [int(torch.multinomial(p_m, 1, generator=self.generator))]


class PromptLookup:
    """Guesses from the sequence itself: what followed the first earlier occurrence of its last n-gram (the
    longest that occurred, of `smallest` to max_matching_ngram_size tokens; vLLM's prompt_lookup_min / _max). The
    n-grams seen are indexed as the sequence grows, so a guess costs the same at any length."""

    def __init__(self, n: int, ngram: int = DEFAULT_NGRAM, smallest: int = 1):
        self.n, self.ngram, self.smallest = n, ngram, smallest  # guesses at most; n-gram sizes
        self.first: dict[tuple[int, ...], int] = {}  # n-gram (of 1 to self.ngram tokens) -> where it first starts
        self.indexed = [0] * (self.ngram + 1)  # by size: the n-grams starting before this are in `first`

    @classmethod
    def of(cls, gc: GenerationConfig) -> PromptLookup:
        """transformers' prompt_lookup_num_tokens and max_matching_ngram_size."""
        return cls(gc.prompt_lookup_num_tokens, gc.max_matching_ngram_size or DEFAULT_NGRAM)

    def guess(self, seq: list[int], limit: int) -> tuple[list[int], None]:
        limit = min(limit, self.n)
        if limit <= 0:
            return [], None
        for size in range(self.smallest, self.ngram + 1):  # every n-gram followed by a token (not the tail itself)
            for start in range(self.indexed[size], len(seq) - size):
                self.first.setdefault(tuple(seq[start : start + size]), start)
            self.indexed[size] = max(self.indexed[size], len(seq) - size)
        for size in range(min(self.ngram, len(seq) - 1), self.smallest - 1, -1):
            start = self.first.get(tuple(seq[-size:]))
            if start is not None:
                return seq[start + size : start + size + limit], None
        return [], None

    def update(self, kept: int, guessed: int) -> None:
        pass


class EarlyExit:
    """The model's first `layers` blocks, then its final LayerNorm and head, called as an assistant model is
    (transformers' assistant_early_exit). It shares the model's weights; its cache holds its own layers."""

    def __init__(self, model: GPT, layers: int):
        self.model, self.layers, self.ln_f, self.cache_dtype = model, layers, model.ln_f, model.cache_dtype
        c = model.config
        self.config = dataclasses.replace(c, n_layer=layers, layer_windows=c.layer_windows[:layers])

    def __call__(self, idx, positions=None, cache=None, last_only: bool = False, head: bool = True) -> torch.Tensor:
        return self.model(idx, positions, cache, last_only=last_only, head=head, layers=self.layers)


class Assistant:
    """Guesses from a smaller model with the same tokenizer, decoding in a KV cache of its own that keeps the
    tokens the sequence still shares with it from round to round."""

    def __init__(self, model: GPT, gc: GenerationConfig, picker: Picker, max_len: int):
        self.model, self.picker = model, picker
        self.device = model.ln_f.weight.device
        self.cache = KVCache(model.config, 1, max_len, model.cache_dtype, self.device)
        self.tokens: list[int] = []  # in the cache's slots
        self.k = gc.num_assistant_tokens
        self.adapt = gc.num_assistant_tokens_schedule != "constant"
        self.threshold = gc.assistant_confidence_threshold or 0.0
        self.chunk = gc.prefill_chunk_size  # (its first forward reads the prompt)

    def _logits(self, tokens: list[int]) -> torch.Tensor:
        """The assistant's next-token logits (1, V of the main model: cut, or padded with -inf) after feeding
        `tokens` to its cache."""
        x = torch.tensor([tokens], device=self.device)
        logits = prefill(self.model, x, self.cache, chunk=self.chunk, last_only=True)[0].float().to(self.picker.device)
        V = self.picker.vocab
        if logits.shape[1] >= V:
            return logits[:, :V]
        return torch.cat((logits, logits.new_full((1, V - logits.shape[1]), -float("inf"))), dim=1)

    def guess(self, seq: list[int], limit: int) -> tuple[list[int], torch.Tensor | None]:
        limit = min(limit, self.k)
        if limit <= 0:
            return [], None
        self.cache.length = min(shared_prefix(self.tokens, seq), len(seq) - 1)
        if max(seq[self.cache.length :]) >= self.model.config.vocab_size:  # a token the assistant lacks (its
            return [], None  # vocabulary padded less than the model's): no more guesses for this sequence
        logits = self._logits(seq[self.cache.length :])
        guesses, probs = [], []
        while True:
            scores = self.picker.scores(logits, seq, guesses)
            token = self.picker.pick(scores)[0]
            p = scores.softmax(dim=-1)[0]
            guesses.append(token)
            probs.append(p)
            if len(guesses) == limit or token in self.picker.processors.eos_ids or float(p[token]) < self.threshold:
                break
            logits = self._logits([token])
        self.tokens = seq + guesses[:-1]
        gc = self.picker.gc
        return guesses, torch.stack(probs) if gc.do_sample or gc.assistant_ensemble_weight is not None else None

    def update(self, kept: int, guessed: int) -> None:
        if self.adapt:  # transformers' "heuristic" schedule
            self.k = self.k + 2 if kept == guessed else max(1, self.k - 1)


def assisted_tokens(
    model: GPT,
    prompt: Sequence[int],
    gc: GenerationConfig,
    decode: Callable[[list[int]], str] | None = None,
    assistant: GPT | Universal | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """The new tokens of one sequence, as they are kept (eos included), guessed by prompt lookup
    (gc.prompt_lookup_num_tokens) or by `assistant`. Bad arguments raise here, before the first token.
    `generator`: for sampling (default: one seeded with gc.seed, else at random)."""
    (prompt,) = _check(model, [prompt], gc, decode, assistant)
    if gc.do_sample and generator is None:
        generator = seeded_generator(gc.seed, model.ln_f.weight.device)
    return _tokens(model, prompt, gc, decode, assistant, generator, None, gc.deadline(), 0)


def assisted_generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    gc: GenerationConfig,
    decode: Callable[[list[int]], str] | None = None,
    assistant: GPT | Universal | None = None,
    on_token: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """The new tokens of every sequence (prompts x num_return_sequences, prompt-major; eos included), each
    generated alone with assisted generation. on_token(sequence, logits, scores), if given, gets each token's
    logits (V,) and the processed scores (V,) it was picked from (or checked against)."""
    prompts = _check(model, prompts, gc, decode, assistant)
    generator = seeded_generator(gc.seed, model.ln_f.weight.device) if gc.do_sample else None
    deadline = gc.deadline()
    return each_alone(prompts, gc, lambda p, index, report: _tokens(model, p, gc, decode, assistant, generator,
                                                                      report, deadline, index), on_token)  # fmt: skip


def _check(model: GPT, prompts, gc: GenerationConfig, decode, assistant: GPT | Universal | None) -> list[list[int]]:
    if gc.num_beams > 1:
        raise NeolmError("assisted generation (prompt lookup or an assistant model) runs without beam search")
    if gc.guided or gc.contrastive or gc.dola_layers is not None:
        raise NeolmError("assisted generation (prompt lookup or an assistant model) runs without guidance_scale, "
                         "contrastive search (penalty_alpha) or DoLa (dola_layers)")  # fmt: skip
    if gc.assisted == (assistant is not None):
        raise NeolmError("assisted generation needs one of prompt_lookup_num_tokens, assistant_early_exit or an "
                         "assistant model")  # fmt: skip
    if gc.assistant_early_exit is not None and gc.assistant_early_exit >= model.config.n_layer:
        raise NeolmError(f"assistant_early_exit ({gc.assistant_early_exit}) must be fewer layers than the model's "
                         f"{model.config.n_layer}")  # fmt: skip
    if gc.assistant_ensemble_weight is not None and gc.assistant_early_exit is None and (
            assistant is None or isinstance(assistant, Universal) and not gc.do_sample):  # fmt: skip
        raise NeolmError("assistant_ensemble_weight mixes the assistant's probabilities into the check: it needs an "
                         "assistant model with the model's tokenizer (or another tokenizer, sampled), or "
                         "assistant_early_exit")  # fmt: skip
    prompts = check_alone(model, prompts, gc, decode)
    if isinstance(assistant, Universal):
        if assistant.target_tokenizer.vocab_size > model.config.vocab_size:
            raise NeolmError(f"the model's tokenizer has {assistant.target_tokenizer.vocab_size} ids, its vocabulary "
                             f"{model.config.vocab_size}: give the model's own tokenizer as target_tokenizer")  # fmt: skip
    elif assistant is not None:
        longest = max(len(p) + gc.new_token_budget(len(p)) for p in prompts)
        if longest > assistant.config.n_positions:
            raise NeolmError(f"the assistant model's context of {assistant.config.n_positions} tokens is shorter "
                             f"than the prompt and its new tokens ({longest})")  # fmt: skip
        if assistant.config.vocab_size < max(max(p) for p in prompts) + 1:
            raise NeolmError("a prompt has token ids outside the assistant model's vocabulary: "
                             "the assistant must share the model's tokenizer")  # fmt: skip
    return prompts


@torch.inference_mode()
def _tokens(model: GPT, prompt: list[int], gc: GenerationConfig, decode, assistant: GPT | Universal | None,
            generator: torch.Generator | None, on_token: Callable | None, deadline: float,
            prompt_index: int) -> Iterator[int]:  # fmt: skip
    config, device = model.config, model.ln_f.weight.device
    budget = gc.new_token_budget(len(prompt))
    if budget == 0:
        return
    eos_ids = gc.eos_ids(config.eos_token_id)
    ending = Ending(gc, eos_ids, decode, len(prompt), budget, deadline)
    processors = Processors(gc, eos_ids, config.vocab_size, device)
    picker = Picker(gc, processors, len(prompt), budget, config.vocab_size, device, generator, prompt_index)
    if gc.assistant_early_exit is not None:
        assistant = EarlyExit(model, gc.assistant_early_exit)
    if isinstance(assistant, Universal):
        guesser = TextGuesser(assistant, gc, eos_ids, config.vocab_size, len(prompt) + budget, picker)
    elif assistant is not None:
        guesser = Assistant(assistant, gc, picker, len(prompt) + budget)
    else:
        guesser = PromptLookup.of(gc)
    cache = KVCache(config, 1, len(prompt) + budget, model.cache_dtype, device)
    if len(prompt) > 1:  # all but the last token, which each round feeds with its guesses
        prefill(model, torch.tensor([prompt[:-1]], device=device), cache, chunk=gc.prefill_chunk_size, last_only=True,
                head=False)
    seq, made, rounds, guessed = list(prompt), 0, 0, 0
    while True:
        guesses, q = guesser.guess(seq, budget - made - 1)  # (room for the model's own token after them)
        x = torch.tensor([seq[-1:] + guesses], device=device)
        logits = model(x, cache=cache)[0].float()  # (c + 1, V)
        raw = logits.clone() if on_token is not None else None  # (the processors may write into logits)
        scores = picker.scores(logits, seq, guesses)
        new = picker.keep(scores, guesses, q)
        cache.length = len(seq) + len(new) - 1  # the sequence but its newest token, which the next round feeds
        guesser.update(len(new) - 1, len(guesses))
        rounds, guessed = rounds + 1, guessed + len(guesses)
        for j, token in enumerate(new):
            if on_token is not None:
                on_token(raw[j], scores[j])
            seq.append(token)
            made += 1
            yield token
            if ending.reached(seq, scores[j]):
                log.info("assisted generation: %d tokens in %d forwards of the model, %d guessed tokens",
                         made, rounds, guessed)  # fmt: skip
                return

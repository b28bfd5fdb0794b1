"""Text generation as free functions: prefill, then one token per step into a static KV cache.

Argument names and semantics follow `transformers.generate` (GenerationConfig in neolm.generation_config:
max_new_tokens, min_length, do_sample, temperature, top_k, top_p, repetition_penalty, num_return_sequences,
stop_strings, its other logits processors in neolm.sampling, num_beams in neolm.beam, ...), with two deliberate
differences: lengths count each sequence's own prompt (not the padded batch), so a prompt's output never depends on
what it is batched with; and the default length is 100 new tokens (transformers: max_length 20 in all).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from neolm.errors import NeolmError
from neolm.generation_config import GenerationConfig, fit_prompts
from neolm.guidance import Guidance
from neolm.model import GPT, KVCache, chunk_end
from neolm.multilora import AdapterSet, Mixed
from neolm.sampling import (
    Processors,
    RowState,
    StopStrings,
    TokenLogprobs,
    argmax,
    criteria_met,
    project_logprobs,
    seeded_generator,
)

log = logging.getLogger(__name__)


def check_alone(model: GPT, prompts: Sequence[Sequence[int]], gc: GenerationConfig, decode) -> list[list[int]]:
    """The prompts of a generation that runs one sequence at a time (assisted generation, contrastive search,
    DoLa), checked as a DecodeBatch checks them and fitted to the context."""
    if gc.stop_strings and decode is None:
        raise NeolmError("stop_strings need a tokenizer to decode the text")
    gc.check_vocab(model.config.vocab_size)
    return fit_prompts(prompts, gc, model.config.n_positions, model.config.vocab_size)


def each_alone(
    prompts: list[list[int]], gc: GenerationConfig, tokens: Callable[..., Iterator[int]], on_token: Callable | None
) -> list[list[int]]:
    """The new tokens of every sequence (prompts x num_return_sequences, prompt-major), each generated alone by
    tokens(prompt, prompt_index, report), where report(logits, scores) is on_token(sequence, logits, scores), or
    None without on_token."""
    n = gc.num_return_sequences
    jobs = [p for p in prompts for _ in range(n)]
    return [list(tokens(p, i // n, None if on_token is None else functools.partial(on_token, i)))
            for i, p in enumerate(jobs)]  # fmt: skip


def _contexts(gc: GenerationConfig, prompts: list[list[int]], n_ctx: int) -> list[list[int]]:
    """Each prompt's unconditional context for classifier-free guidance: its negative prompt (one for all, or one
    per prompt), else its last token (as transformers)."""
    negative = gc.negative_prompt_ids
    if negative is None:
        return [p[-1:] for p in prompts]
    nested = isinstance(negative[0], list)
    if nested and len(negative) != len(prompts):
        raise NeolmError(f"negative_prompt_ids has {len(negative)} prompts for {len(prompts)} prompts: give one "
                         "list of token ids for all, or one per prompt")  # fmt: skip
    contexts = negative if nested else [negative] * len(prompts)
    for context, prompt in zip(contexts, prompts):
        if len(context) + gc.new_token_budget(len(prompt)) > n_ctx:
            raise NeolmError(f"the negative prompt has {len(context)} tokens; with the new tokens that is more than "
                             f"the model's context of {n_ctx}")  # fmt: skip
    return contexts


def left_pad(seqs: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Sequences of different lengths as one batch, right-aligned: tokens (N, W) with `pad` before each, positions
    (N, W) counting from each one's first token, and which slots hold a token (N, W; None when all do), for
    KVCache.hide_padding."""
    width = max(len(p) for p in seqs)
    lengths = torch.tensor([len(p) for p in seqs], device=device)
    tokens = torch.full((len(seqs), width), pad, dtype=torch.long, device=device)
    for row, p in enumerate(seqs):
        tokens[row, width - len(p) :] = torch.tensor(p)
    start = (width - lengths)[:, None]  # (N, 1) each sequence's first slot
    positions = (torch.arange(width, device=device) - start).clamp(min=0)
    filled = torch.arange(width, device=device) >= start if int(lengths.min()) < width else None
    return tokens, positions, filled


def prompt_tokens(prompts: Sequence[Sequence[int]], vocab: int, device) -> torch.Tensor:
    """(N, V) bool: True at the tokens each of N sequences holds (a prompt, or a prompt and its new tokens)."""
    held = torch.zeros(len(prompts), vocab, dtype=torch.bool, device=device)
    for row, p in enumerate(prompts):
        held[row, torch.tensor(p, dtype=torch.long, device=device)] = True
    return held


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens a and b share from the start."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@dataclass
class Step:
    """One step of a DecodeBatch, by row: each sequence's id, its new token (None for one that had finished
    before this step), why it finished with this token ("stop": an eos token or a stop string; "length": its
    token budget; None: it goes on), and, when some sequence wants them, the log-probabilities (rows as here).
    With the batch's keep_logits / keep_scores, every row's logits and processed scores too (rows that had
    finished: filler), as transformers' output_logits / output_scores."""

    ids: list[int]
    tokens: list[int | None]
    ends: list[str | None]
    scores: TokenLogprobs | None
    logits: torch.Tensor | None = None  # (N, V) fp32: the model's logits
    processed: torch.Tensor | None = None  # (N, V) fp32: what the token was picked from (processed, warped)


@dataclass
class _Group:
    """The settings that sequences added with equal GenerationConfigs share: they are processed and picked together."""

    gc: GenerationConfig
    eos_ids: list[int]
    pad: int  # fed after a sequence ends
    stops: StopStrings | None
    processors: Processors


@dataclass
class _Rows:
    """The per-sequence state of a DecodeBatch: lists and tensors (N, ...) on the model's device, a row each."""

    ids: list[int]
    group: list[int]  # index into DecodeBatch.groups
    k: list[int | None]  # log-probabilities wanted: how many alternatives (None: none)
    histories: list[list[int] | None]  # prompt + new tokens, where stop strings or processors read them
    lengths: list[int]  # prompt lengths
    budgets: list[int]  # new tokens allowed
    counts: list[int]  # new tokens so far
    done: list[bool]
    positions: torch.Tensor  # (N, 1) the position of the last token fed
    logits: torch.Tensor | None  # (N, V) fp32 logits of the next token; None while the last step's tokens wait
    seen: torch.Tensor | None  # (N, V) bool: the tokens each sequence holds (for repetition_penalty)
    prompted: torch.Tensor | None  # (N, V) bool: the tokens its prompt holds (for encoder_repetition_penalty)
    made: torch.Tensor | None  # (N, V) int32: how often each token was generated (presence/frequency_penalty)
    deadlines: list[float]  # time.monotonic() after which the sequence ends (GenerationConfig.max_time)
    prompt: list[int]  # which prompt of its add() the sequence continues
    adapter: list[int]  # the LoRA adapter it runs with (DecodeBatch.adapters; 0: none)

    def select(self, index: list[int]) -> _Rows:
        """Rows `index`, in that order."""
        picked = torch.tensor(index, dtype=torch.long, device=self.positions.device)

        def take(v):
            return None if v is None else [v[i] for i in index] if isinstance(v, list) else v[picked]

        return _Rows(**{f.name: take(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def cat(self, other: _Rows) -> _Rows:
        """These rows, then other's."""
        merged = {}
        for field in dataclasses.fields(self):
            a, b = getattr(self, field.name), getattr(other, field.name)
            if isinstance(a, list):
                merged[field.name] = a + b
                continue
            if field.name in ("seen", "prompted", "made") and (a is None) != (b is None):  # rows without one: zeros
                like = a if b is None else b
                a = a if a is not None else like.new_zeros(len(self.ids), like.shape[1])
                b = b if b is not None else like.new_zeros(len(other.ids), like.shape[1])
            merged[field.name] = None if a is None else torch.cat((a, b))
        return _Rows(**merged)


@dataclass
class Prefill:
    """Prompts on their way into a DecodeBatch (DecodeBatch.prefill): read into a cache of their own, a chunk
    of columns per read(), then joined (DecodeBatch.join)."""

    ids: list[int]
    seqs: list[list[int]]  # the prompts, each num_return_sequences times
    gc: GenerationConfig
    group: int
    k: list[int | None]  # log-probabilities wanted, per sequence
    budgets: list[int]
    on_prompt: Callable[[int, TokenLogprobs], None] | None
    deadline: float = math.inf  # GenerationConfig.deadline(), from when the prefill was asked for
    contexts: list[list[int]] | None = None  # classifier-free guidance's unconditional context, per sequence
    adapters: AdapterSet | None = None  # and which of them each sequence is read with (0: none)
    adapter: list[int] = dataclasses.field(default_factory=list)
    tokens: torch.Tensor | None = None  # (N, W) left-padded; None: nothing to read
    positions: torch.Tensor | None = None  # (N, W)
    cache: KVCache | None = None
    room: int = 0  # slots for new tokens in `cache`
    done: int = 0  # columns read
    hidden: list[torch.Tensor] = dataclasses.field(default_factory=list)  # each chunk's (N, t, C), to score prompts
    logits: torch.Tensor | None = None  # (N, V) fp32, once the last column is read (without on_prompt)

    @property
    def left(self) -> int:
        """Prompt tokens (rows x columns) still to read."""
        return 0 if self.tokens is None else (self.tokens.shape[1] - self.done) * self.tokens.shape[0]

    @torch.inference_mode()
    def read(self, model: GPT, budget: int | None = None) -> int:
        """Read the next columns into the cache, `budget` tokens of them (rows x columns, rounded down to whole
        columns; None: all that are left), or all that are left when fewer than twice that (model.chunk_end).
        Chunks of some hundreds of tokens give one forward's numbers (tests/test_generate.py). Returns the
        tokens read."""
        if not self.left:
            return 0
        rows, width = self.tokens.shape
        end = chunk_end(width, self.done, width if budget is None else max(1, budget // rows))
        tokens, positions = self.tokens[:, self.done : end], self.positions[:, self.done : end]
        with _adapted(self.adapters, self.adapter):
            self._forward(model, tokens, positions, end < width)
        read, self.done = (end - self.done) * rows, end
        return read

    def read_all(self, model: GPT) -> None:
        """Read what is left, gc.prefill_chunk_size columns at a time (None: at once)."""
        chunk = self.gc.prefill_chunk_size
        while self.left:
            self.read(model, None if chunk is None else chunk * self.tokens.shape[0])

    def _forward(self, model: GPT, tokens, positions, more: bool) -> None:
        if self.on_prompt is not None:  # every position's hidden state, to score the prompts
            self.hidden.append(model(tokens, positions, self.cache, head=False))
        elif more:  # only the cache
            model(tokens, positions, self.cache, last_only=True, head=False)
        else:
            self.logits = model(tokens, positions, self.cache, last_only=True)[:, -1].float()


def _adapted(adapters: AdapterSet | None, rows: int | list[int]):
    """The forwards inside run each row with its LoRA adapter (neolm.multilora), when the batch has them."""
    return contextlib.nullcontext() if adapters is None else adapters.using(rows)


class DecodeBatch:
    """Sequences decoding together in one preallocated KV cache, a token each per step, which sequences join
    (add) and leave between steps. iter_generate runs one batch of fixed sequences; the server keeps one
    running and adds requests as they arrive (continuous batching).

    Sequences may differ in prompt, length and settings; each gets the tokens it would get alone. Sequences
    added with equal GenerationConfigs form a group, whose logits are processed and picked together; sampling
    groups share one generator, so a seeded GenerationConfig must be the batch's first and only one.

    The cache's slots are shared: each step writes slot `cache.length` of every row. A sequence's tokens fill a
    contiguous run of slots that ends at the current one (its positions count from its own first slot; the
    cache's `valid` hides the slots before it), so slot distance is position distance, as local attention
    windows need. A joining sequence is prefilled in a cache of its own and copied in, right-aligned to the
    current slot: the batch's cache is rebuilt (KVCache.aligned), rows that finished are dropped, and all
    move right when the new prompt is longer than the slots in use. With `compact`, finished rows also leave
    once they are as many as the live ones, so that no step computes more dead rows than live ones.
    """

    def __init__(self, model: GPT, decode: Callable[[list[int]], str] | None = None, compact: bool = True,
                 adapters: AdapterSet | None = None, guesser: Callable | None = None):  # fmt: skip
        self.model, self.decode, self.compact = model, decode, compact
        self.adapters = adapters  # the model's LoRA adapters: each sequence runs with the one it was added with
        # guesser(gc, picker, max_len) -> a guesser of neolm.speculative (guess, update): steps() runs a round of
        # assisted generation whenever one sequence decodes alone
        self.guesser = guesser
        self._guessing: tuple[int, object, object] | None = None  # (sequence id, its Picker, its guesser)
        self.guessed = self.kept = self.rounds = 0  # guessed tokens, those kept, and rounds, so far
        self.device = model.ln_f.weight.device
        self.groups: list[_Group] = []
        self.rows: _Rows | None = None
        self.cache: KVCache | None = None
        self._spare: KVCache | None = None  # the cache before the last rebuild: memory for the next (KVCache.aligned)
        self.generator: torch.Generator | None = None
        self.guidance: Guidance | None = None  # a guided batch's unconditional contexts (its only sequences)
        self._fed: torch.Tensor | None = None  # the last step's tokens (N,), fed to the model before the next
        self._ids = itertools.count()
        self.keep_logits = self.keep_scores = False  # give each Step the logits / the processed scores

    @property
    def live(self) -> int:
        """How many sequences are still generating."""
        return 0 if self.rows is None else self.rows.done.count(False)

    def validate(self, gc: GenerationConfig, logprobs) -> None:
        """Raise NeolmError for settings this batch cannot run (before anything is computed)."""
        vocab = self.model.config.vocab_size
        for k in logprobs if isinstance(logprobs, Sequence) else [logprobs]:
            if k is not None and not 0 <= k <= vocab:
                raise NeolmError(f"logprobs must be between 0 and the vocabulary size, got {k}")
        if gc.stop_strings and self.decode is None:
            raise NeolmError("stop_strings need a tokenizer to decode the text")
        gc.check_vocab(vocab)
        if gc.seed is not None and gc.do_sample and (self.generator is not None or self.rows is not None):
            raise NeolmError("a seeded generation must be the only one in its batch")
        if gc.num_beams > 1:
            raise NeolmError(
                "beam search (num_beams > 1) gives whole sequences at the end: it cannot be streamed "
                "or batched with other requests; use generate()"
            )
        if gc.contrastive or gc.dola_layers is not None:
            raise NeolmError("contrastive search (penalty_alpha) and DoLa (dola_layers) run one sequence at a time: "
                             "they cannot be batched with other requests; use generate()")  # fmt: skip
        if gc.guided and (self.compact or self.rows is not None):
            raise NeolmError("classifier-free guidance (guidance_scale) runs in a generation of its own: it cannot "
                             "be batched with other requests")  # fmt: skip

    def _group(self, gc: GenerationConfig) -> int:
        for i, group in enumerate(self.groups):
            if group.gc == gc:
                return i
        eos_ids = gc.eos_ids(self.model.config.eos_token_id)
        pad = gc.pad_token_id if gc.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        stops = StopStrings(gc.stop_strings, self.decode) if gc.stop_strings else None
        if gc.do_sample and self.generator is None:
            self.generator = seeded_generator(gc.seed, self.device)
        processors = Processors(gc, eos_ids, self.model.config.vocab_size, self.device)
        self.groups.append(_Group(gc, eos_ids, pad, stops, processors))
        return len(self.groups) - 1

    def add(
        self,
        prompts: Sequence[Sequence[int]],
        gc: GenerationConfig,
        logprobs: int | None | Sequence[int | None] = None,
        on_prompt: Callable[[int, TokenLogprobs], None] | None = None,
    ) -> list[int]:
        """Add each prompt num_return_sequences times (prompt-major); returns the new sequences' ids. The prompts
        are read in one forward (left-padded), from which on_prompt(i, TokenLogprobs), if given, gets prompt i's
        tokens 1 .. n-1 scored, with its `logprobs` (one k, or one per prompt) most likely alternatives. Each
        step gives a sequence wanting logprobs its token's log-probability and k alternatives. A sequence
        with no token budget never appears in a step (with no budget at all, no row is made)."""
        prefill = self.prefill(prompts, gc, logprobs, on_prompt)
        prefill.read_all(self.model)
        return self.join(prefill)

    @torch.inference_mode()
    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        gc: GenerationConfig,
        logprobs: int | None | Sequence[int | None] = None,
        on_prompt: Callable[[int, TokenLogprobs], None] | None = None,
        reuse: tuple[KVCache, Sequence[int]] | None = None,
        adapter: int | Sequence[int] = 0,
        share: bool = False,
    ) -> Prefill:
        """`add` in parts, so that a long prompt need not hold up the running sequences for the whole of its
        forward: the prompts, ready to be read into a cache of their own by Prefill.read (in chunks of columns,
        between steps), then join() adds them. Chunks give the same numbers as one forward here (CPU).

        reuse: (a cache of one row without padding, the tokens in its slots), from an earlier generation
        (neolm.conversation): the tokens one prompt shares with it from the start are taken from it instead of
        read again (all but the last, whose logits are needed), and `done` counts them. The prefill takes that
        cache itself (it is changed) when it has the room, else a copy of those slots; always a copy with
        `share`, which leaves it as it was for other prompts (the server's prefix cache). The rest of the prompt
        is read as a chunk after them, whose numbers may round differently from one forward of the whole.

        adapter: the LoRA adapter of the batch's `adapters` these sequences run with (0: none; neolm.multilora), or
        one per prompt."""
        self.validate(gc, logprobs)
        each = [adapter] * len(prompts) if isinstance(adapter, int) else list(adapter)
        if len(each) != len(prompts) or any(a and (self.adapters is None or not 0 < a <= len(self.adapters.names))
                                            for a in each):  # fmt: skip
            raise NeolmError(f"no adapter {adapter} in this batch (one per prompt, of {len(prompts)})")
        config, device = self.model.config, self.device
        prompts = fit_prompts(prompts, gc, config.n_positions, config.vocab_size)
        if reuse is not None and (len(prompts) != 1 or gc.num_return_sequences != 1 or on_prompt is not None):
            raise NeolmError("a cache can be reused for one sequence of one prompt that is not scored")
        n = gc.num_return_sequences
        wanted = list(logprobs) if isinstance(logprobs, Sequence) else [logprobs] * len(prompts)
        seqs = [p for p in prompts for _ in range(n)]
        prefill = Prefill([next(self._ids) for _ in seqs], seqs, gc, -1, [k for k in wanted for _ in range(n)],
                          [gc.new_token_budget(len(p)) for p in seqs], on_prompt, gc.deadline(),
                          adapters=self.adapters, adapter=[a for a in each for _ in range(n)])  # fmt: skip
        if not seqs or (max(prefill.budgets) == 0 and on_prompt is None):
            return prefill  # nothing to read
        if gc.guided:
            prefill.contexts = [c for c in _contexts(gc, prompts, config.n_positions) for _ in range(n)]
        prefill.group = self._group(gc)
        # with no sequence running, the new ones may take this cache as theirs (join): room for their tokens
        prefill.room = 0 if self.rows is not None and (not self.compact or self.live > 0) else max(prefill.budgets)
        prefill.tokens, prefill.positions, filled = left_pad(seqs, self.groups[prefill.group].pad, device)
        width = prefill.tokens.shape[1]
        if reuse is not None:  # the prompt's tokens up to the first that differs, but its last
            held, tokens = reuse
            if held.k.shape[1] != 1 or held.valid is not None:
                raise NeolmError("a reused cache must hold one row without padding")
            prefill.done = min(shared_prefix(tokens[: held.length], seqs[0]), width - 1)
        if reuse is not None and not share and held.max_len >= width + prefill.room:
            cache, cache.length = held, prefill.done  # its slots from there on are written before they are read
        else:
            cache = KVCache(config, len(seqs), width + prefill.room, self.model.cache_dtype, device)
            if reuse is not None:
                cache.take_prefix(held, prefill.done)
        cache.hide_padding(filled)
        prefill.cache = cache
        return prefill

    @torch.inference_mode()
    def join(self, prefill: Prefill) -> list[int]:
        """Add a prefill's sequences (read to the end) to the batch; returns their ids."""
        if prefill.tokens is None:
            return prefill.ids
        if prefill.left:
            raise NeolmError(f"the prompts have {prefill.left} tokens left to read before they can join")
        seqs, gc, n = prefill.seqs, prefill.gc, prefill.gc.num_return_sequences
        logits = prefill.logits
        if prefill.on_prompt is not None:
            hidden = torch.cat(prefill.hidden, 1)  # (N, T, C)
            width = hidden.shape[1]
            for i in range(0, len(seqs), n):  # each prompt's first sequence
                p = seqs[i]
                scores = project_logprobs(self.model, hidden[i, width - len(p) : -1], p[1:], prefill.k[i])
                prefill.on_prompt(i // n, scores)
            if max(prefill.budgets) == 0:
                return prefill.ids
            logits = self.model.lm_head(hidden[:, -1]).float()
        made, vocab = None, self.model.config.vocab_size
        seen = prompt_tokens(seqs, vocab, self.device) if gc.repetition_penalty != 1.0 else None
        prompted = prompt_tokens(seqs, vocab, self.device) if gc.encoder_repetition_penalty != 1.0 else None
        if gc.presence_penalty or gc.frequency_penalty:
            made = torch.zeros(len(seqs), vocab, dtype=torch.int32, device=self.device)
        history = (gc.stop_strings or gc.stopping_criteria or self.groups[prefill.group].processors.needs.tokens
                   or self.guesser is not None)  # fmt: skip
        new = _Rows(
            prefill.ids, [prefill.group] * len(seqs), prefill.k,
            [list(p) for p in seqs] if history else [None] * len(seqs), [len(p) for p in seqs],
            prefill.budgets, [0] * len(seqs), [b == 0 for b in prefill.budgets], prefill.positions[:, -1:], logits,
            seen, prompted, made, [prefill.deadline] * len(seqs), [i // n for i in range(len(seqs))],
            prefill.adapter,
        )  # fmt: skip
        if prefill.contexts is not None:
            self.guidance = Guidance(self.model, *left_pad(prefill.contexts, 0, self.device), room=max(prefill.budgets),
                                     chunk=gc.prefill_chunk_size)  # fmt: skip
        self._flush()  # the rows already here reach the current slot before new ones align to it
        if prefill.room and (self.rows is None or (self.compact and self.live == 0)):
            self._spare = self.cache or self._spare
            self.rows, self.cache = new, prefill.cache
        else:
            self._rebuild(new, prefill.cache)
        return prefill.ids

    def _rebuild(self, new: _Rows | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """A new cache of the rows kept (the live ones with `compact`, else all), then `new`'s (prefilled in
        `cache`), right-aligned to one current slot, with room for the most tokens any of them has left. Returns
        the index of the rows kept."""
        keep = [row for row, done in enumerate(self.rows.done) if not done or not self.compact]
        index = torch.tensor(keep, device=self.device)
        rows, parts = self.rows.select(keep), [(self.cache, index)] if keep else []
        if new is not None:  # (when every row here has finished: the new ones alone)
            rows = rows.cat(new) if keep else new
            parts.append((cache, torch.arange(len(new.ids), device=self.device)))
        old, self.rows = self.cache, rows
        self.cache = KVCache.aligned(parts, max(b - c for b, c in zip(rows.budgets, rows.counts)), self._spare)
        self._spare = old  # its memory, for the next rebuild
        return index

    def row_cache(self, id: int) -> KVCache:
        """A copy of sequence `id`'s keys and values as a cache of one row: its prompt and every token it got but
        the last (which no step has fed yet), for prefill(reuse=) with those tokens. Call it in the step that
        ends the sequence (its row leaves at the next)."""
        r = self.rows
        row = r.ids.index(id)
        used = r.lengths[row] + r.counts[row] - 1  # its slots end at the current one
        return self.cache.slots(row, self.cache.length - used, self.cache.length)

    def cancel(self, ids) -> None:
        """End these sequences now (they appear in no later step)."""
        if self.rows is not None:
            gone = set(ids)
            for row, i in enumerate(self.rows.ids):
                if i in gone:
                    self.rows.done[row] = True

    @property
    def finished(self) -> bool:
        """No sequence has a token to come."""
        return self.rows is None or all(self.rows.done)

    @torch.inference_mode()
    def step(self) -> Step:
        """Choose every sequence's next token."""
        self._flush()
        r = self.rows
        k = max((k for k in r.k if k is not None), default=None)
        raw = torch.log_softmax(r.logits, dim=-1) if k is not None else None  # before processing touches the logits
        logits = r.logits.clone() if self.keep_logits else None
        chosen, processed = self._choose(self.keep_scores or any(g.gc.stopping_criteria for g in self.groups))
        now = time.monotonic()
        tokens, ends, fed = [], [], []
        for row, token in enumerate(chosen.tolist()):
            group = self.groups[r.group[row]]
            if r.done[row]:
                tokens.append(None)
                ends.append(None)
                fed.append(group.pad)
                continue
            ends.append(self._made(group, row, token, None if processed is None else processed[row], now))
            r.done[row] = ends[-1] is not None
            tokens.append(token)
            fed.append(token)
        scores = None
        if raw is not None:
            top = torch.topk(raw, k) if k else None
            empty = [[] for _ in tokens]
            scores = TokenLogprobs(raw.gather(1, chosen[:, None])[:, 0].tolist(),  # (done rows: filler)
                                   top.indices.tolist() if top else empty, top.values.tolist() if top else empty)  # fmt: skip
        r.logits = None
        if not all(r.done):
            self._fed = torch.tensor(fed, device=self.device)
        return Step(r.ids, tokens, ends, scores, logits, processed if self.keep_scores else None)

    def _made(self, group: _Group, row: int, token: int, scores: torch.Tensor | None, now: float) -> str | None:
        """Row `row` made `token`, picked from processed scores (V,) (None where no stopping criterion reads them):
        it is counted and joins the row's history. Returns why the sequence ends with it: "stop" (an eos token, a
        stop string, a stopping criterion), "length" (its budget, or max_time's deadline passed at `now`), or None."""
        r, criteria = self.rows, group.gc.stopping_criteria
        r.counts[row] += 1
        history = r.histories[row]
        if history is not None:
            history.append(token)
        if (
            token in group.eos_ids
            or (group.stops is not None and group.stops.hit(history))
            or (criteria and criteria_met(criteria, history, scores))
        ):
            return "stop"
        return "length" if r.counts[row] >= r.budgets[row] or now > r.deadlines[row] else None

    def _choose(self, keep_scores: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each row's next token (N,), from its group's processing and pick (rows that are done: anything), and
        with keep_scores the processed scores (N, V) they were picked from."""
        r = self.rows
        groups = set(r.group)
        if len(groups) == 1:
            return self._pick(self.groups[r.group[0]], r.logits, list(range(len(r.ids))), None)
        token = torch.empty(len(r.ids), dtype=torch.long, device=self.device)
        processed = torch.empty_like(r.logits) if keep_scores else None
        for g in sorted(groups):
            rows = [row for row, x in enumerate(r.group) if x == g]
            index = torch.tensor(rows, device=self.device)
            token[index], scores = self._pick(self.groups[g], r.logits[index], rows, index)
            if processed is not None:
                processed[index] = scores
        return token, processed

    def _pick(
        self, group: _Group, logits, rows: list[int], index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's rows `rows` (`index`: as a tensor, None for all rows) next tokens from their logits, and the
        processed scores they were picked from."""
        gc, r, needs = group.gc, self.rows, group.processors.needs
        state = RowState()
        if needs.new or needs.lengths or needs.budgets:
            held = torch.tensor([(r.counts[row], r.lengths[row], r.budgets[row]) for row in rows], device=self.device)
            state.new, state.budgets = held[:, 0], held[:, 2]  # (one copy to a GPU, not three)
            state.lengths = state.new + held[:, 1]
        for name in ("seen", "prompted", "made"):
            table = getattr(r, name)
            setattr(state, name, table if table is None or index is None else table[index])
        if needs.tokens:
            state.tokens = [r.histories[row] for row in rows]
        if needs.prompts:
            state.prompts = [r.prompt[row] for row in rows]
        if gc.guided:  # (the batch's only group)
            state.unconditional = self.guidance.unconditional(index)
        logits = group.processors(logits, state)
        if gc.do_sample:
            return torch.multinomial(logits.softmax(dim=-1), 1, generator=self.generator).squeeze(1), logits
        return argmax(logits), logits

    def _flush(self) -> None:
        """Feed the last step's tokens: the cache advances a slot and every row gets its next logits."""
        if self._fed is None:
            return
        token = self._take_fed()
        r = self.rows
        r.positions = r.positions + 1
        with _adapted(self.adapters, r.adapter):
            r.logits = self.model(token[:, None], r.positions, self.cache)[:, -1].float()
        if self.guidance is not None:
            self.guidance.feed(token)

    def _take_fed(self) -> torch.Tensor:
        """The last step's tokens (N,), now counted in the tables of tokens seen and made; finished rows are
        dropped first when they are as many as the live ones (`compact`)."""
        token, self._fed = self._fed, None
        self._count(token)
        r = self.rows
        dead = r.done.count(True) if self.compact else 0
        if dead and dead >= len(r.done) - dead:  # as many finished rows as live ones: drop them
            token = token[self._rebuild()]
        return token

    def _count(self, token: torch.Tensor) -> None:
        """Each row's token (N,) joins the tokens it holds (repetition_penalty) and has made (presence/frequency)."""
        r = self.rows
        if r.seen is not None:
            r.seen[torch.arange(len(token), device=self.device), token] = True
        if r.made is not None:
            r.made[torch.arange(len(token), device=self.device), token] += 1

    @torch.inference_mode()
    def steps(self) -> list[Step]:
        """[step()], or, when one sequence decodes alone and the batch has a guesser, a round of assisted generation
        (neolm.speculative): its guesses and its newest token read in one forward, and 1 to guesses + 1 tokens kept,
        a Step each. Greedy, they are its greedy tokens (a forward of several positions rounds otherwise than
        one-token steps, so a near-tie may go the other way); sampled, draws from its distribution. Seeded
        sampling (which must repeat what plain decoding draws) and classifier-free guidance always step."""
        r = self.rows
        if self.guesser is None or self._fed is None or self.guidance is not None or self.live != 1:
            return [self.step()]
        row = r.done.index(False)  # (with `compact`, the finished rows leave as the round begins)
        group, room = self.groups[r.group[row]], r.budgets[row] - r.counts[row]  # room: tokens it may still make
        if (len(r.ids) > 1 and not self.compact) or room < 2 or (group.gc.do_sample and group.gc.seed is not None):
            return [self.step()]
        if self._guessing is None or self._guessing[0] != r.ids[row]:
            from neolm.speculative import Picker  # (it builds on this module)

            picker = Picker(group.gc, group.processors, r.lengths[row], r.budgets[row], self.model.config.vocab_size,
                            self.device, self.generator, r.prompt[row])  # fmt: skip
            self._guessing = (r.ids[row], picker, self.guesser(group.gc, picker, r.lengths[row] + r.budgets[row]))
        guesses, q = self._guessing[2].guess(r.histories[row], min(room, self.cache.max_len - self.cache.length) - 1)
        if not guesses:  # (a plain step costs less than a round of one position)
            return [self.step()]
        return self._guess_round(group, guesses, q)

    @torch.inference_mode()
    def _guess_round(self, group: _Group, guesses: list[int], q: torch.Tensor | None) -> list[Step]:
        """The round of the live row's guesses (q: the draft's probabilities of them, when sampled)."""
        token = self._take_fed()
        r = self.rows  # (one row)
        _, picker, guesser = self._guessing
        start = self.cache.length
        x = torch.cat((token, torch.tensor(guesses, dtype=torch.long, device=self.device)))[None]  # (1, 1 + c)
        positions = r.positions + torch.arange(1, x.shape[1] + 1, device=self.device)
        with _adapted(self.adapters, r.adapter):
            logits = self.model(x, positions, self.cache)[0].float()  # (1 + c, V)
        raw = torch.log_softmax(logits, dim=-1) if r.k[0] is not None else None  # before processing touches them
        kept_logits = logits.clone() if self.keep_logits else None
        scores = picker.scores(logits, r.histories[0], guesses)
        new = picker.keep(scores, guesses, q)
        guesser.update(len(new) - 1, len(guesses))
        self.rounds, self.guessed, self.kept = self.rounds + 1, self.guessed + len(guesses), self.kept + len(new) - 1
        steps, now = [], time.monotonic()
        for j, chosen in enumerate(new):
            end = self._made(group, 0, chosen, scores[j], now)
            logprobs = None
            if raw is not None:
                top = torch.topk(raw[j], r.k[0]) if r.k[0] else None
                logprobs = TokenLogprobs([float(raw[j, chosen])], [top.indices.tolist() if top else []],
                                         [top.values.tolist() if top else []])  # fmt: skip
            steps.append(Step(list(r.ids), [chosen], [end], logprobs,
                              None if kept_logits is None else kept_logits[j : j + 1],
                              scores[j : j + 1] if self.keep_scores else None))  # fmt: skip
            if end is not None:
                break
        made = len(steps)  # the fed token and the kept guesses before the last token made are in the cache
        self.cache.length = start + made
        r.positions = r.positions + made
        for kept in new[: made - 1]:  # (the last is counted when it is fed)
            self._count(torch.tensor([kept], device=self.device))
        r.done[0] = steps[-1].ends[0] is not None
        r.logits = None
        if not r.done[0]:
            self._fed = torch.tensor([new[made - 1]], device=self.device)
        return steps


def iter_generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    gc: GenerationConfig,
    decode: Callable[[list[int]], str] | None = None,
    logprobs: int | None = None,
    on_prompt: Callable[[int, TokenLogprobs], None] | None = None,
    mixed: Mixed | None = None,
) -> Iterator[list[int | None]] | Iterator[tuple[list[int | None], TokenLogprobs]]:
    """Yield, per step, the new token of each sequence, or None for one that has finished; with `logprobs`
    (k >= 0), (tokens, TokenLogprobs with the top k) instead. on_prompt(i, TokenLogprobs), if given, gets the
    log-probabilities of prompt i's tokens 1 .. n-1 (with the top `logprobs`, if any), from the same forward
    that reads the prompts into the cache, before the first step.

    Sequences are the prompts, each repeated num_return_sequences times (prompt-major). Prompts of
    different lengths are left-padded; positions and masks make each one's tokens equal to what it
    gets alone. `decode` (token ids -> text) is needed for stop_strings. Bad arguments raise here,
    before the first step. mixed: each prompt's LoRA adapter (neolm.multilora), all in one batch.
    """
    steps = iter_steps(model, prompts, gc, decode, logprobs, on_prompt, mixed=mixed)
    return (step.tokens if logprobs is None else (step.tokens, step.scores) for step in steps)


def iter_steps(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    gc: GenerationConfig,
    decode: Callable[[list[int]], str] | None = None,
    logprobs: int | None = None,
    on_prompt: Callable[[int, TokenLogprobs], None] | None = None,
    keep_logits: bool = False,
    keep_scores: bool = False,
    mixed: Mixed | None = None,
) -> Iterator[Step]:
    """iter_generate's steps whole: each a Step whose rows are the sequences in order (none leaves the batch),
    with keep_logits / keep_scores each row's logits and processed scores too. Bad arguments raise here."""
    batch = DecodeBatch(model, decode, compact=False, adapters=None if mixed is None else mixed.adapters)
    batch.keep_logits, batch.keep_scores = keep_logits, keep_scores
    prefill = batch.prefill(prompts, gc, logprobs, on_prompt, adapter=0 if mixed is None else mixed.per_prompt)
    return _steps(batch, prefill)


def _steps(batch: DecodeBatch, prefill: Prefill) -> Iterator[Step]:
    prefill.read_all(batch.model)
    batch.join(prefill)
    while not batch.finished:
        yield batch.step()


def check_mixed(gc: GenerationConfig, assistant: GPT | None, mixed: Mixed | None) -> None:
    """Refuse prompts with different adapters in the modes that do not run them as one DecodeBatch."""
    if mixed is not None and (assistant is not None or gc.assisted or gc.num_beams > 1
                              or gc.contrastive or gc.dola_layers is not None):  # fmt: skip
        raise NeolmError("prompts with different adapters (adapter_names) decode in one batch: not with beam search, "
                         "assisted generation, contrastive search or DoLa; give one adapter for all")


def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    gc: GenerationConfig,
    decode: Callable[[list[int]], str] | None = None,
    assistant: GPT | None = None,
    mixed: Mixed | None = None,
) -> list[list[int]]:
    """The new tokens of every sequence (prompts x num_return_sequences, prompt-major); eos included. With an
    `assistant` model or gc.prompt_lookup_num_tokens, assisted generation (neolm.speculative). mixed: each
    prompt's LoRA adapter (neolm.multilora), in one batch (not with the modes that run otherwise)."""
    check_mixed(gc, assistant, mixed)
    if assistant is not None or gc.assisted:
        from neolm.speculative import assisted_generate  # (these modules build on this one)

        return assisted_generate(model, prompts, gc, decode, assistant)
    if gc.num_beams > 1:
        from neolm.beam import beam_search

        return beam_search(model, prompts, gc, decode)
    if gc.contrastive:
        from neolm.contrastive import contrastive_generate

        return contrastive_generate(model, prompts, gc, decode)
    if gc.dola_layers is not None:
        from neolm.dola import dola_generate

        return dola_generate(model, prompts, gc, decode)
    outputs: list[list[int]] = [[] for _ in range(len(prompts) * gc.num_return_sequences)]
    for step in iter_generate(model, prompts, gc, decode, mixed=mixed):
        for out, token in zip(outputs, step):
            if token is not None:
                out.append(token)
    return outputs

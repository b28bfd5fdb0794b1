"""Text generation as free functions: prefill, then one token per step into a static KV cache.

Argument names and semantics follow `transformers.generate` (max_new_tokens, min_length, do_sample,
temperature, top_k, top_p, repetition_penalty, num_return_sequences, stop_strings, ...), with two
deliberate differences: lengths count each sequence's own prompt (not the padded batch), so a
prompt's output never depends on what it is batched with; and the default length is 100 new tokens
(transformers: max_length 20 in all).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from neolm.errors import NeolmError
from neolm.model import GPT, KVCache
from neolm.sampling import StopStrings, TokenLogprobs, argmax, process_logits, project_logprobs

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 100


@dataclass
class GenerationConfig:
    max_new_tokens: int | None = None  # new tokens per sequence (wins over max_length)
    max_length: int | None = None  # prompt + new tokens
    min_length: int = 0  # prompt + new tokens before eos may appear
    min_new_tokens: int = 0
    do_sample: bool = False  # False: greedy
    temperature: float = 1.0
    top_k: int | None = 50  # as transformers; 0/None disables
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # CTRL-style: >1 discourages tokens already in the sequence
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None  # default: the model's
    pad_token_id: int | None = None  # filler after a sequence ends (default: eos)
    stop_strings: str | list[str] | None = None  # stop once the text ends in one (kept in the output)
    seed: int | None = None  # makes sampling reproducible
    truncate_prompt: bool = False  # drop the oldest prompt tokens instead of failing on overflow

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_kwargs(cls, **kwargs) -> GenerationConfig:
        known = cls.field_names()
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise NeolmError(f"unknown generation argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**kwargs).validated()

    def validated(self) -> GenerationConfig:
        def check(ok: bool, message: str):
            if not ok:
                raise NeolmError(message)

        for name in ("max_new_tokens", "max_length"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, int) and value >= 0), f"{name} must be >= 0, got {value}")
        for name in ("min_length", "min_new_tokens"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 0, f"{name} must be >= 0, got {value}")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature} (use do_sample=False for greedy)")
        check(self.top_k is None or self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check(self.num_return_sequences >= 1, f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        check(
            self.do_sample or self.num_return_sequences == 1,
            "num_return_sequences > 1 needs do_sample=True (greedy decoding gives identical sequences)",
        )
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise NeolmError(f"min_new_tokens {self.min_new_tokens} exceeds max_new_tokens {self.max_new_tokens}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        check(all(self.stop_strings or []), "stop strings must not be empty")
        return self

    def eos_ids(self, default: int | None) -> list[int]:
        """The ids that end a sequence: eos_token_id (one or a list), else `default` (the model's)."""
        eos = self.eos_token_id if self.eos_token_id is not None else default
        return [eos] if isinstance(eos, int) else list(eos or [])

    def new_token_budget(self, prompt_len: int) -> int:
        """How many tokens a prompt of this length may get (max_new_tokens wins over max_length)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            return max(self.max_length - prompt_len, 0)
        return max(DEFAULT_MAX_NEW_TOKENS, self.min_new_tokens, self.min_length - prompt_len)


def fit_prompts(prompts: Sequence[Sequence[int]], gc: GenerationConfig, n_ctx: int, vocab: int) -> list[list[int]]:
    """Check each prompt plus its new tokens against the context; truncate from the left if asked."""
    fitted = []
    for i, prompt in enumerate(prompts):
        prompt = list(prompt)
        if not prompt:
            raise NeolmError("empty prompt: give at least one token (for unconditional text, start from <|endoftext|>)")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise NeolmError(
                f"token id {bad[0]} is outside the model's vocabulary of {vocab}: do tokenizer and model match?"
            )
        budget = gc.new_token_budget(len(prompt))
        if len(prompt) + budget > n_ctx:
            keep = n_ctx - budget
            if not gc.truncate_prompt or keep < 1:
                which = f"prompt {i}" if len(prompts) > 1 else "the prompt"
                raise NeolmError(
                    f"{which} has {len(prompt)} tokens; with {budget} new tokens that is {len(prompt) + budget}, "
                    f"more than the model's context of {n_ctx}. Lower max_new_tokens or shorten the prompt"
                    + ("" if keep < 1 else ", or allow truncate_prompt to drop the oldest tokens")
                )
            log.warning("prompt truncated from %d to its last %d tokens to fit the context", len(prompt), keep)
            prompt = prompt[-keep:]
        fitted.append(prompt)
    return fitted


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many tokens a and b share from the start."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@dataclass
class Step:
    """One step of a DecodeBatch, by row: each sequence's id, its new token (None for one that had finished
    before this step), why it finished with this token ("stop": an eos token or a stop string; "length": its
    token budget; None: it goes on), and, when some sequence wants them, the log-probabilities (rows as here)."""

    ids: list[int]
    tokens: list[int | None]
    ends: list[str | None]
    scores: TokenLogprobs | None


@dataclass
class _Group:
    """The settings that sequences added with equal GenerationConfigs share: they are processed and picked together."""

    gc: GenerationConfig
    eos_ids: list[int]
    pad: int  # fed after a sequence ends
    stops: StopStrings | None


@dataclass
class _Rows:
    """The per-sequence state of a DecodeBatch: lists and tensors (N, ...) on the model's device, a row each."""

    ids: list[int]
    group: list[int]  # index into DecodeBatch.groups
    k: list[int | None]  # log-probabilities wanted: how many alternatives (None: none)
    histories: list[list[int] | None]  # prompt + new tokens, where stop strings are watched
    lengths: list[int]  # prompt lengths
    budgets: list[int]  # new tokens allowed
    counts: list[int]  # new tokens so far
    done: list[bool]
    positions: torch.Tensor  # (N, 1) the position of the last token fed
    logits: torch.Tensor | None  # (N, V) fp32 logits of the next token; None while the last step's tokens wait
    seen: torch.Tensor | None  # (N, V) bool: the tokens each sequence holds (for repetition_penalty)

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
            if field.name == "seen" and (a is None) != (b is None):  # rows without a penalty: nothing seen
                vocab = (a if b is None else b).shape[1]
                a = a if a is not None else torch.zeros(len(self.ids), vocab, dtype=torch.bool, device=b.device)
                b = b if b is not None else torch.zeros(len(other.ids), vocab, dtype=torch.bool, device=a.device)
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
        columns; None: all that are left), or all that are left when fewer than twice that: a short last chunk
        would run other kernels than one whole forward (few-row products), and might round differently. Chunks
        of some hundreds of tokens give one forward's numbers (tests/test_generate.py). Returns the tokens read."""
        if not self.left:
            return 0
        rows, width = self.tokens.shape
        cols = width if budget is None else max(1, budget // rows)
        end = width if width - self.done < 2 * cols else self.done + cols
        tokens, positions = self.tokens[:, self.done : end], self.positions[:, self.done : end]
        if self.on_prompt is not None:  # every position's hidden state, to score the prompts
            self.hidden.append(model(tokens, positions, self.cache, head=False))
        elif end < width:  # only the cache
            model(tokens, positions, self.cache, last_only=True, head=False)
        else:
            self.logits = model(tokens, positions, self.cache, last_only=True)[:, -1].float()
        read, self.done = (end - self.done) * rows, end
        return read


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

    def __init__(self, model: GPT, decode: Callable[[list[int]], str] | None = None, compact: bool = True):
        self.model, self.decode, self.compact = model, decode, compact
        self.device = model.ln_f.weight.device
        self.groups: list[_Group] = []
        self.rows: _Rows | None = None
        self.cache: KVCache | None = None
        self._spare: KVCache | None = None  # the cache before the last rebuild: memory for the next (KVCache.aligned)
        self.generator: torch.Generator | None = None
        self._fed: torch.Tensor | None = None  # the last step's tokens (N,), fed to the model before the next
        self._ids = itertools.count()

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
        if gc.seed is not None and gc.do_sample and (self.generator is not None or self.rows is not None):
            raise NeolmError("a seeded generation must be the only one in its batch")

    def _group(self, gc: GenerationConfig) -> int:
        for i, group in enumerate(self.groups):
            if group.gc == gc:
                return i
        eos_ids = gc.eos_ids(self.model.config.eos_token_id)
        pad = gc.pad_token_id if gc.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        stops = StopStrings(gc.stop_strings, self.decode) if gc.stop_strings else None
        if gc.do_sample and self.generator is None:
            self.generator = torch.Generator(device=self.device)
            if gc.seed is not None:
                self.generator.manual_seed(gc.seed)
            else:
                self.generator.seed()
        self.groups.append(_Group(gc, eos_ids, pad, stops))
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
        prefill.read(self.model)
        return self.join(prefill)

    @torch.inference_mode()
    def prefill(
        self,
        prompts: Sequence[Sequence[int]],
        gc: GenerationConfig,
        logprobs: int | None | Sequence[int | None] = None,
        on_prompt: Callable[[int, TokenLogprobs], None] | None = None,
        reuse: tuple[KVCache, Sequence[int]] | None = None,
    ) -> Prefill:
        """`add` in parts, so that a long prompt need not hold up the running sequences for the whole of its
        forward: the prompts, ready to be read into a cache of their own by Prefill.read (in chunks of columns,
        between steps), then join() adds them. Chunks give the same numbers as one forward here (CPU).

        reuse: (a cache of one row without padding, the tokens in its slots), from an earlier generation
        (neolm.conversation): the tokens one prompt shares with it from the start are taken from it instead of
        read again (all but the last, whose logits are needed), and `done` counts them. The prefill takes that
        cache itself (it is changed) when it has the room, else a copy of those slots. The rest of the prompt is
        read as a chunk after them, whose numbers may round differently from one forward of the whole."""
        self.validate(gc, logprobs)
        config, device = self.model.config, self.device
        prompts = fit_prompts(prompts, gc, config.n_positions, config.vocab_size)
        if reuse is not None and (len(prompts) != 1 or gc.num_return_sequences != 1 or on_prompt is not None):
            raise NeolmError("a cache can be reused for one sequence of one prompt that is not scored")
        n = gc.num_return_sequences
        wanted = list(logprobs) if isinstance(logprobs, Sequence) else [logprobs] * len(prompts)
        seqs = [p for p in prompts for _ in range(n)]
        prefill = Prefill([next(self._ids) for _ in seqs], seqs, gc, -1, [k for k in wanted for _ in range(n)],
                          [gc.new_token_budget(len(p)) for p in seqs], on_prompt)  # fmt: skip
        if not seqs or (max(prefill.budgets) == 0 and on_prompt is None):
            return prefill  # nothing to read
        prefill.group = self._group(gc)
        # with no sequence running, the new ones may take this cache as theirs (join): room for their tokens
        prefill.room = 0 if self.rows is not None and (not self.compact or self.live > 0) else max(prefill.budgets)
        width = max(len(p) for p in seqs)
        lengths = torch.tensor([len(p) for p in seqs], device=device)
        prefill.tokens = torch.full((len(seqs), width), self.groups[prefill.group].pad, dtype=torch.long, device=device)
        for row, p in enumerate(seqs):
            prefill.tokens[row, width - len(p) :] = torch.tensor(p)
        if reuse is not None:  # the prompt's tokens up to the first that differs, but its last
            held, tokens = reuse
            if held.k.shape[1] != 1 or held.valid is not None:
                raise NeolmError("a reused cache must hold one row without padding")
            prefill.done = min(shared_prefix(tokens[: held.length], seqs[0]), width - 1)
        if reuse is not None and held.max_len >= width + prefill.room:
            cache, cache.length = held, prefill.done  # its slots from there on are written before they are read
        else:
            cache = KVCache(config, len(seqs), width + prefill.room, self.model.cache_dtype, device)
            if reuse is not None:
                cache.take_prefix(held, prefill.done)
        if int(lengths.min()) < width:  # left padding: hide pad slots, count positions from each prompt's start
            cache.valid = torch.ones(len(seqs), cache.max_len, dtype=torch.bool, device=device)
            cache.valid[:, :width] = torch.arange(width, device=device) >= (width - lengths)[:, None]
        prefill.cache = cache
        prefill.positions = (torch.arange(width, device=device) - (width - lengths)[:, None]).clamp(min=0)  # (N, T)
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
        seen = None
        if gc.repetition_penalty != 1.0:
            seen = torch.zeros(len(seqs), self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            for row, p in enumerate(seqs):
                seen[row, torch.tensor(p)] = True
        new = _Rows(
            prefill.ids, [prefill.group] * len(seqs), prefill.k,
            [list(p) for p in seqs] if gc.stop_strings else [None] * len(seqs), [len(p) for p in seqs],
            prefill.budgets, [0] * len(seqs), [b == 0 for b in prefill.budgets], prefill.positions[:, -1:], logits,
            seen,
        )  # fmt: skip
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
        chosen = self._choose()
        tokens, ends, fed = [], [], []
        for row, token in enumerate(chosen.tolist()):
            group = self.groups[r.group[row]]
            if r.done[row]:
                tokens.append(None)
                ends.append(None)
                fed.append(group.pad)
                continue
            r.counts[row] += 1
            history = r.histories[row]
            if history is not None:
                history.append(token)
            if token in group.eos_ids or (history is not None and group.stops.hit(history)):
                ends.append("stop")
            else:
                ends.append("length" if r.counts[row] >= r.budgets[row] else None)
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
        return Step(r.ids, tokens, ends, scores)

    def _choose(self) -> torch.Tensor:
        """Each row's next token (N,), from its group's processing and pick (rows that are done: anything)."""
        r = self.rows
        groups = set(r.group)
        if len(groups) == 1:
            return self._pick(self.groups[r.group[0]], r.logits, r.seen, range(len(r.ids)))
        token = torch.empty(len(r.ids), dtype=torch.long, device=self.device)
        for g in sorted(groups):
            rows = [row for row, x in enumerate(r.group) if x == g]
            index = torch.tensor(rows, device=self.device)
            seen = None if r.seen is None else r.seen[index]
            token[index] = self._pick(self.groups[g], r.logits[index], seen, rows)
        return token

    def _pick(self, group: _Group, logits, seen, rows) -> torch.Tensor:
        gc, r = group.gc, self.rows
        counts = lengths = None
        if gc.min_length or gc.min_new_tokens:  # eos may be blocked
            counts = torch.tensor([r.counts[row] for row in rows], device=self.device)
            lengths = counts + torch.tensor([r.lengths[row] for row in rows], device=self.device)
        logits = process_logits(logits, gc, seen, lengths, counts, group.eos_ids)
        if gc.do_sample:
            return torch.multinomial(logits.softmax(dim=-1), 1, generator=self.generator).squeeze(1)
        return argmax(logits)

    def _flush(self) -> None:
        """Feed the last step's tokens: the cache advances a slot and every row gets its next logits."""
        if self._fed is None:
            return
        token, self._fed = self._fed, None
        r = self.rows
        if r.seen is not None:
            r.seen[torch.arange(len(token), device=self.device), token] = True
        dead = r.done.count(True) if self.compact else 0
        if dead and dead >= len(r.done) - dead:  # as many finished rows as live ones: drop them
            token = token[self._rebuild()]
            r = self.rows
        r.positions = r.positions + 1
        r.logits = self.model(token[:, None], r.positions, self.cache)[:, -1].float()


def iter_generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    gc: GenerationConfig,
    decode: Callable[[list[int]], str] | None = None,
    logprobs: int | None = None,
    on_prompt: Callable[[int, TokenLogprobs], None] | None = None,
) -> Iterator[list[int | None]] | Iterator[tuple[list[int | None], TokenLogprobs]]:
    """Yield, per step, the new token of each sequence, or None for one that has finished; with `logprobs`
    (k >= 0), (tokens, TokenLogprobs with the top k) instead. on_prompt(i, TokenLogprobs), if given, gets the
    log-probabilities of prompt i's tokens 1 .. n-1 (with the top `logprobs`, if any), from the same forward
    that reads the prompts into the cache, before the first step.

    Sequences are the prompts, each repeated num_return_sequences times (prompt-major). Prompts of
    different lengths are left-padded; positions and masks make each one's tokens equal to what it
    gets alone. `decode` (token ids -> text) is needed for stop_strings. Bad arguments raise here,
    before the first step.
    """
    batch = DecodeBatch(model, decode, compact=False)
    batch.validate(gc, logprobs)
    prompts = fit_prompts(prompts, gc, model.config.n_positions, model.config.vocab_size)
    return _steps(batch, prompts, gc, logprobs, on_prompt)


def _steps(batch: DecodeBatch, prompts, gc, logprobs, on_prompt):
    batch.add(prompts, gc, logprobs, on_prompt)
    while not batch.finished:
        step = batch.step()
        yield step.tokens if logprobs is None else (step.tokens, step.scores)


def generate(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    gc: GenerationConfig,
    decode: Callable[[list[int]], str] | None = None,
) -> list[list[int]]:
    """The new tokens of every sequence (prompts x num_return_sequences, prompt-major); eos included."""
    outputs: list[list[int]] = [[] for _ in range(len(prompts) * gc.num_return_sequences)]
    for step in iter_generate(model, prompts, gc, decode):
        for out, token in zip(outputs, step):
            if token is not None:
                out.append(token)
    return outputs

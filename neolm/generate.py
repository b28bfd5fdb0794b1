"""Text generation as free functions: prefill, then one token per step into a static KV cache.

Argument names and semantics follow `transformers.generate` (max_new_tokens, min_length, do_sample,
temperature, top_k, top_p, repetition_penalty, num_return_sequences, stop_strings, ...), with two
deliberate differences: lengths count each sequence's own prompt (not the padded batch), so a
prompt's output never depends on what it is batched with; and the default length is 100 new tokens
(transformers: max_length 20 in all).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from neolm import native
from neolm.errors import NeolmError
from neolm.model import GPT, KVCache

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


def process_logits(logits, gc: GenerationConfig, seen, lengths, new_counts, eos_ids) -> torch.Tensor:
    """Apply transformers' logits processors and warpers, in its order, to fp32 logits (N, V). Blocking eos
    writes into `logits` itself (the caller's own tensor: a copy of 8 x 50k logits took ~0.15 ms a step in cProfile)."""
    if gc.repetition_penalty != 1.0:
        penalized = torch.where(logits < 0, logits * gc.repetition_penalty, logits / gc.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if eos_ids:
        block = (lengths < gc.min_length) | (new_counts < gc.min_new_tokens)  # (N,)
        if block.any():
            logits[block.nonzero()[:, :1], torch.tensor(eos_ids, device=logits.device)] = -float("inf")
    if not gc.do_sample:
        return logits
    if gc.temperature != 1.0:
        logits = logits / gc.temperature
    if gc.top_k:
        kth = torch.topk(logits, min(gc.top_k, logits.shape[-1])).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if gc.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= 1 - gc.top_p
        remove[..., -1:] = False  # keep at least one token
        logits = logits.masked_fill(remove.scatter(1, order, remove), -float("inf"))
    return logits


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
    if logprobs is not None and not 0 <= logprobs <= model.config.vocab_size:
        raise NeolmError(f"logprobs must be between 0 and the vocabulary size, got {logprobs}")
    config = model.config
    eos_ids = gc.eos_ids(config.eos_token_id)
    pad = gc.pad_token_id if gc.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
    stops = None
    if gc.stop_strings:
        if decode is None:
            raise NeolmError("stop_strings need a tokenizer to decode the text")
        stops = StopStrings(gc.stop_strings, decode)

    prompts = fit_prompts(prompts, gc, config.n_positions, config.vocab_size)
    return _steps(model, [p for p in prompts for _ in range(gc.num_return_sequences)], gc, eos_ids, pad, stops,
                  logprobs, on_prompt)  # fmt: skip


@torch.inference_mode()
def _steps(model: GPT, prompts: list[list[int]], gc: GenerationConfig, eos_ids, pad, stops, logprobs, on_prompt):
    config = model.config
    budgets = torch.tensor([gc.new_token_budget(len(p)) for p in prompts])
    if int(budgets.max()) == 0 and on_prompt is None:
        return
    device = model.ln_f.weight.device
    n, width = len(prompts), max(len(p) for p in prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    ids = torch.full((n, width), pad, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
    cache = KVCache(config, n, width + int(budgets.max()), model.cache_dtype, device)
    if int(lengths.min()) < width:  # left padding: hide pad slots, count positions from each prompt's start
        cache.valid = torch.ones(n, cache.max_len, dtype=torch.bool, device=device)
        cache.valid[:, :width] = torch.arange(width, device=device) >= (width - lengths)[:, None]
    positions = (torch.arange(width, device=device) - (width - lengths)[:, None]).clamp(min=0)  # (N, T)
    seen = None
    if gc.repetition_penalty != 1.0:
        seen = torch.zeros(n, config.vocab_size, dtype=torch.bool, device=device)
        for row, p in enumerate(prompts):
            seen[row, torch.tensor(p)] = True
    generator = None
    if gc.do_sample:
        generator = torch.Generator(device=device)
        if gc.seed is not None:
            generator.manual_seed(gc.seed)
        else:
            generator.seed()
    histories = [list(p) for p in prompts] if stops else None
    budgets = budgets.to(device)
    eos = torch.tensor(eos_ids, device=device)
    done = budgets == 0
    new_counts = torch.zeros(n, dtype=torch.long, device=device)

    if on_prompt is None:
        logits = model(ids, positions, cache, last_only=True)[:, -1].float()  # (N, V)
    else:
        hidden = model(ids, positions, cache, head=False)  # (N, T, C)
        for i in range(0, n, gc.num_return_sequences):  # each prompt's first sequence
            p = prompts[i]
            on_prompt(
                i // gc.num_return_sequences, project_logprobs(model, hidden[i, width - len(p) : -1], p[1:], logprobs)
            )
        if int(budgets.max()) == 0:
            return
        logits = model.lm_head(hidden[:, -1]).float()
    while True:
        raw = torch.log_softmax(logits, dim=-1) if logprobs is not None else None  # before processing touches logits
        logits = process_logits(logits, gc, seen, lengths + new_counts, new_counts, eos_ids)
        if gc.do_sample:
            token = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
        else:
            token = _argmax(logits)
        token = token.masked_fill(done, pad)
        new_counts += ~done
        out = token.tolist()
        step = [None if d else t for t, d in zip(out, done.tolist())]
        finished = done | (new_counts >= budgets)
        if eos_ids:
            finished |= torch.isin(token, eos)
        if stops:
            for row, t in enumerate(step):
                if t is not None:
                    histories[row].append(t)
                    if stops.hit(histories[row]):
                        finished[row] = True
        if raw is None:
            yield step
        else:
            top = torch.topk(raw, logprobs) if logprobs else None
            yield step, TokenLogprobs(raw.gather(1, token[:, None])[:, 0].tolist(),
                                     top.indices.tolist() if top else [[]] * n, top.values.tolist() if top else [[]] * n)  # fmt: skip
        done = finished
        if bool(done.all()):
            return
        if seen is not None:
            seen[torch.arange(n, device=device), token] = True
        positions = positions[:, -1:] + 1
        logits = model(token[:, None], positions, cache)[:, -1].float()


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


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits (N, V) -> (N,) token ids, as torch.argmax (neolm's native one on CPU: ~0.3 ms less a step at 8 rows)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and "f32" in native.available()[0]:
        return native.argmax(logits.contiguous())
    return logits.argmax(dim=-1)


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

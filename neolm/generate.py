"""Text generation as free functions: prefill, then one token per step into a static KV cache.

Argument names and semantics follow `transformers.generate` (max_new_tokens, min_length, do_sample,
temperature, top_k, top_p, repetition_penalty, num_return_sequences, stop_strings, its other logits processors
in neolm.sampling, num_beams in neolm.beam, ...), with two
deliberate differences: lengths count each sequence's own prompt (not the padded batch), so a
prompt's output never depends on what it is batched with; and the default length is 100 new tokens
(transformers: max_length 20 in all).
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
from neolm.guidance import Guidance
from neolm.model import GPT, KVCache
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
from neolm.structured import Guide, check_spec
from neolm.synthid import SynthIDConfig
from neolm.watermark import WatermarkingConfig, settings

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
    # beam search (neolm.beam)
    num_beams: int = 1  # > 1: beam search
    length_penalty: float = 1.0  # a finished beam's score is its log-probability / (new tokens ** length_penalty)
    early_stopping: bool | str = False  # True: stop at num_beams finished; False: heuristic; "never": exhaustive
    # more of transformers' logits processors (neolm.sampling.Processors)
    no_repeat_ngram_size: int = 0  # no n-gram of this size may occur twice (prompt included)
    bad_words_ids: list[list[int]] | None = None  # token sequences that may not be generated
    sequence_bias: dict[tuple[int, ...], float] | list | None = None  # added to a sequence's last token's logit
    suppress_tokens: list[int] | None = None  # never generated
    begin_suppress_tokens: list[int] | None = None  # not generated as the first new token
    forced_eos_token_id: int | list[int] | None = None  # forced as the last token the length allows
    exponential_decay_length_penalty: tuple[int, float] | None = None  # (start, factor): eos likelier after start
    min_p: float | None = None  # sampling: drop tokens below min_p x the likeliest's probability
    top_h: float | None = None  # sampling: the likeliest tokens whose entropy stays within top_h x the whole's
    typical_p: float = 1.0  # sampling: locally typical mass
    epsilon_cutoff: float = 0.0  # sampling: drop tokens below this probability
    eta_cutoff: float = 0.0  # sampling: eta sampling's cutoff
    renormalize_logits: bool = False  # log-softmax the scores after all processing (output_scores, beams' scores)
    remove_invalid_values: bool = False  # nan logits become 0, +-inf the largest floats (a model that overflows)
    max_time: float | None = None  # seconds: sequences end with the first token after this much time
    # the caller's own code, as transformers.generate takes it (each is called on one sequence at a time):
    logits_processor: list[Callable] | None = None  # f(input_ids (1, L), scores (1, V)) -> scores, before the warpers
    stopping_criteria: list[Callable] | None = None  # f(input_ids (1, L), scores (1, V)) -> true: the sequence ends
    prefix_allowed_tokens_fn: Callable | None = None  # f(batch_id, input_ids (L,)) -> the token ids allowed next
    # OpenAI's penalties (vLLM's meaning): subtracted from the logits of tokens generated so far
    presence_penalty: float = 0.0  # once per token that was generated
    frequency_penalty: float = 0.0  # per time it was generated
    # classifier-free guidance (neolm.guidance): > 1 sharpens the text's dependence on its prompt
    guidance_scale: float | None = None
    negative_prompt_ids: list[int] | list[list[int]] | None = None  # guidance's context: one, or one per prompt
    # a green-list watermark (neolm.watermark) or SynthID's (neolm.synthid): either config, or its dict
    watermarking_config: WatermarkingConfig | SynthIDConfig | dict | None = None
    penalty_alpha: float | None = None  # > 0 with top_k > 1: contrastive search (neolm.contrastive)
    dola_layers: str | list[int] | None = None  # "low", "high" or layer indices: DoLa (neolm.dola)
    token_healing: bool = False  # choose the prompt's last token again (neolm.healing; text prompts only)
    # the output must match a JSON schema, a regex or a choice (neolm.structured): {"json": schema}, {"regex": r},
    # {"choice": [...]}, {"json_object": True}; the text API compiles it against the tokenizer into a Guide
    structured_outputs: dict | Guide | None = None
    # assisted generation (neolm.speculative): guessed tokens checked by the model in one forward
    prompt_lookup_num_tokens: int | None = None  # guess this many tokens from earlier in the sequence
    max_matching_ngram_size: int | None = None  # prompt lookup: match the last n-gram up to this size (default 2)
    num_assistant_tokens: int = 20  # with an assistant model: it guesses this many at most per forward
    num_assistant_tokens_schedule: str = "constant"  # or "heuristic": +2 after all were right, else -1
    assistant_confidence_threshold: float | None = 0.4  # the assistant stops guessing below this probability

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
            self.do_sample or self.num_return_sequences == 1 or self.num_beams > 1,
            "num_return_sequences > 1 needs do_sample=True or num_beams > 1 (greedy decoding gives identical sequences)",
        )
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise NeolmError(f"min_new_tokens {self.min_new_tokens} exceeds max_new_tokens {self.max_new_tokens}")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        check(all(self.stop_strings or []), "stop strings must not be empty")
        self._validate_processors(check)
        self._validate_guidance(check)
        if self.watermarking_config is not None:
            self.watermarking_config = settings(self.watermarking_config)
        self._validate_contrastive(check)
        self._validate_dola(check)
        self._validate_beams(check)
        self._validate_assisted(check)
        self._validate_structured(check)
        return self

    def _validate_structured(self, check) -> None:
        if self.structured_outputs is None:
            return
        check_spec(self.structured_outputs)
        check(not self.token_healing, "token_healing and structured_outputs do not go together (a healed token would "
                                      "begin the structured text)")  # fmt: skip
        check(self.eos_token_id != [], "structured outputs need an eos token to end the text once it is whole "
                                       "(eos_token_id is empty: ignore_eos?)")  # fmt: skip
        check(self.dola_layers is None, "DoLa (dola_layers) and structured_outputs do not go together (DoLa keeps "
                                        "only the final layer's likeliest tokens, which the structure may all rule "
                                        "out)")  # fmt: skip

    @staticmethod
    def _check_ids(check, value, name: str, nested: bool = False) -> None:
        """A non-empty list of token ids (nested: of non-empty lists of them), else NeolmError through check."""
        lists = value if nested else [value]
        check(isinstance(value, (list, tuple)) and len(value) > 0 and all(
            isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(t, int) and t >= 0 for t in x)
            for x in lists), f"{name} must be a non-empty list of {'non-empty lists of ' if nested else ''}"
            f"token ids (integers >= 0), got {value!r}")  # fmt: skip

    def _validate_processors(self, check) -> None:
        check(isinstance(self.no_repeat_ngram_size, int) and self.no_repeat_ngram_size >= 0,
              f"no_repeat_ngram_size must be an integer >= 0, got {self.no_repeat_ngram_size!r}")  # fmt: skip
        if self.bad_words_ids is not None:
            self._check_ids(check, self.bad_words_ids, "bad_words_ids", nested=True)
            self.bad_words_ids = [list(w) for w in self.bad_words_ids]
        for name in ("suppress_tokens", "begin_suppress_tokens"):
            if getattr(self, name) is not None:
                self._check_ids(check, getattr(self, name), name)
                setattr(self, name, list(getattr(self, name)))
        if self.forced_eos_token_id is not None:
            forced = self.forced_eos_token_id
            self._check_ids(check, [forced] if isinstance(forced, int) else forced, "forced_eos_token_id")
        if self.sequence_bias is not None:
            bias = self.sequence_bias
            pairs = bias.items() if isinstance(bias, dict) else bias if isinstance(bias, (list, tuple)) else None
            check(pairs is not None and len(pairs) > 0 and all(isinstance(p, (list, tuple)) and len(p) == 2 for p in pairs),
                  f"sequence_bias must map token sequences to biases ({{(id, ...): bias}} or [[ids, bias], ...]), "
                  f"got {bias!r}")  # fmt: skip
            self._check_ids(check, [list(seq) for seq, _ in pairs], "sequence_bias's sequences", nested=True)
            numbers = all(isinstance(b, (int, float)) for _, b in pairs)
            check(numbers, f"sequence_bias's biases must be numbers: {bias!r}")
            self.sequence_bias = {tuple(seq): float(b) for seq, b in pairs}
        decay = self.exponential_decay_length_penalty
        if decay is not None:
            check(isinstance(decay, (list, tuple)) and len(decay) == 2 and isinstance(decay[0], int) and decay[0] >= 0
                  and isinstance(decay[1], (int, float)) and decay[1] > 0,
                  f"exponential_decay_length_penalty must be (start index >= 0, factor > 0), got {decay!r}")  # fmt: skip
            self.exponential_decay_length_penalty = (decay[0], float(decay[1]))
        check(self.min_p is None or 0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}")
        check(self.top_h is None or 0 < self.top_h <= 1, f"top_h must be in (0, 1], got {self.top_h}")
        check(self.max_time is None or self.max_time > 0, f"max_time must be > 0 seconds, got {self.max_time}")
        for name in ("logits_processor", "stopping_criteria"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, (list, tuple)) and all(map(callable, value))),
                  f"{name} must be a list of callables (input_ids, scores), got {value!r}")  # fmt: skip
        check(self.prefix_allowed_tokens_fn is None or callable(self.prefix_allowed_tokens_fn),
              "prefix_allowed_tokens_fn must be a callable (batch_id, input_ids) -> allowed token ids")  # fmt: skip
        check(0 < self.typical_p <= 1, f"typical_p must be in (0, 1], got {self.typical_p}")
        for name in ("epsilon_cutoff", "eta_cutoff"):
            check(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1) (0: off), got {getattr(self, name)}")
        for name in ("presence_penalty", "frequency_penalty"):
            check(-2 <= getattr(self, name) <= 2, f"{name} must be between -2 and 2, got {getattr(self, name)}")

    @property
    def guided(self) -> bool:
        """Classifier-free guidance is on."""
        return self.guidance_scale is not None and self.guidance_scale != 1

    def _validate_guidance(self, check) -> None:
        scale, negative = self.guidance_scale, self.negative_prompt_ids
        check(scale is None or (isinstance(scale, (int, float)) and math.isfinite(scale)),
              f"guidance_scale must be a number (1 or None: off), got {scale!r}")  # fmt: skip
        if negative is None:
            return
        if isinstance(negative, torch.Tensor):
            negative = negative.tolist()
        nested = isinstance(negative, (list, tuple)) and len(negative) > 0 and isinstance(negative[0], (list, tuple))
        self._check_ids(check, negative, "negative_prompt_ids", nested)
        check(self.guided, "negative_prompt_ids are the context of classifier-free guidance: set guidance_scale "
                           "(e.g. 1.5) too")  # fmt: skip
        self.negative_prompt_ids = [list(x) for x in negative] if nested else list(negative)

    @property
    def contrastive(self) -> bool:
        """Contrastive search is on (transformers' rule: penalty_alpha > 0, top_k > 1, greedy, one beam)."""
        return bool(self.penalty_alpha) and not self.do_sample and self.num_beams == 1 and (self.top_k or 0) > 1

    def _validate_contrastive(self, check) -> None:
        alpha = self.penalty_alpha
        if alpha is None or alpha == 0:
            return
        check(isinstance(alpha, (int, float)) and 0 < alpha <= 1, f"penalty_alpha must be in [0, 1], got {alpha!r}")
        check(not self.do_sample and self.num_beams == 1,
              "contrastive search (penalty_alpha) chooses without sampling or beams: set do_sample=False, num_beams=1")  # fmt: skip
        check((self.top_k or 0) > 1, f"contrastive search (penalty_alpha) weighs the top_k candidates: top_k must "
                                     f"be > 1 (typically 4 to 10), got {self.top_k}")  # fmt: skip
        check(not self.guided, "contrastive search (penalty_alpha) is not offered with guidance_scale")
        check(self.prompt_lookup_num_tokens is None,
              "contrastive search (penalty_alpha) and prompt lookup do not go together")  # fmt: skip

    def _validate_dola(self, check) -> None:
        layers = self.dola_layers
        if layers is None:
            return
        check(layers in ("low", "high") or (isinstance(layers, (list, tuple)) and len(layers) > 0
                                            and all(isinstance(i, int) and i >= 0 for i in layers)),
              f'dola_layers must be "low", "high" or a list of layer indices (0: the embeddings), got {layers!r}')  # fmt: skip
        if isinstance(layers, tuple):
            self.dola_layers = list(layers)
        check(self.num_beams == 1 and not self.contrastive and not self.guided and self.prompt_lookup_num_tokens is None,
              "DoLa (dola_layers) runs without beams, contrastive search, guidance_scale or prompt lookup")  # fmt: skip

    def _validate_beams(self, check) -> None:
        check(isinstance(self.num_beams, int) and self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams}")
        check(self.early_stopping in (True, False, "never"),
              f'early_stopping must be true, false or "never", got {self.early_stopping!r}')  # fmt: skip
        if self.num_beams == 1:
            return
        check(not self.guided, "classifier-free guidance (guidance_scale) is not offered with beams (num_beams > 1)")
        check(self.num_return_sequences <= self.num_beams,
              f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")  # fmt: skip

    def _validate_assisted(self, check) -> None:
        for name in ("prompt_lookup_num_tokens", "max_matching_ngram_size"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, int) and value >= 1), f"{name} must be >= 1, got {value!r}")
        n = self.num_assistant_tokens
        check(isinstance(n, int) and n >= 1, f"num_assistant_tokens must be >= 1, got {n!r}")
        schedules = ("constant", "heuristic", "heuristic_transient")
        check(self.num_assistant_tokens_schedule in schedules,
              f"num_assistant_tokens_schedule must be one of {', '.join(schedules)}, "
              f"got {self.num_assistant_tokens_schedule!r}")  # fmt: skip
        threshold = self.assistant_confidence_threshold
        check(threshold is None or 0 <= threshold < 1,
              f"assistant_confidence_threshold must be in [0, 1) (0 or None: off), got {threshold}")  # fmt: skip
        check(self.prompt_lookup_num_tokens is None or self.num_beams == 1,
              "prompt lookup (prompt_lookup_num_tokens) and beam search (num_beams > 1) do not go together")  # fmt: skip

    def check_vocab(self, vocab: int) -> None:
        """Raise NeolmError when a processor names a token outside a vocabulary of this size."""
        named = {"bad_words_ids": [t for w in self.bad_words_ids or [] for t in w],
                 "sequence_bias": [t for seq in self.sequence_bias or {} for t in seq],
                 "suppress_tokens": self.suppress_tokens or [], "begin_suppress_tokens": self.begin_suppress_tokens or [],
                 "forced_eos_token_id": [self.forced_eos_token_id] if isinstance(self.forced_eos_token_id, int)
                 else self.forced_eos_token_id or [],
                 "negative_prompt_ids": [t for x in self.negative_prompt_ids or [] for t in (x if isinstance(x, list)
                                                                                             else [x])]}  # fmt: skip
        for name, ids in named.items():
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise NeolmError(f"{name}: token id {bad[0]} is outside the model's vocabulary of {vocab}")

    def eos_ids(self, default: int | None) -> list[int]:
        """The ids that end a sequence: eos_token_id (one or a list), else `default` (the model's)."""
        eos = self.eos_token_id if self.eos_token_id is not None else default
        return [eos] if isinstance(eos, int) else list(eos or [])

    def deadline(self) -> float:
        """When (time.monotonic()) a generation started now must end: after max_time seconds, else never."""
        return time.monotonic() + self.max_time if self.max_time is not None else math.inf

    def new_token_budget(self, prompt_len: int) -> int:
        """How many tokens a prompt of this length may get (max_new_tokens wins over max_length)."""
        if self.max_new_tokens is not None:
            return self.max_new_tokens
        if self.max_length is not None:
            return max(self.max_length - prompt_len, 0)
        return max(DEFAULT_MAX_NEW_TOKENS, self.min_new_tokens, self.min_length - prompt_len)


def fit_prompts(prompts: Sequence[Sequence[int]], gc: GenerationConfig, n_ctx: int, vocab: int) -> list[list[int]]:
    """Check each prompt plus its new tokens against the context; truncate from the left if asked."""
    if gc.token_healing:  # (LanguageModel heals text prompts, then generates from their ids without it)
        raise NeolmError("token_healing needs the prompts' text: use LanguageModel.generate or stream (neolm.healing)")
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
            if field.name in ("seen", "made") and (a is None) != (b is None):  # rows without a penalty: zeros
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
        columns; None: all that are left), or all that are left when fewer than twice that: a short last chunk
        would run other kernels than one whole forward (few-row products), and might round differently. Chunks
        of some hundreds of tokens give one forward's numbers (tests/test_generate.py). Returns the tokens read."""
        if not self.left:
            return 0
        rows, width = self.tokens.shape
        cols = width if budget is None else max(1, budget // rows)
        end = width if width - self.done < 2 * cols else self.done + cols
        tokens, positions = self.tokens[:, self.done : end], self.positions[:, self.done : end]
        with _adapted(self.adapters, self.adapter):
            self._forward(model, tokens, positions, end < width)
        read, self.done = (end - self.done) * rows, end
        return read

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
                 adapters: AdapterSet | None = None):  # fmt: skip
        self.model, self.decode, self.compact = model, decode, compact
        self.adapters = adapters  # the model's LoRA adapters: each sequence runs with the one it was added with
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
        seen = made = None
        vocab = self.model.config.vocab_size
        if gc.repetition_penalty != 1.0:
            seen = torch.zeros(len(seqs), vocab, dtype=torch.bool, device=self.device)
            for row, p in enumerate(seqs):
                seen[row, torch.tensor(p)] = True
        if gc.presence_penalty or gc.frequency_penalty:
            made = torch.zeros(len(seqs), vocab, dtype=torch.int32, device=self.device)
        history = gc.stop_strings or gc.stopping_criteria or self.groups[prefill.group].processors.needs.tokens
        new = _Rows(
            prefill.ids, [prefill.group] * len(seqs), prefill.k,
            [list(p) for p in seqs] if history else [None] * len(seqs), [len(p) for p in seqs],
            prefill.budgets, [0] * len(seqs), [b == 0 for b in prefill.budgets], prefill.positions[:, -1:], logits,
            seen, made, [prefill.deadline] * len(seqs), [i // n for i in range(len(seqs))],
            prefill.adapter,
        )  # fmt: skip
        if prefill.contexts is not None:
            self.guidance = Guidance(self.model, *left_pad(prefill.contexts, 0, self.device), room=max(prefill.budgets))
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
            r.counts[row] += 1
            history = r.histories[row]
            if history is not None:
                history.append(token)
            criteria = group.gc.stopping_criteria
            if (
                token in group.eos_ids
                or (group.stops is not None and group.stops.hit(history))
                or (criteria and criteria_met(criteria, history, processed[row]))
            ):
                ends.append("stop")
            else:
                ends.append("length" if r.counts[row] >= r.budgets[row] or now > r.deadlines[row] else None)
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
            state.new = torch.tensor([r.counts[row] for row in rows], device=self.device)
            state.lengths = state.new + torch.tensor([r.lengths[row] for row in rows], device=self.device)
            state.budgets = torch.tensor([r.budgets[row] for row in rows], device=self.device)
        for name in ("seen", "made"):
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
        token, self._fed = self._fed, None
        r = self.rows
        if r.seen is not None:
            r.seen[torch.arange(len(token), device=self.device), token] = True
        if r.made is not None:
            r.made[torch.arange(len(token), device=self.device), token] += 1
        dead = r.done.count(True) if self.compact else 0
        if dead and dead >= len(r.done) - dead:  # as many finished rows as live ones: drop them
            token = token[self._rebuild()]
            r = self.rows
        r.positions = r.positions + 1
        with _adapted(self.adapters, r.adapter):
            r.logits = self.model(token[:, None], r.positions, self.cache)[:, -1].float()
        if self.guidance is not None:
            self.guidance.feed(token)


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
    prefill.read(batch.model)
    batch.join(prefill)
    while not batch.finished:
        yield batch.step()


def check_mixed(gc: GenerationConfig, assistant: GPT | None, mixed: Mixed | None) -> None:
    """Refuse prompts with different adapters in the modes that do not run them as one DecodeBatch."""
    if mixed is not None and (assistant is not None or gc.prompt_lookup_num_tokens is not None or gc.num_beams > 1
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
    if assistant is not None or gc.prompt_lookup_num_tokens is not None:
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

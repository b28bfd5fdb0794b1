"""What a generation is asked to do: GenerationConfig, with transformers.generate's argument names, checked once
(validated) before any model runs; and fit_prompts, which checks prompts against it and the model's context.

The generation loop is neolm.generate; each field's comment names the module that reads it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from neolm.errors import NeolmError
from neolm.structured import Guide, check_spec
from neolm.synthid import SynthIDConfig
from neolm.watermark import WatermarkingConfig, settings

log = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 100

# transformers' generation arguments that neolm does not take, and where their job is done instead
NOT_TAKEN = {
    "compile_config": "neolm compiles when the model loads (neolm.load(..., compile=True), `--compile`), not per call",
    "cache_config": "the KV cache's settings are load()'s: neolm.load(..., kv_cache_dtype='int8' or 'bfloat16') for a "
                    "smaller one; cache_implementation and max_cache_len are taken here",
    "continuous_batching_config": "continuous batching is `neolm serve`'s (requests join and leave a running batch); "
                                  "generate() takes a list of prompts as one batch",
    "decoder_start_token_id": "GPT-Neo and GPT-NeoX are decoder-only: a prompt starts the text (an empty one starts "
                              "from bos_token_id)",
    "use_mtp": "these models have no multi-token prediction heads; for speculative decoding give assistant_model= or "
               "prompt_lookup_num_tokens=",
    "speculation_type": "speculative decoding is chosen by its arguments: assistant_model= (a draft model), "
                        "prompt_lookup_num_tokens= (n-grams of the prompt) or assistant_early_exit= (the model's "
                        "own early layers)",
    "is_assistant": "a draft model is passed to generate() as assistant_model=; it needs no flag of its own",
}  # fmt: skip


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
    encoder_repetition_penalty: float = 1.0  # the reverse for the prompt's tokens: >1 favours them (stay on topic)
    num_return_sequences: int = 1
    eos_token_id: int | list[int] | None = None  # default: the model's
    bos_token_id: int | None = None  # an empty prompt starts from it (unconditional text; default: the model's)
    pad_token_id: int | None = None  # filler after a sequence ends (default: eos)
    stop_strings: str | list[str] | None = None  # stop once the text ends in one (kept in the output)
    seed: int | None = None  # makes sampling reproducible
    truncate_prompt: bool = False  # drop the oldest prompt tokens instead of failing on overflow
    # beam search (neolm.beam)
    num_beams: int = 1  # > 1: beam search
    length_penalty: float = 1.0  # a finished beam's score is its log-probability / (new tokens ** length_penalty)
    early_stopping: bool | str = False  # True: stop at num_beams finished; False: heuristic; "never": exhaustive
    num_beam_groups: int = 1  # > 1: diverse beam search, num_beams split into this many groups searched in turn
    diversity_penalty: float = 0.0  # diverse beam search: subtracted per time a group before chose the token this step
    # constrained beam search (neolm.constrained): phrases that must appear, each [ids] or a choice [[ids], [ids], ...]
    force_words_ids: list | None = None
    constraints: list | None = None  # the same as objects with token_ids (transformers' Phrasal/DisjunctiveConstraint)
    # more of transformers' logits processors (neolm.sampling.Processors)
    no_repeat_ngram_size: int = 0  # no n-gram of this size may occur twice (prompt included)
    encoder_no_repeat_ngram_size: int = 0  # no n-gram of this size of the prompt may be generated (no copying)
    bad_words_ids: list[list[int]] | None = None  # token sequences that may not be generated
    sequence_bias: dict[tuple[int, ...], float] | list | None = None  # added to a sequence's last token's logit
    suppress_tokens: list[int] | None = None  # never generated
    begin_suppress_tokens: list[int] | None = None  # not generated as the first new token
    forced_eos_token_id: int | list[int] | None = None  # forced as the last token the length allows
    forced_bos_token_id: int | None = None  # forced as the first new token after a one-token prompt (transformers)
    exponential_decay_length_penalty: tuple[int, float] | None = None  # (start, factor): eos likelier after start
    min_p: float | None = None  # sampling: drop tokens below min_p x the likeliest's probability
    top_h: float | None = None  # sampling: the likeliest tokens whose entropy stays within top_h x the whole's
    typical_p: float = 1.0  # sampling: locally typical mass
    epsilon_cutoff: float = 0.0  # sampling: drop tokens below this probability
    eta_cutoff: float = 0.0  # sampling: eta sampling's cutoff
    renormalize_logits: bool = False  # log-softmax the scores after all processing (output_scores, beams' scores)
    remove_invalid_values: bool = False  # nan logits become 0, +-inf the largest floats (a model that overflows)
    max_time: float | None = None  # seconds: sequences end with the first token after this much time
    prefill_chunk_size: int | None = None  # read prompts this many tokens at a time: less memory for long ones
    use_cache: bool = True  # taken for transformers' callers; neolm always decodes with its KV cache (same tokens)
    # transformers' cache and compile settings, taken for its callers: neolm's cache is always "static" (made for
    # each call at the length it needs, the tokens those of "dynamic"), and it compiles nothing per call (its
    # kernels are chosen at load: neolm.load(compile=True)), so these change nothing
    cache_implementation: str | None = None  # None, "dynamic" or "static" (the KV cache's dtype: load's kv_cache_dtype)
    max_cache_len: int | None = None  # transformers: a static cache made this long for later, longer calls
    disable_compile: bool = False
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
    low_memory: bool | None = None  # contrastive search reads its top_k candidates one at a time (a one-row cache)
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
    assistant_early_exit: int | None = None  # the model's first this many layers (and its head) are the assistant
    # an assistant model with another tokenizer (neolm.universal): how many of its last tokens, and of the model's,
    # are encoded again with each round's new text, so that words cut at a round's end join as a tokenizer cuts them
    assistant_lookbehind: int = 10
    target_lookbehind: int = 10
    # speculative sampling with an assistant model of the same tokenizer: its guesses are checked against
    # w * p_model + (1 - w) * q_assistant instead of p_model (None: lossless); more are kept, at a bias toward it
    assistant_ensemble_weight: float | None = None

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    @classmethod
    def from_kwargs(cls, **kwargs) -> GenerationConfig:
        known = cls.field_names()
        unknown = sorted(set(kwargs) - known)
        for name in unknown:
            if name in NOT_TAKEN:
                raise NeolmError(f"generation argument {name} is not taken: {NOT_TAKEN[name]}")
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
        for name in ("repetition_penalty", "encoder_repetition_penalty"):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
                  f"{name} must be a number > 0 (1: off), got {value!r}")  # fmt: skip
        chunk = self.prefill_chunk_size
        check(chunk is None or (isinstance(chunk, int) and chunk >= 1),
              f"prefill_chunk_size must be a number of tokens >= 1 (None: the whole prompt at once), "
              f"got {chunk!r}")  # fmt: skip
        check(isinstance(self.use_cache, bool), f"use_cache must be true or false, got {self.use_cache!r}")
        self._validate_cache(check)
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

    def _validate_cache(self, check) -> None:
        kind = self.cache_implementation
        check(kind not in ("quantized", "offloaded", "offloaded_static"),
              f'cache_implementation="{kind}" is not offered: neolm keeps the KV cache on the model\'s device, in '
              f'the dtype load() was given (neolm.load(..., kv_cache_dtype="int8" or "bfloat16") for a smaller one)')  # fmt: skip
        check(kind in (None, "dynamic", "static"),
              f'cache_implementation must be "dynamic" or "static" (neolm\'s cache is static, with the tokens of a '
              f"dynamic one), got {kind!r}")  # fmt: skip
        length = self.max_cache_len
        check(length is None or (isinstance(length, int) and not isinstance(length, bool) and length >= 1),
              f"max_cache_len must be a number of tokens >= 1, got {length!r}")  # fmt: skip
        check(isinstance(self.disable_compile, bool),
              f"disable_compile must be true or false, got {self.disable_compile!r}")  # fmt: skip

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
        for name in ("no_repeat_ngram_size", "encoder_no_repeat_ngram_size"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 0, f"{name} must be an integer >= 0, got {value!r}")
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
        for name in ("forced_bos_token_id", "bos_token_id"):
            bos = getattr(self, name)
            check(bos is None or (isinstance(bos, int) and not isinstance(bos, bool) and bos >= 0),
                  f"{name} must be a token id (an integer >= 0), got {bos!r}")  # fmt: skip
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
        check(self.low_memory in (None, True, False), f"low_memory must be true or false, got {self.low_memory!r}")
        check(not self.low_memory or self.num_beams == 1, "low_memory (transformers 4's sequential beam search) is "
                                                           "not offered with beams, as in transformers 5")  # fmt: skip
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
        self._validate_groups(check)
        self._validate_constraints(check)
        if self.num_beams == 1:
            return
        check(not self.guided, "classifier-free guidance (guidance_scale) is not offered with beams (num_beams > 1)")
        check(self.num_return_sequences <= self.num_beams,
              f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")  # fmt: skip

    def _validate_groups(self, check) -> None:
        groups, penalty = self.num_beam_groups, self.diversity_penalty
        check(isinstance(groups, int) and groups >= 1, f"num_beam_groups must be an integer >= 1, got {groups!r}")
        check(isinstance(penalty, (int, float)) and math.isfinite(penalty) and penalty >= 0,
              f"diversity_penalty must be a number >= 0, got {penalty!r}")  # fmt: skip
        if groups == 1:
            check(not penalty, "diversity_penalty acts between beam groups: set num_beam_groups > 1 too "
                               "(diverse beam search)")  # fmt: skip
            return
        check(self.num_beams > 1 and self.num_beams % groups == 0,
              f"diverse beam search splits num_beams into num_beam_groups groups of equal size: num_beams must be a "
              f"multiple of {groups} (> 1), got {self.num_beams}")  # fmt: skip
        check(not self.do_sample, "diverse beam search (num_beam_groups > 1) chooses without sampling: set "
                                  "do_sample=False")  # fmt: skip

    def _given_constraints(self) -> list:
        """constraints' (their token_ids where they are objects) then force_words_ids', as given."""
        return [getattr(c, "token_ids", c) for c in self.constraints or []] + list(self.force_words_ids or [])

    def constraint_specs(self) -> list[list]:
        """The constraints of constrained beam search, constraints' then force_words_ids': each a phrase [ids] or
        a choice of phrases [[ids], [ids], ...]."""
        return [[list(p) for p in c] if isinstance(c[0], (list, tuple)) else list(c) for c in self._given_constraints()]

    def _validate_constraints(self, check) -> None:
        if self.force_words_ids is None and self.constraints is None:
            return
        for name in ("force_words_ids", "constraints"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, (list, tuple)) and len(value) > 0),
                  f"{name} must be a non-empty list, got {value!r}")  # fmt: skip
        for spec in self._given_constraints():
            choice = isinstance(spec, (list, tuple)) and len(spec) > 0 and isinstance(spec[0], (list, tuple))
            self._check_ids(check, spec, "each of force_words_ids (and each constraint's token_ids)", choice)
            if choice:
                check(not any(a != b and tuple(b[: len(a)]) == tuple(a) for a in spec for b in spec)
                      and len({tuple(p) for p in spec}) == len(spec),
                      f"a choice of phrases may not hold one that begins another (or twice): {spec!r}")  # fmt: skip
        check(self.num_beams > 1, "constrained beam search (force_words_ids, constraints) needs num_beams > 1")
        check(not self.do_sample, "constrained beam search (force_words_ids, constraints) chooses without sampling: "
                                  "set do_sample=False")  # fmt: skip
        check(self.num_beam_groups == 1, "constrained beam search and diverse beam search (num_beam_groups) do not "
                                         "go together")  # fmt: skip
        check(not self.stop_strings and not self.stopping_criteria,
              "constrained beam search (force_words_ids, constraints) ends at eos, the length limit or max_time: "
              "stop_strings and stopping_criteria are not offered with it")  # fmt: skip

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
        exit_ = self.assistant_early_exit
        check(exit_ is None or (isinstance(exit_, int) and not isinstance(exit_, bool) and exit_ >= 1),
              f"assistant_early_exit must be a number of layers >= 1, got {exit_!r}")  # fmt: skip
        check(exit_ is None or self.prompt_lookup_num_tokens is None,
              "assistant_early_exit and prompt_lookup_num_tokens are two ways of guessing: give one")  # fmt: skip
        for name in ("assistant_lookbehind", "target_lookbehind"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                  f"{name} must be a number of tokens >= 0, got {value!r}")  # fmt: skip
        weight = self.assistant_ensemble_weight
        check(weight is None or (isinstance(weight, (int, float)) and 0 < weight < 1),
              f"assistant_ensemble_weight must be in (0, 1) (None: off, lossless), got {weight!r}")  # fmt: skip
        check(weight is None or self.prompt_lookup_num_tokens is None,
              "assistant_ensemble_weight mixes an assistant model's probabilities into the check: prompt lookup "
              "has none")  # fmt: skip

    @property
    def assisted(self) -> bool:
        """Assisted generation without an assistant model: prompt lookup or an early exit of the model."""
        return self.prompt_lookup_num_tokens is not None or self.assistant_early_exit is not None

    def check_vocab(self, vocab: int) -> None:
        """Raise NeolmError when a processor names a token outside a vocabulary of this size."""
        named = {"bad_words_ids": [t for w in self.bad_words_ids or [] for t in w],
                 "sequence_bias": [t for seq in self.sequence_bias or {} for t in seq],
                 "suppress_tokens": self.suppress_tokens or [], "begin_suppress_tokens": self.begin_suppress_tokens or [],
                 "forced_eos_token_id": [self.forced_eos_token_id] if isinstance(self.forced_eos_token_id, int)
                 else self.forced_eos_token_id or [],
                 "forced_bos_token_id": [] if self.forced_bos_token_id is None else [self.forced_bos_token_id],
                 "negative_prompt_ids": [t for x in self.negative_prompt_ids or [] for t in (x if isinstance(x, list)
                                                                                             else [x])],
                 "force_words_ids / constraints": [
                     t for spec in self.constraint_specs() for phrase in (spec if isinstance(spec[0], list) else [spec])
                     for t in phrase]}  # fmt: skip
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
        if not prompt:  # transformers' generate() without inputs: from bos, as a document starts
            if gc.bos_token_id is None:
                raise NeolmError("empty prompt: give at least one token, or bos_token_id to start from (for "
                                 "unconditional text, <|endoftext|>)")  # fmt: skip
            prompt = [gc.bos_token_id]
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

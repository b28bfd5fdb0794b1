"""Speculative decoding in the server (`neolm serve --speculative-config`), configured as vLLM's --speculative-config:

    {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, "prompt_lookup_min": 1}
    {"method": "draft_model", "model": "EleutherAI/pythia-70m", "num_speculative_tokens": 4}

"ngram" guesses from the sequence itself (prompt lookup: what followed the last n-gram's first earlier occurrence, of
prompt_lookup_max down to prompt_lookup_min tokens); "draft_model" (the method may be left out when a model is given)
from a smaller model, greedy or sampled as the request is, num_speculative_tokens at a time (a draft with another
tokenizer guesses through text: neolm.universal). The model checks the guesses in one forward (neolm.speculative).

Rounds run while one sequence decodes alone (DecodeBatch.steps), where decoding is bound by reading the weights and
a guess kept is a step saved; a batch of several decodes a token per step as without speculation (vLLM's
disable_by_batch_size at 2). Greedy requests get their greedy tokens, sampled ones draws from their distribution;
seeded sampling never speculates, so that a seed gives what it gives without. Rounds run while they pay: a
sequence's rounds and plain steps are timed per token made, and while rounds cost more, it steps, with a round every
PROBE_EVERY steps to look again (_Paced; the rule of dynamic speculation lengths), so that a small model or text the
guesses miss decodes at about plain speed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from neolm.errors import NeolmError
from neolm.generation_config import GenerationConfig
from neolm.speculative import Assistant, Picker, PromptLookup

log = logging.getLogger(__name__)

METHODS = ("ngram", "draft_model")
KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")
DECAY = 0.8  # _Paced: the weight of a round's or step's time in its sum, a measurement later
PROBE_EVERY = 8  # steps, at most, between two rounds while rounds cost more than steps (_Paced)
DEFAULT_LOOKUP_MAX = 5  # the longest n-gram looked up when prompt_lookup_max is not given


@dataclass(frozen=True)
class Speculation:
    method: str  # "ngram" or "draft_model"
    num_speculative_tokens: int  # guesses per round at most
    model: str | None = None  # draft_model: a path or hub id
    prompt_lookup_max: int = DEFAULT_LOOKUP_MAX  # ngram: the n-gram sizes matched
    prompt_lookup_min: int = 1

    @classmethod
    def parse(cls, text: str) -> Speculation:
        """vLLM's --speculative-config JSON; NeolmError says what is wrong with it."""
        try:
            given = json.loads(text)
        except json.JSONDecodeError as e:
            raise NeolmError(f"--speculative-config is not JSON ({e.msg}): {text!r}") from None
        if not isinstance(given, dict):
            raise NeolmError(f"--speculative-config must be a JSON object, got {text!r}")
        unknown = sorted(set(given) - set(KEYS))
        if unknown:
            raise NeolmError(f"--speculative-config: keys not supported: {', '.join(unknown)} (supported: "
                             f"{', '.join(KEYS)})")  # fmt: skip
        method = given.get("method", "draft_model" if given.get("model") is not None else None)
        if method not in METHODS:
            raise NeolmError(f"--speculative-config: method must be one of {', '.join(METHODS)} (or a model given), "
                             f"got {method!r}")  # fmt: skip
        for key in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = given.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise NeolmError(f"--speculative-config: {key} must be an integer >= 1, got {value!r}")
        if given.get("num_speculative_tokens") is None:
            raise NeolmError("--speculative-config: num_speculative_tokens (guesses per round) is required")
        model = given.get("model")
        if method == "draft_model" and (not isinstance(model, str) or not model.strip()):
            raise NeolmError('--speculative-config: draft_model needs "model": a path or hub id')
        if method == "ngram" and model is not None:
            raise NeolmError("--speculative-config: ngram guesses from the sequence itself: it takes no model")
        lookup = [k for k in ("prompt_lookup_max", "prompt_lookup_min") if k in given]
        if lookup and method != "ngram":
            raise NeolmError(f"--speculative-config: {lookup[0]} is for the ngram method")
        top = given.get("prompt_lookup_max", max(DEFAULT_LOOKUP_MAX, given.get("prompt_lookup_min", 1)))
        low = given.get("prompt_lookup_min", 1)
        if low > top:
            raise NeolmError(f"--speculative-config: prompt_lookup_min ({low}) must be <= prompt_lookup_max ({top})")
        return cls(method, given["num_speculative_tokens"], model, top, low)

    def describe(self) -> str:
        if self.method == "ngram":
            return (f"ngram (prompt lookup of {self.prompt_lookup_max} down to {self.prompt_lookup_min} tokens), "
                    f"{self.num_speculative_tokens} guesses a round")  # fmt: skip
        return f"draft model {self.model}, {self.num_speculative_tokens} guesses a round"


def guesser(spec: Speculation, lm, draft=None, paced: bool = True) -> Callable[[GenerationConfig, Picker, int], object]:
    """DecodeBatch's guesser(gc, picker, max_len) for `lm` (a neolm.LanguageModel): a sequence's guesser of
    neolm.speculative. draft: the draft model (a LanguageModel) of the draft_model method. paced: rounds only
    while they pay (_Paced); else a round whenever there are guesses."""
    k = spec.num_speculative_tokens
    if spec.method == "ngram":
        return lambda gc, picker, max_len: _Paced(PromptLookup(k, spec.prompt_lookup_max, spec.prompt_lookup_min),
                                                  paced=paced)  # fmt: skip
    if draft is None:
        raise NeolmError("the draft_model method needs its draft model")

    def settings(gc: GenerationConfig) -> GenerationConfig:  # k guesses a round, without a confidence threshold
        return dataclasses.replace(gc, num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
                                   assistant_confidence_threshold=None)  # fmt: skip

    if lm.tokenizer.same_vocabulary(draft.tokenizer):
        if draft.config.n_positions < lm.config.n_positions:
            log.warning("the draft model's context (%d tokens) is shorter than the model's (%d): sequences longer "
                        "than it decode without guesses", draft.config.n_positions, lm.config.n_positions)  # fmt: skip
        context = draft.config.n_positions
        return lambda gc, picker, max_len: _Paced(Assistant(draft.model, settings(gc), picker, min(max_len, context)),
                                                  min(max_len, context), paced)  # fmt: skip
    from neolm.universal import TextGuesser, Universal

    log.info("the draft model has another tokenizer than the model: its guesses are carried over as text")
    universal = Universal(draft.model, draft.tokenizer, lm.tokenizer)
    return lambda gc, picker, max_len: _Paced(TextGuesser(universal, settings(gc), picker.processors.eos_ids,
                                                          lm.config.vocab_size, max_len, picker),
                                              paced=paced)  # fmt: skip


class _Paced:
    """A sequence's guesser that guesses only while rounds pay: it times each round and each plain step (from one
    guess() call to the next: the guessing, the forward, the checks and the engine's sending alike) per token
    made, in sums that decay by DECAY a measurement, and guesses while a round's tokens cost no more than a step's.
    When they cost more (a small model, whose steps are not bound by reading its weights; text the guesses miss),
    rounds wait, and one runs every PROBE_EVERY steps to see whether they pay again. The first round is not timed
    (a draft reads the prompt in it), and a step is timed once rounds have been. It guesses nothing past `context`
    tokens (a draft model's)."""

    def __init__(self, inner, context: int | None = None, paced: bool = True,
                 clock: Callable[[], float] = time.perf_counter):  # fmt: skip
        self.inner, self.context, self.paced, self.clock = inner, context, paced, clock
        self.sums = {True: [0.0, 0.0], False: [0.0, 0.0]}  # round?: decayed [seconds, tokens]
        self.rounds = 0  # rounds run
        self.waited = 0  # steps since the last round
        self.last: tuple[float, int, int] | None = None  # the last call's (time, tokens so far, guesses)

    def guess(self, seq: list[int], limit: int):
        now = self.clock()
        if self.last is not None:
            began, length, guessed = self.last
            made = len(seq) - length  # (more than the call could make: other sequences ran between, not timed)
            if 0 < made <= guessed + 1 and (not guessed or self.rounds > 1):
                spent = self.sums[bool(guessed)]
                spent[0], spent[1] = spent[0] * DECAY + now - began, spent[1] * DECAY + made
        if self.context is not None:
            limit = min(limit, self.context - len(seq))
        guesses, q = self.inner.guess(seq, limit) if limit >= 1 and self._pays() else ([], None)
        self.rounds, self.waited = (self.rounds + 1, 0) if guesses else (self.rounds, self.waited + 1)
        self.last = (now, len(seq), len(guesses))
        return guesses, q

    def _pays(self) -> bool:
        (round_s, round_n), (step_s, step_n) = self.sums[True], self.sums[False]
        if not self.paced or not round_n or self.waited >= PROBE_EVERY:
            return True  # not timed yet, or a probe
        if not step_n:
            return False  # time a step once
        return round_s / round_n <= step_s / step_n

    def update(self, kept: int, guessed: int) -> None:
        self.inner.update(kept, guessed)

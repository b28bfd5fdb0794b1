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
seeded sampling never speculates, so that a seed gives what it gives without.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

from neolm.errors import NeolmError
from neolm.generation_config import GenerationConfig
from neolm.speculative import Assistant, Picker, PromptLookup

log = logging.getLogger(__name__)

METHODS = ("ngram", "draft_model")
KEYS = ("method", "model", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min")
DEFAULT_LOOKUP_MAX = 5  # n-gram sizes looked up, longest first (vLLM's default when neither bound is given)


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


def guesser(spec: Speculation, lm, draft=None) -> Callable[[GenerationConfig, Picker, int], object]:
    """DecodeBatch's guesser(gc, picker, max_len) for `lm` (a neolm.LanguageModel): a sequence's guesser of
    neolm.speculative. draft: the draft model (a LanguageModel) of the draft_model method."""
    k = spec.num_speculative_tokens
    if spec.method == "ngram":
        return lambda gc, picker, max_len: PromptLookup(k, spec.prompt_lookup_max, spec.prompt_lookup_min)
    if draft is None:
        raise NeolmError("the draft_model method needs its draft model")

    def settings(gc: GenerationConfig) -> GenerationConfig:  # k guesses a round, without a confidence threshold
        return dataclasses.replace(gc, num_assistant_tokens=k, num_assistant_tokens_schedule="constant",
                                   assistant_confidence_threshold=None)  # fmt: skip

    if lm.tokenizer.same_vocabulary(draft.tokenizer):
        if draft.config.n_positions < lm.config.n_positions:
            log.warning("the draft model's context (%d tokens) is shorter than the model's (%d): sequences longer "
                        "than it decode without guesses", draft.config.n_positions, lm.config.n_positions)  # fmt: skip
        return lambda gc, picker, max_len: _DraftGuesser(Assistant(draft.model, settings(gc), picker, min(
            max_len, draft.config.n_positions)))  # fmt: skip
    from neolm.universal import TextGuesser, Universal

    log.info("the draft model has another tokenizer than the model: its guesses are carried over as text")
    universal = Universal(draft.model, draft.tokenizer, lm.tokenizer)
    return lambda gc, picker, max_len: TextGuesser(universal, settings(gc), picker.processors.eos_ids,
                                                   lm.config.vocab_size, max_len, picker)  # fmt: skip


class _DraftGuesser:
    """An Assistant that stops guessing once the sequence outgrows the draft model's cache (its context)."""

    def __init__(self, assistant: Assistant):
        self.assistant = assistant

    def guess(self, seq: list[int], limit: int):
        room = self.assistant.cache.max_len - len(seq)
        if room < 1:
            return [], None
        return self.assistant.guess(seq, min(limit, room))

    def update(self, kept: int, guessed: int) -> None:
        self.assistant.update(kept, guessed)

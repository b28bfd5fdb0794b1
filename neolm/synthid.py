"""SynthID Text watermarking (Dathathri et al. 2024, "Scalable watermarking for identifying large language model
outputs"), as transformers' SynthIDTextWatermarkingConfig and SynthIDTextWatermarkLogitsProcessor.

Each step, every candidate token gets `depth` (one per key) pseudorandom bits, its g-values: a hash of the last
ngram_len - 1 tokens, the candidate and the key, looked up in a table of sampling_table_size random bits. The
probabilities then go through `depth` rounds of a tournament, p <- p (1 + g - E_p[g]), which moves probability
towards tokens whose g-values are 1 without changing what the model would write on average. A text's g-values are
so higher than the 0.5 of chance; whoever holds the keys measures them (`detect`: their mean and a z-score).

As transformers: the context is the tokens generated so far (the prompt's are not read; before ngram_len - 1 have
been generated, zeros stand in for them); a context met before in this sequence (the last context_history_size)
leaves the scores as they are; with skip_first_ngram_calls, the first ngram_len - 1 steps are not watermarked.
Each row's state is a function of its own generated tokens, so a sequence is watermarked as it would be alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from neolm.errors import NeolmError

MULTIPLIER, INCREMENT = 6364136223846793005, 1  # transformers' linear congruential hash (newlib / musl)


@dataclass(frozen=True)
class SynthIDConfig:
    """transformers' SynthIDTextWatermarkingConfig (its defaults). The keys are the secret: whoever holds them
    detects the watermark."""

    ngram_len: int
    keys: tuple[int, ...]
    context_history_size: int = 1024
    sampling_table_seed: int = 0
    sampling_table_size: int = 2**16
    skip_first_ngram_calls: bool = False
    debug_mode: bool = False  # scores replaced by ones first (transformers' testing aid)

    @classmethod
    def of(cls, value) -> SynthIDConfig:
        """A config from this class, a dict of its fields, or anything with to_dict() (transformers' config)."""
        if isinstance(value, cls):
            return value.checked()
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        if not isinstance(value, dict):
            raise NeolmError(f"a SynthID watermarking_config must be a SynthIDConfig or a dict, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in value.items() if k != "watermarking_type"}  # (transformers' to_dict adds it)
        unknown = sorted(set(fields) - known)
        if unknown:
            raise NeolmError(f"unknown SynthID watermarking_config field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known))}")  # fmt: skip
        if "keys" in fields and isinstance(fields["keys"], (list, tuple)):
            fields["keys"] = tuple(fields["keys"])
        try:
            return cls(**fields).checked()
        except TypeError as e:  # a required field missing
            raise NeolmError(f"a SynthID watermarking_config needs ngram_len and keys: {e}") from None

    def checked(self) -> SynthIDConfig:
        problems = [
            (isinstance(self.ngram_len, int) and self.ngram_len >= 2, f"ngram_len must be an integer >= 2, got {self.ngram_len!r}"),
            (isinstance(self.keys, tuple) and len(self.keys) > 0 and all(isinstance(k, int) for k in self.keys),
             f"keys must be a non-empty list of integers, got {self.keys!r}"),
            (isinstance(self.sampling_table_size, int) and 0 < self.sampling_table_size <= 2**24,
             f"sampling_table_size must be in 1 .. 2**24, got {self.sampling_table_size!r}"),
            (isinstance(self.context_history_size, int) and self.context_history_size >= 1,
             f"context_history_size must be an integer >= 1, got {self.context_history_size!r}"),
        ]  # fmt: skip
        for ok, message in problems:
            if not ok:
                raise NeolmError(f"watermarking_config: {message}")
        return self


def _hash(state: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """transformers' accumulate_hash: for each x of data's last axis, state = (state + x) * MULTIPLIER + 1, in
    int64 arithmetic that wraps."""
    for i in range(data.shape[-1]):
        state = (state + data[..., i]) * MULTIPLIER + INCREMENT
    return state


def int64(x: int) -> int:
    """x wrapped to a signed 64-bit integer, as torch's int64 arithmetic wraps it (transformers' hashes)."""
    x &= (1 << 64) - 1
    return x - (1 << 64) if x >= 1 << 63 else x


class SynthID:
    """The watermark of one config over a vocabulary of `vocab` tokens."""

    def __init__(self, config: SynthIDConfig, vocab: int, device=None):
        self.config, self.vocab = config, vocab
        generator = torch.Generator(device=device or "cpu").manual_seed(config.sampling_table_seed)
        self.table = torch.randint(0, 2, (config.sampling_table_size,), generator=generator, device=device)
        self.keys = torch.tensor(config.keys, device=device)

    def context(self, generated: Sequence[int]) -> list[int]:
        """The ngram_len - 1 tokens a step after `generated` hashes (zeros before enough are generated)."""
        width = self.config.ngram_len - 1
        return ([0] * width + list(generated))[-width:] if width else []

    def context_hash(self, context: Sequence[int]) -> int:
        """_hash from 1 over the context, in Python integers (each step hashes every earlier context again)."""
        state = 1
        for x in context:
            state = int64((state + x) * MULTIPLIER + INCREMENT)
        return state

    def g_values(self, context_hash: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """(..., depth) bits of each token after a context of that hash (broadcast together)."""
        state = _hash(context_hash, tokens[..., None])  # the candidate
        state = _hash(state[..., None], self.keys[:, None])  # then each key: (..., depth)
        return self.table[state % self.config.sampling_table_size]

    def repeated(self, generated: Sequence[int]) -> bool:
        """Whether the step after `generated` meets a context it met before (and so leaves the scores be)."""
        c = self.config
        first = c.ngram_len - 1 if c.skip_first_ngram_calls else 0  # the steps that hashed their context
        if len(generated) < first:
            return False
        earlier = [self.context_hash(self.context(generated[:k])) for k in range(first, len(generated))]
        return self.context_hash(self.context(generated)) in earlier[-c.context_history_size :]

    def apply(self, tokens: Sequence[Sequence[int]], new: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Scores (N, V) after the tournament, each row's from its generated tokens (the last new[row] of its
        tokens): log-probabilities (transformers' update_scores), or the scores as they were for a repeated
        context or a skipped first step."""
        c = self.config
        if c.debug_mode:
            scores = torch.ones_like(scores)
        out = scores.clone()
        candidates = torch.arange(scores.shape[1], device=scores.device)
        for row, held in enumerate(tokens):
            generated = held[len(held) - int(new[row]) :] if int(new[row]) else []
            if (c.skip_first_ngram_calls and len(generated) + 1 < c.ngram_len) or self.repeated(generated):
                continue
            state = torch.tensor(self.context_hash(self.context(generated)), device=scores.device)
            g = self.g_values(state, candidates).to(scores.dtype)  # (V, depth)
            probs = torch.softmax(scores[row], dim=-1)
            for depth in range(g.shape[1]):
                probs = probs * (1 + g[:, depth] - (g[:, depth] * probs).sum())
            logp = torch.log(probs)
            out[row] = torch.where(torch.isfinite(logp), logp, torch.finfo(logp.dtype).min)
        return out


@dataclass
class SynthIDDetection:
    """A text's mean g-value (0.5 without the watermark) over the n-grams scored, and how far above chance."""

    num_tokens_scored: int  # n-grams scored (each gives `depth` g-values)
    mean_g_value: float
    z_score: float  # (mean - 0.5) / its standard deviation without the watermark
    p_value: float
    prediction: bool  # z_score > z_threshold


def detect(synthid: SynthID, tokens: Sequence[int], eos_token_id: int | None = None, z_threshold: float = 3.0,
           ignore_repeated_ngrams: bool = True) -> SynthIDDetection:  # fmt: skip
    """Score `tokens` (the text to test, best without its prompt): each token after the first ngram_len - 1 by
    its g-values after the ones before it, as transformers' compute_g_values; n-grams from the first eos on are
    not scored, and with ignore_repeated_ngrams (transformers' context repetition mask) neither are those whose
    context came earlier in the text. The mean of those bits is a z-score's worth above 0.5 in watermarked text."""
    n = synthid.config.ngram_len
    tokens = list(tokens)
    if eos_token_id is not None and eos_token_id in tokens:
        tokens = tokens[: tokens.index(eos_token_id)]
    if len(tokens) < n:
        raise NeolmError(f"detection needs at least ngram_len ({n}) tokens, got {len(tokens)}")
    seen: list[int] = []
    bits = []
    for i in range(n - 1, len(tokens)):
        context = synthid.context_hash(tokens[i - n + 1 : i])
        repeated = context in seen[-synthid.config.context_history_size :]
        seen.append(context)
        if ignore_repeated_ngrams and repeated:
            continue
        bits.append(synthid.g_values(torch.tensor(context), torch.tensor(tokens[i])))
    if not bits:
        raise NeolmError("every n-gram of the text repeats an earlier one: nothing to score")
    g = torch.stack(bits).float()  # (scored, depth)
    mean = float(g.mean())
    z = (mean - 0.5) / math.sqrt(0.25 / g.numel())
    p = 0.5 * math.erfc(z / math.sqrt(2))
    return SynthIDDetection(len(bits), mean, z, p, z > z_threshold)

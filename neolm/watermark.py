"""Text watermarks (Kirchenbauer et al. 2023, "A Watermark for Large Language Models" and "On the Reliability of
Watermarks"), as transformers' WatermarkingConfig, WatermarkLogitsProcessor and WatermarkDetector.

Each step, a "green list" of greenlist_ratio of the vocabulary is drawn from a seed that hashes the last
context_width tokens with a secret hashing_key, and `bias` is added to the green tokens' scores. Text written so
holds more green tokens than chance; anyone with the key counts them, and a z-score over the tokens scored tells
watermarked text from ordinary text, without the model. seeding_scheme "lefthash" seeds from the previous token;
"selfhash" from the context and the candidate token itself (the likeliest 40 candidates are checked each step:
slower, and more robust to edits). The green lists are torch.randperm draws of a CPU generator with transformers'
seeds, so text watermarked by either library is detected by both.

SynthID Text, transformers' other watermark, is neolm.synthid; `settings` and `parse_settings` take either kind's
config and `marker` makes the processor for it.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from neolm.config import Config
from neolm.errors import NeolmError
from neolm.synthid import SynthID, SynthIDConfig, SynthIDDetection, int64
from neolm.synthid import detect as detect_synthid

TABLE_SIZE = 1_000_003  # selfhash's fixed permutation table (a prime)
SELFHASH_CANDIDATES = 40  # selfhash: the likeliest tokens whose own green lists are checked each step


@dataclass(frozen=True)
class WatermarkingConfig:
    """transformers' WatermarkingConfig (its defaults). Use another hashing_key than the default for a private
    watermark: whoever knows the key can detect (and imitate) it."""

    greenlist_ratio: float = 0.25
    bias: float = 2.0
    hashing_key: int = 15485863
    seeding_scheme: str = "lefthash"  # or "selfhash"
    context_width: int = 1

    @classmethod
    def of(cls, value) -> WatermarkingConfig:
        """A config from this class, a dict of its fields, or anything with to_dict() (transformers' config)."""
        if isinstance(value, cls):
            return value.checked()
        if hasattr(value, "to_dict"):
            value = value.to_dict()
        if not isinstance(value, dict):
            raise NeolmError(f"watermarking_config must be a WatermarkingConfig or a dict of its fields, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise NeolmError(f"unknown watermarking_config field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(known))}")  # fmt: skip
        return cls(**value).checked()

    @classmethod
    def parse(cls, spec: str) -> WatermarkingConfig:
        """From the command line's "key=value,..." ("" for the defaults), e.g. "bias=2.5,hashing_key=42"."""
        return cls(**_fields(spec, {f.name: type(getattr(cls(), f.name)) for f in dataclasses.fields(cls)})).checked()

    def checked(self) -> WatermarkingConfig:
        problems = [
            (0 < self.greenlist_ratio < 1, f"greenlist_ratio must be in (0, 1), got {self.greenlist_ratio}"),
            (self.seeding_scheme in ("lefthash", "selfhash"),
             f'seeding_scheme must be "lefthash" or "selfhash", got {self.seeding_scheme!r}'),
            (isinstance(self.context_width, int) and self.context_width >= 1,
             f"context_width must be an integer >= 1, got {self.context_width!r}"),
            (isinstance(self.hashing_key, int) and self.hashing_key > 0,
             f"hashing_key must be an integer > 0, got {self.hashing_key!r}"),
            (isinstance(self.bias, (int, float)) and math.isfinite(self.bias), f"bias must be a number, got {self.bias!r}"),
        ]  # fmt: skip
        for ok, message in problems:
            if not ok:
                raise NeolmError(f"watermarking_config: {message}")
        return self


SYNTHID_TYPES = {"ngram_len": int, "keys": lambda text: tuple(int(k) for k in text.replace(":", " ").split()),
                 "context_history_size": int, "sampling_table_seed": int, "sampling_table_size": int,
                 "skip_first_ngram_calls": lambda text: {"true": True, "false": False}[text.lower()]}  # fmt: skip


def _fields(spec: str, types: dict) -> dict:
    """The command line's "key=value,..." as fields of `types` (name -> a parser of the value's text)."""
    fields = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in types:
            raise NeolmError(f"watermark setting {item!r}: write key=value with a key among {', '.join(types)}")
        try:
            fields[key] = types[key](value.strip())
        except (ValueError, KeyError):
            kind = getattr(types[key], "__name__", "value of its kind")
            raise NeolmError(f"watermark setting {item!r}: {key} must be a {kind}") from None
    return fields


def settings(value) -> WatermarkingConfig | SynthIDConfig:
    """GenerationConfig.watermarking_config as given: either kind's config, its dict (SynthID's has "keys"), or
    transformers' WatermarkingConfig or SynthIDTextWatermarkingConfig."""
    if isinstance(value, (WatermarkingConfig, SynthIDConfig)):
        return value.checked()
    fields = value.to_dict() if hasattr(value, "to_dict") else value
    if isinstance(fields, dict) and ("keys" in fields or fields.get("watermarking_type") == "synthid"):
        return SynthIDConfig.of(fields)
    return WatermarkingConfig.of(fields)


def parse_settings(spec: str) -> WatermarkingConfig | SynthIDConfig:
    """From the command line: the green-list watermark's "key=value,..." (WatermarkingConfig.parse), or SynthID's
    when it gives keys ("ngram_len=5,keys=654:400:836:123"; keys separated by ":" or spaces)."""
    if "keys" in {item.partition("=")[0].strip() for item in spec.split(",")}:
        return SynthIDConfig.of(_fields(spec, SYNTHID_TYPES))
    return WatermarkingConfig.parse(spec)


def marker(config: WatermarkingConfig | SynthIDConfig, vocab: int, device=None):
    """The processor of a watermark config: apply(tokens, new, scores) -> scores."""
    return SynthID(config, vocab, device) if isinstance(config, SynthIDConfig) else Watermark(config, vocab)


class Watermark:
    """The green lists of one config over a vocabulary of `vocab` tokens (the model's)."""

    def __init__(self, config: WatermarkingConfig, vocab: int):
        self.config, self.vocab = config, vocab
        self.size = int(vocab * config.greenlist_ratio)
        self.rng = torch.Generator()
        self.table = None
        if config.seeding_scheme == "selfhash":
            self.rng.manual_seed(config.hashing_key)
            self.table = torch.randperm(TABLE_SIZE, generator=self.rng)
        self.is_green = lru_cache(maxsize=4096)(self._is_green)  # detection scores each n-gram once

    def _seed(self, context: Sequence[int]) -> int:
        """The seed of the green list after `context` (its last context_width tokens; selfhash: the candidate
        token included)."""
        key, context = self.config.hashing_key, list(context[-self.config.context_width :])
        if self.table is None:  # lefthash
            return key * context[-1]
        last = int(self.table[context[-1] % TABLE_SIZE]) + 1
        return min(int64(key * (int(self.table[t % TABLE_SIZE]) + 1) * last) for t in context)

    def green(self, context: Sequence[int]) -> torch.Tensor:
        """The green token ids (greenlist_ratio x vocab) after `context`."""
        self.rng.manual_seed(self._seed(context) % (2**64 - 1))
        return torch.randperm(self.vocab, generator=self.rng)[: self.size]

    def _is_green(self, context: tuple[int, ...], token: int) -> bool:
        """Whether `token` is green after `context` (selfhash: the context ends in the token itself)."""
        return bool((self.green(context) == token).any())

    def apply(self, tokens: Sequence[Sequence[int]], new, scores: torch.Tensor) -> torch.Tensor:
        """The processor's step (as SynthID.apply): the green lists' bias."""
        return self.bias(tokens, scores)

    def bias(self, tokens: Sequence[Sequence[int]], scores: torch.Tensor) -> torch.Tensor:
        """Scores (N, V) with `bias` added at each row's green tokens; rows hold fewer than context_width tokens
        are left as they are (transformers: when any row does, since its rows are of one length)."""
        out = scores.clone()
        width = self.config.context_width
        for row, held in enumerate(tokens):
            if len(held) < width:
                continue
            if self.table is None:
                green = self.green(held)
            else:  # selfhash: the likeliest candidates that are green in their own lists
                order = torch.sort(scores[row], descending=True).indices[:SELFHASH_CANDIDATES].tolist()
                green = [t for t in order if self._is_green((*held[-width:], t), t)]
            out[row, torch.as_tensor(green, dtype=torch.long, device=scores.device)] += self.config.bias
        return out


@dataclass
class Detection:
    """transformers' WatermarkDetectorOutput for one text."""

    num_tokens_scored: int
    num_green_tokens: int
    green_fraction: float
    z_score: float
    p_value: float  # of this many green tokens or more in text without the watermark
    prediction: bool  # z_score > z_threshold
    confidence: float  # 1 - p_value


def detect(
    watermark: Watermark, tokens: Sequence[int], z_threshold: float = 3.0, ignore_repeated_ngrams: bool = False
) -> Detection:
    """Count the green tokens of `tokens` (the text to test, best without its prompt): each token after the first
    context_width is scored against the green list of the ones before it. ignore_repeated_ngrams: count each
    distinct (context, token) once, so that repeated phrases do not sway the test."""
    width = watermark.config.context_width
    selfhash = watermark.table is not None
    if len(tokens) - width < 1:
        raise NeolmError(f"detection needs at least {width + 1} tokens (context_width {width} + 1), got {len(tokens)}")
    n = width + 1 - selfhash  # the tokens of one n-gram: the context and the token scored
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    green = {g: watermark.is_green(g if selfhash else g[:-1], g[-1]) for g in grams}
    if ignore_repeated_ngrams:
        scored, hits = len(grams), sum(green.values())
    else:
        scored, hits = sum(grams.values()), sum(count for g, count in grams.items() if green[g])
    ratio = watermark.config.greenlist_ratio
    z = (hits - ratio * scored) / math.sqrt(scored * ratio * (1 - ratio))
    p = 0.5 * math.erfc(z / math.sqrt(2))
    return Detection(scored, hits, hits / scored, z, p, z > z_threshold, 1 - p)


def detect_tokens(tokens: Sequence[int], watermarking_config, config: Config, z_threshold: float = 3.0,
                  ignore_repeated_ngrams: bool | None = None) -> Detection | SynthIDDetection:  # fmt: skip
    """detect() for a model's config (its vocabulary size; a leading bos token is dropped, as transformers'
    detector does) with watermarking_config as GenerationConfig takes it (None: the default config); for a
    SynthID config, neolm.synthid.detect (ignore_repeated_ngrams default: True there, False here)."""
    chosen = settings(watermarking_config if watermarking_config is not None else {})
    tokens = list(tokens)
    if tokens and tokens[0] == config.bos_token_id:
        tokens = tokens[1:]
    if isinstance(chosen, SynthIDConfig):
        return detect_synthid(SynthID(chosen, config.vocab_size), tokens, config.eos_token_id, z_threshold,
                              ignore_repeated_ngrams is not False)  # fmt: skip
    return detect(Watermark(chosen, config.vocab_size), tokens, z_threshold, bool(ignore_repeated_ngrams))

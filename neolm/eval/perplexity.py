"""Rolling-window perplexity of documents, with lm-evaluation-harness's windowing and metrics.

A document's tokens are cut into disjoint chunks of at most `max_len` predicted tokens: the first
chunk is conditioned on the end-of-text token, each later chunk on the tokens before it (the input
window is the max_len tokens ending just before its last target). From the summed log-likelihood:
token perplexity, word perplexity (words = whitespace-separated pieces), byte perplexity and bits per
byte, as the harness's wikitext task reports them. Scoring runs on neolm.eval.scoring.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

from neolm.eval.scoring import loglikelihoods
from neolm.model import GPT


def rolling_windows(tokens: list[int], prefix: int, max_len: int) -> Iterator[tuple[list[int], int]]:
    """(input window, number of trailing positions to score) covering every token exactly once."""
    if not tokens:
        return
    first = min(max_len, len(tokens))
    yield [prefix] + tokens[: first - 1], first
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_len)
        end = done + n
        yield tokens[max(end - max_len - 1, 0) : end - 1], n
        done = end


def rolling_requests(tokens: list[int], prefix: int, max_len: int) -> list[tuple[list[int], list[int]]]:
    """The windows as (context, continuation) requests: the harness's `make_disjoint_window` pairs."""
    out, done = [], 0
    for window, n in rolling_windows(tokens, prefix, max_len):
        whole = window + [tokens[done + n - 1]]
        out.append((whole[: len(whole) - n], tokens[done : done + n]))
        done += n
    return out


@dataclass
class Perplexity:
    loglikelihood: float  # summed over all tokens (nats)
    tokens: int
    words: int
    bytes: int
    seconds: float

    @property
    def token_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.tokens)

    @property
    def word_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.words)

    @property
    def byte_perplexity(self) -> float:
        return math.exp(-self.loglikelihood / self.bytes)

    @property
    def bits_per_byte(self) -> float:
        return -self.loglikelihood / self.bytes / math.log(2)

    def as_dict(self) -> dict:
        return {
            "token_perplexity": self.token_perplexity, "word_perplexity": self.word_perplexity,
            "byte_perplexity": self.byte_perplexity, "bits_per_byte": self.bits_per_byte,
            "tokens": self.tokens, "words": self.words, "bytes": self.bytes,
            "tokens_per_second": self.tokens / max(self.seconds, 1e-9),
        }  # fmt: skip


def count_words(text: str) -> int:
    return len(re.split(r"\s+", text))


def perplexity(model: GPT, encode, texts: list[str], prefix: int, max_len: int | None = None,
               batch_size: int = 8, progress=None) -> Perplexity:  # fmt: skip
    """Rolling perplexity of `texts` (each a document) under `model`; `encode` maps text to token ids.

    progress, if given, is called with the number of tokens scored by each batch.
    """
    max_len = max_len or model.config.n_positions
    start = time.perf_counter()
    requests = [r for text in texts for r in rolling_requests(encode(text), prefix, max_len)]
    results = loglikelihoods(model, requests, max_len, batch_size,
                             progress=(lambda _, tokens: progress(tokens)) if progress else None)  # fmt: skip
    return Perplexity(
        loglikelihood=sum(logprob for logprob, _ in results),
        tokens=sum(len(cont) for _, cont in requests),
        words=sum(count_words(t) for t in texts),
        bytes=sum(len(t.encode("utf-8")) for t in texts),
        seconds=time.perf_counter() - start,
    )

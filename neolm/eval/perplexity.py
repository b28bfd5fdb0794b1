"""Rolling-window perplexity of documents, with lm-evaluation-harness's windowing and metrics.

A document's tokens are cut into disjoint chunks of at most `max_len` predicted tokens: the first
chunk is conditioned on the end-of-text token, each later chunk on the tokens before it (the input
window is the max_len tokens ending just before its last target). From the summed log-likelihood:
token perplexity, word perplexity (words = whitespace-separated pieces), byte perplexity and bits per
byte, as the harness's wikitext task reports them.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


@torch.inference_mode()
def window_loglikelihood(model: GPT, windows: list[tuple[list[int], int]], targets: list[list[int]]) -> list[float]:
    """Sum of log p(target) over the scored tail of each window; windows are right-padded into one batch."""
    device = model.lm_head.weight.device
    width = max(len(w) for w, _ in windows)
    ids = torch.zeros(len(windows), width, dtype=torch.long, device=device)
    for row, (w, _) in enumerate(windows):
        ids[row, : len(w)] = torch.tensor(w)
    logprobs = F.log_softmax(model(ids).float(), dim=-1)  # (B, T, V); right padding never affects real tokens
    out = []
    for row, ((w, n), tgt) in enumerate(zip(windows, targets)):
        positions = torch.arange(len(w) - n, len(w), device=device)
        out.append(logprobs[row, positions, torch.tensor(tgt, device=device)].sum().item())
    return out


def perplexity(model: GPT, encode, texts: list[str], prefix: int, max_len: int | None = None,
               batch_size: int = 8, progress=None) -> Perplexity:  # fmt: skip
    """Rolling perplexity of `texts` (each a document) under `model`; `encode` maps text to token ids."""
    max_len = max_len or model.config.n_positions
    start = time.perf_counter()
    jobs = []  # (window, n scored, targets)
    for text in texts:
        tokens = encode(text)
        done = 0
        for window, n in rolling_windows(tokens, prefix, max_len):
            jobs.append((window, n, tokens[done : done + n]))
            done += n
    jobs.sort(key=lambda j: -len(j[0]))  # similar lengths batch together
    total = 0.0
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        total += sum(window_loglikelihood(model, [(w, n) for w, n, _ in chunk], [t for _, _, t in chunk]))
        if progress is not None:
            progress(sum(n for _, n, _ in chunk))
    return Perplexity(
        loglikelihood=total,
        tokens=sum(n for _, n, _ in jobs),
        words=sum(count_words(t) for t in texts),
        bytes=sum(len(t.encode("utf-8")) for t in texts),
        seconds=time.perf_counter() - start,
    )

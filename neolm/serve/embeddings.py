"""OpenAI's POST /v1/embeddings: each input's vector from neolm.embedding (the server's --embedding-pooling over the
final hidden states, L2-normalised, as vLLM embeds with a causal LM), as floats or base64 (little-endian float32)."""

from __future__ import annotations

import base64

import torch

from neolm.serve.errors import ApiError

FIELDS = {"model", "input", "encoding_format", "dimensions", "user", "truncate_prompt_tokens", "add_special_tokens"}
MAX_INPUTS = 2048  # OpenAI's limit on inputs a request


def parse(body, lm) -> tuple[list[list[int]], str]:
    """(each input's token ids, the encoding format); ApiError if the request is bad."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(k for k, v in body.items() if k not in FIELDS and v is not None)
    if unknown:
        raise ApiError(400, f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0])
    given = body.get("input")
    if isinstance(given, str) or _tokens(given):
        given = [given]
    if not isinstance(given, list) or not given or not all(isinstance(t, str) or _tokens(t) for t in given):
        raise ApiError(400, "'input' must be a string, a list of strings, a list of token ids or a list of such "
                       "lists, none empty", "input")  # fmt: skip
    if len(given) > MAX_INPUTS:
        raise ApiError(400, f"'input' holds {len(given)} inputs; at most {MAX_INPUTS}", "input")
    seqs = [lm.encode(t) if isinstance(t, str) else t for t in given]
    if any(not s for s in seqs):
        raise ApiError(400, "an input is empty: there is nothing to embed", "input")
    if any(t >= lm.config.vocab_size for s in seqs for t in s):
        raise ApiError(400, f"token ids must be below the vocabulary's {lm.config.vocab_size}", "input")
    keep = body.get("truncate_prompt_tokens")
    if keep is not None:
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ApiError(400, f"'truncate_prompt_tokens' must be an integer >= 1, got {keep!r}",
                           "truncate_prompt_tokens")  # fmt: skip
        seqs = [s[-keep:] for s in seqs]  # vLLM's: the last `keep` tokens
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != lm.config.d_model:
        raise ApiError(400, f"'dimensions': this model's embeddings have {lm.config.d_model}, and it cannot shorten "
                       "them (no Matryoshka training)", "dimensions")  # fmt: skip
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise ApiError(400, f"'encoding_format' must be float or base64, got {encoding!r}", "encoding_format")
    return seqs, encoding


def answer(vectors: torch.Tensor, seqs: list[list[int]], encoding: str, model: str) -> dict:
    def vector(v: torch.Tensor):
        return v.tolist() if encoding == "float" else base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()

    tokens = sum(len(s) for s in seqs)
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": vector(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip


def _tokens(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                           for t in value)  # fmt: skip

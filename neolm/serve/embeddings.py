"""OpenAI's POST /v1/embeddings: each input's vector from neolm.embedding (the server's --embedding-pooling over the
final hidden states, L2-normalised, as vLLM embeds with a causal LM), as floats or base64 (little-endian float32)."""

from __future__ import annotations

import base64

import torch

from neolm.serve.errors import ApiError
from neolm.serve.protocol import field_of, known_fields, prompts

FIELDS = {"model", "input", "encoding_format", "dimensions", "user", "truncate_prompt_tokens", "add_special_tokens"}
MAX_INPUTS = 2048  # OpenAI's limit on inputs a request


def parse(body, lm) -> tuple[list[list[int]], str]:
    """(each input's token ids, the encoding format); ApiError if the request is bad."""
    known_fields(body, FIELDS)
    seqs = prompts(body, lm.encode, "input")[0]  # the prompt forms of /v1/completions
    if len(seqs) > MAX_INPUTS:
        raise ApiError(400, f"'input' holds {len(seqs)} inputs; at most {MAX_INPUTS}", "input")
    if any(not s for s in seqs):
        raise ApiError(400, "an input is empty: there is nothing to embed", "input")
    if any(not 0 <= t < lm.config.vocab_size for s in seqs for t in s):
        raise ApiError(400, f"token ids must be between 0 and the vocabulary's {lm.config.vocab_size}", "input")
    keep = field_of(body, "truncate_prompt_tokens", (int,), None, lambda v: v >= 1, ">= 1")
    if keep is not None:
        seqs = [s[-keep:] for s in seqs]  # vLLM's: the last `keep` tokens
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != lm.config.d_model:
        raise ApiError(400, f"'dimensions': this model's embeddings have {lm.config.d_model}, and it cannot shorten "
                       "them (no Matryoshka training)", "dimensions")  # fmt: skip
    encoding = field_of(body, "encoding_format", (str,), "float", lambda v: v in ("float", "base64"),
                        "float or base64")  # fmt: skip
    return seqs, encoding


def answer(vectors: torch.Tensor, seqs: list[list[int]], encoding: str, model: str) -> dict:
    def vector(v: torch.Tensor):
        return v.tolist() if encoding == "float" else base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()

    tokens = sum(len(s) for s in seqs)
    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": vector(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip


"""Embeddings (neolm.embedding, LanguageModel.embed, POST /v1/embeddings): transformers' final hidden states pooled,
batched as alone, and served as OpenAI's embeddings, floats or base64."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import torch
from conftest import NAME, TINY
from test_serve import call, url

import neolm
from neolm.embedding import embed
from neolm.errors import NeolmError
from neolm.serve.http import Server

TOL = 1e-4  # as tests/test_parity.py


@pytest.mark.parametrize("name", list(TINY))
def test_embeddings_are_transformers_final_hidden_states_pooled(tiny_checkpoints, name):
    hf, folder = tiny_checkpoints[name]
    model = neolm.load(folder, dtype="float32", device="cpu").model
    generator = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 1000, (n,), generator=generator).tolist() for n in (30, 5, 1, 17)]  # > the local window
    for pooling in ("last", "mean"):
        got = embed(model, seqs, pooling, normalize=False, batch_size=3)  # left-padded batches of mixed lengths
        for row, seq in enumerate(seqs):
            with torch.no_grad():
                states = hf(torch.tensor([seq]), output_hidden_states=True).hidden_states[-1][0]  # (T, C), after ln_f
            expected = states[-1] if pooling == "last" else states.mean(dim=0)
            assert (got[row] - expected).abs().max().item() <= TOL, (pooling, row)
    unit = embed(model, seqs)
    assert torch.allclose(unit.norm(dim=-1), torch.ones(len(seqs))) and torch.allclose(
        unit, torch.nn.functional.normalize(embed(model, seqs, normalize=False), dim=-1))  # fmt: skip
    with pytest.raises(NeolmError, match="no tokens"):
        embed(model, [[1], []])
    with pytest.raises(NeolmError, match="pooling"):
        embed(model, [[1]], "first")


def test_library_embed(lm):
    one = lm.embed("KING. Who is he?")
    many = lm.embed(["KING. Who is he?", "Ay"], pooling="mean")
    assert one.shape == (lm.config.d_model,) and many.shape == (2, lm.config.d_model)
    assert torch.allclose(one, lm.embed(["KING. Who is he?"])[0]) and abs(one.norm().item() - 1) < 1e-5
    with pytest.raises(NeolmError, match="context"):
        lm.embed("x " * (lm.config.n_positions + 5))


def test_server_embeddings_are_the_library_s(server, lm):
    texts = ["KING. Who is he?", "Ay, my lord.", "Ay"]
    status, body = call(server, "/v1/embeddings", {"model": NAME, "input": texts})
    assert status == 200, body
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1, 2]
    assert torch.allclose(torch.tensor([d["embedding"] for d in body["data"]]), lm.embed(texts), atol=1e-6)
    tokens = sum(len(lm.encode(t)) for t in texts)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    status, packed = call(server, "/v1/embeddings", {"input": lm.encode(texts[0]), "encoding_format": "base64"})
    vector = np.frombuffer(base64.b64decode(packed["data"][0]["embedding"]), dtype="<f4")
    assert status == 200 and np.allclose(vector, body["data"][0]["embedding"], atol=1e-6)
    status, cut = call(server, "/v1/embeddings", {"input": [lm.encode(texts[1])], "truncate_prompt_tokens": 1})
    assert status == 200 and cut["usage"]["prompt_tokens"] == 1


@pytest.mark.parametrize("fields, param, needle", [
    ({"input": ""}, "input", "empty"),
    ({"input": []}, "input", "must be"),
    ({"input": [1, "a"]}, "input", "must be"),
    ({"input": [[99999999]]}, "input", "vocabulary"),
    ({"input": "a " * 3000}, "input", "context"),
    ({"input": "a", "dimensions": 8}, "dimensions", "Matryoshka"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", "base64"),
    ({"input": "a", "pooling": "mean"}, "pooling", "unrecognized"),
])  # fmt: skip
def test_embedding_requests_neolm_cannot_answer_are_refused(server, fields, param, needle):
    status, body = call(server, "/v1/embeddings", {"model": NAME} | fields)
    assert status == 400 and body["error"]["param"] == param and needle in body["error"]["message"], body


def test_openai_client_reads_embeddings_and_mean_pooling_is_served(lm):
    openai = pytest.importorskip("openai")
    meaned = Server(lm, port=0, model_name=NAME, embedding_pooling="mean")
    meaned.start()
    try:
        client = openai.OpenAI(base_url=url(meaned, "/v1"), api_key="none")
        reply = client.embeddings.create(model=NAME, input=["Ay, my lord.", "Ay"])  # the client asks for base64
        got = torch.tensor([d.embedding for d in reply.data])
        assert torch.allclose(got, lm.embed(["Ay, my lord.", "Ay"], pooling="mean"), atol=1e-6)
    finally:
        meaned.close()

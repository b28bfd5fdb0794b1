"""`neolm serve`: OpenAI's API over the bundled model, through urllib and through the `openai` client."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch
from conftest import NAME

import neolm
from neolm.errors import NeolmError
from neolm.eval.scoring import loglikelihoods
from neolm.generate import DecodeBatch, Prefill
from neolm.serve.engine import End, Engine, Prompt, Token
from neolm.serve.http import Server


def url(server, path: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def call(server, path: str, body=None, headers: dict | None = None) -> tuple[int, dict | str]:
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(url(server, path), data, {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text, kind = response.status, response.read().decode(), response.headers["Content-Type"]
    except urllib.error.HTTPError as e:
        status, text, kind = e.code, e.read().decode(), e.headers["Content-Type"]
    return status, json.loads(text) if kind == "application/json" else text


def events(text: str) -> list:
    """Server-sent events -> their JSON payloads; the stream must end with [DONE]."""
    payloads = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def reference_logprobs(lm, ids: list[int]) -> torch.Tensor:
    """(len(ids) - 1, V): the log-probabilities of each next token, from one plain forward."""
    with torch.no_grad():
        return torch.log_softmax(lm.model(torch.tensor([ids]))[0, :-1].float(), dim=-1)


def greedy(lm, prompt: str, n: int) -> str:
    return lm.generate(prompt, max_new_tokens=n, do_sample=False)


def test_models_and_health(server):
    status, body = call(server, "/v1/models")
    assert status == 200 and body["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in body["data"]] == [(NAME, "model", 512)]
    assert call(server, f"/v1/models/{NAME}")[1]["id"] == NAME
    status, body = call(server, "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == NAME


def test_completion_is_the_library_greedy_text(server, lm):
    status, body = call(
        server, "/v1/completions", {"model": NAME, "prompt": "KING.", "max_tokens": 24, "temperature": 0}
    )
    assert status == 200
    assert body["object"] == "text_completion" and body["model"] == NAME and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["text"] == greedy(lm, "KING.", 24)
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    prompt_tokens = len(lm.encode("KING."))
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 24,
        "total_tokens": prompt_tokens + 24,
    }


def test_an_empty_prompt_is_a_documents_start(server, lm):
    """As OpenAI's completions: without a prompt the model writes as from the start of a new document (after
    <|endoftext|>, the model's bos token)."""
    status, body = call(server, "/v1/completions", {"model": NAME, "prompt": "", "max_tokens": 8, "temperature": 0})
    assert status == 200 and body["choices"][0]["text"] == greedy(lm, "", 8)
    assert body["usage"]["prompt_tokens"] == 1
    bos = lm.generate_ids([[lm.config.bos_token_id]], max_new_tokens=8, do_sample=False)[0]
    assert greedy(lm, "", 8) == lm.decode(bos)


def test_penalties_logit_bias_and_min_p(server, lm):
    """OpenAI's presence/frequency penalties and logit_bias, and vLLM's min_p, as the library's generation
    arguments give them (sequence_bias of one-token sequences for logit_bias)."""
    base = {"model": NAME, "prompt": "KING.", "max_tokens": 16, "temperature": 0}
    knobs = dict(max_new_tokens=16, do_sample=False, repetition_penalty=1.0)
    plain = lm.generate("KING.", **knobs)
    for fields, kwargs in [
        ({"presence_penalty": 1.5}, {"presence_penalty": 1.5}),
        ({"frequency_penalty": 2, "presence_penalty": -0.5}, {"frequency_penalty": 2.0, "presence_penalty": -0.5}),
        ({"logit_bias": {"11": 100}}, {"sequence_bias": {(11,): 100.0}}),
    ]:
        status, body = call(server, "/v1/completions", base | {"repetition_penalty": 1.0} | fields)
        assert status == 200, body
        assert body["choices"][0]["text"] == lm.generate("KING.", **knobs, **kwargs) != plain, fields
    assert body["choices"][0]["text"] == lm.decode([11] * 16)  # a bias of 100 leaves no other token
    sampled = base | {"temperature": 1.0, "seed": 5, "min_p": 0.5}
    status, body = call(server, "/v1/completions", sampled)
    text = lm.generate("KING.", max_new_tokens=16, do_sample=True, temperature=1.0, top_k=0, seed=5, min_p=0.5,
                       repetition_penalty=lm.generation_defaults.get("repetition_penalty", 1.0))  # fmt: skip
    assert status == 200 and body["choices"][0]["text"] == text


def test_stream_joins_to_the_whole_text(server, lm):
    body = {"prompt": "HAMLET.", "max_tokens": 30, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    status, text = call(server, "/v1/completions", body)
    assert status == 200
    chunks = events(text)
    assert len(chunks) > 3  # token by token, not one piece
    usage = chunks.pop()
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 30
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy(lm, "HAMLET.", 30)
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_prompt_forms_echo_and_choice_order(server, lm):
    ids = lm.encode("ROMEO.")
    for prompt in ("ROMEO.", ["ROMEO."], ids, [ids]):
        status, body = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert status == 200 and body["choices"][0]["text"] == greedy(lm, "ROMEO.", 8), prompt
    status, body = call(server, "/v1/completions", {"prompt": ["ROMEO.", "JULIET."], "max_tokens": 8, "temperature": 0,
                                                    "echo": True})  # fmt: skip
    assert [c["text"] for c in body["choices"]] == [
        "ROMEO." + greedy(lm, "ROMEO.", 8),
        "JULIET." + greedy(lm, "JULIET.", 8),
    ]
    status, body = call(server, "/v1/completions", {"prompt": ["A", "B"], "n": 3, "max_tokens": 4, "seed": 5})
    assert [c["index"] for c in body["choices"]] == list(range(6)) and body["usage"]["completion_tokens"] == 24


def test_seeded_sampling_is_reproducible(server):
    body = {"prompt": "KING.", "max_tokens": 20, "temperature": 0.9, "top_p": 0.95, "top_k": 40, "seed": 7}
    first, second = call(server, "/v1/completions", body)[1], call(server, "/v1/completions", body)[1]
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


def test_best_of_returns_the_n_most_likely_of_its_samples(server):
    """best_of: 4 samples, the 2 with the highest mean log-probability per token returned (OpenAI's ranking);
    seeded, so the same 4 come back with n=4 and their log-probabilities to rank them by hand."""
    body = {"prompt": "KING.", "max_tokens": 6, "min_tokens": 6, "temperature": 1.0, "seed": 5}
    status, best = call(server, "/v1/completions", body | {"n": 2, "best_of": 4})
    assert status == 200 and [c["index"] for c in best["choices"]] == [0, 1]
    assert best["choices"][0]["logprobs"] is None  # not asked for
    assert best["usage"]["completion_tokens"] == 4 * 6  # all samples count
    status, every = call(server, "/v1/completions", body | {"n": 4, "logprobs": 0})
    assert status == 200
    mean = {c["text"]: sum(c["logprobs"]["token_logprobs"]) / 6 for c in every["choices"]}
    assert len(set(mean.values())) == 4
    assert [c["text"] for c in best["choices"]] == sorted(mean, key=mean.get, reverse=True)[:2]


def test_beam_search_through_the_server(server, lm):
    """vLLM's use_beam_search: n beams, the n best hypotheses answered best first (the library's beam search with
    length_penalty), streamed at the end alike, with the model's log-probabilities of their tokens; in chats too;
    sampling fields, best_of, echoed prompt scores and a length_penalty without beams are refused."""
    kw = dict(num_beams=3, num_return_sequences=3, max_new_tokens=10, do_sample=False, length_penalty=0.6)
    body = {"prompt": "KING.", "max_tokens": 10, "n": 3, "use_beam_search": True, "length_penalty": 0.6}
    expected = lm.generate("KING.", **kw)
    status, out = call(server, "/v1/completions", body | {"logprobs": 2})
    assert status == 200 and [c["text"] for c in out["choices"]] == expected
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert out["usage"]["completion_tokens"] == sum(len(lm.encode(t)) for t in expected)
    assert len(set(expected)) == 3
    prompt = lm.encode("KING.")
    for choice in out["choices"]:
        tokens = lm.encode(choice["text"])
        reference = reference_logprobs(lm, prompt + tokens)[len(prompt) - 1 :]
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(
            [float(reference[i, t]) for i, t in enumerate(tokens)], abs=1e-4)  # fmt: skip
        for token, logprob, top, best in zip(choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"],
                                             choice["logprobs"]["top_logprobs"], reference.topk(2).indices.tolist()):
            assert list(top)[:2] == [lm.decode([t]) for t in best] and top[token] == logprob  # (+ the chosen one)
    status, text = call(server, "/v1/completions", body | {"stream": True})
    streamed = ["", "", ""]
    for chunk in events(text):
        for c in chunk["choices"]:
            streamed[c["index"]] += c["text"]
    assert status == 200 and streamed == expected
    messages = [{"role": "user", "content": "Who art thou?"}]
    status, chat = call(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 8, "n": 2,
                                                         "use_beam_search": True})  # fmt: skip
    assert status == 200 and len(chat["choices"]) == 2
    assert chat["choices"][0]["message"]["content"] != chat["choices"][1]["message"]["content"]
    for extra, field in (({"top_p": 0.9}, "top_p"), ({"seed": 1}, "seed"), ({"temperature": 0.7}, "temperature"),
                         ({"best_of": 5}, "best_of"), ({"echo": True, "logprobs": 1}, "echo")):  # fmt: skip
        status, error = call(server, "/v1/completions", body | extra)
        assert status == 400 and error["error"]["param"] == field, extra
    status, error = call(server, "/v1/completions", {"prompt": "KING.", "length_penalty": 0.5})
    assert status == 400 and "use_beam_search" in error["error"]["message"]


@pytest.mark.parametrize("how", ["stop", "cancel"])
def test_a_beam_search_ends_early_when_stopped_or_cancelled(lm, how):
    """stop() (a drain whose time ran out) or the job's cancel() ends a running beam search within a step, after a
    few of its 400 steps: a stopped request ends with ShuttingDown, a cancelled one with nothing (counted as
    aborted), and the engine goes on serving."""
    from neolm.serve.engine import ShuttingDown

    engine = Engine(lm)
    gc = lm.generation_config(max_new_tokens=400, min_new_tokens=400, num_beams=4, do_sample=False)
    job = engine.submit([lm.encode("KING.")], gc)
    forwards = []

    def count(module, args):
        forwards.append(1)
        if len(forwards) == 5 and how == "stop":  # (in the engine's thread: stop() does not wait for it)
            engine.stop("the drain's time ran out", timeout=0)
        elif len(forwards) == 5:
            job.cancel()

    hook = lm.model.register_forward_pre_hook(count)
    engine.start()
    try:
        if how == "stop":
            with pytest.raises(ShuttingDown, match="time ran out"):
                list(job)
            engine._thread.join(60)
            assert not engine._thread.is_alive()
        else:
            assert list(job) == [] and engine.metrics.finished["abort"] == 1  # (its one sequence)
            hook.remove()
            after = engine.submit([lm.encode("KING.")], lm.generation_config(max_new_tokens=3, do_sample=False))
            assert len([e for e in after if isinstance(e, Token)]) == 3
    finally:
        hook.remove()
        engine.close(timeout=60)
    assert 5 <= len(forwards) <= 7 and engine.generated == (0 if how == "stop" else 3)


@pytest.mark.parametrize("how", ["sampled", "beam search", "streamed beam search"])
def test_a_client_that_goes_away_stops_its_request(server, lm, how):
    """A client that closes its connection while its answer is being made (not streamed, or a beam search's,
    which sends nothing until the end) has its request stopped within a few steps, not after its 500 tokens;
    the server goes on serving."""
    body = {"model": NAME, "prompt": "KING.", "max_tokens": 500, "ignore_eos": True}
    body |= {"temperature": 0.8} if how == "sampled" else {"use_beam_search": True, "n": 3, "temperature": 0}
    body |= {"stream": True} if how.startswith("streamed") else {}
    data = json.dumps(body).encode()
    forwards = []
    hook = lm.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    aborted = server.engine.metrics.finished["abort"]
    try:
        with socket.create_connection(("127.0.0.1", server.server_address[1])) as client:
            client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(data), data))  # fmt: skip
            deadline = time.monotonic() + 30
            while len(forwards) < 10 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert len(forwards) >= 10
        while server.engine.metrics.finished["abort"] == aborted and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.engine.metrics.finished["abort"] > aborted
        assert len(forwards) < 250, len(forwards)
    finally:
        hook.remove()
    status, answer = call(server, "/v1/completions", {"model": NAME, "prompt": "KING.", "max_tokens": 3})
    assert status == 200 and answer["usage"]["completion_tokens"] == 3


def test_vllm_extra_sampling_fields(server, lm):
    """vLLM's stop_token_ids, ignore_eos, include_stop_str_in_output, allowed_token_ids, bad_words and
    truncate_prompt_tokens give the library's text with the matching generation arguments."""
    base = {"prompt": "KING.", "max_tokens": 16, "temperature": 0, "repetition_penalty": 1.0}
    knobs = dict(max_new_tokens=16, do_sample=False, repetition_penalty=1.0)
    prompt = lm.encode("KING.")
    free = lm.generate_ids([prompt], **knobs)[0]

    def text(fields) -> dict:
        status, body = call(server, "/v1/completions", base | fields)
        assert status == 200, body
        return body["choices"][0] | {"tokens": body["usage"]["completion_tokens"]}

    first = next(i for i, t in enumerate(free) if t not in free[:i] and i >= 3)  # a token's first occurrence
    got = text({"stop_token_ids": [free[first]]})
    assert (got["text"], got["finish_reason"], got["tokens"]) == (lm.decode(free[: first + 1]), "stop", first + 1)
    eos = lm.tokenizer.eos_token_id
    got = text({"logit_bias": {str(eos): 100}})  # eos at once
    assert (got["text"], got["finish_reason"], got["tokens"]) == ("", "stop", 1)
    got = text({"logit_bias": {str(eos): 100}, "ignore_eos": True})
    assert (got["finish_reason"], got["tokens"]) == ("length", 16)
    stop = lm.decode(free[first : first + 1])
    cut = text({"stop": stop})
    kept = text({"stop": stop, "include_stop_str_in_output": True})
    assert kept["text"] == cut["text"] + stop and kept["finish_reason"] == cut["finish_reason"] == "stop"
    allowed = sorted({free[0], 11, 13} - {free[2]})  # (free's third token is not among them)
    got = text({"allowed_token_ids": allowed})
    only = lm.generate_ids([prompt], prefix_allowed_tokens_fn=lambda b, ids: allowed, **knobs)[0]
    assert got["text"] == lm.decode(only) and set(only) <= set(allowed) and only != free
    word = next(w for t in free if (w := lm.decode([t]).strip()).isalpha())  # a word the greedy text holds
    got = text({"bad_words": [word]})
    banned = [lm.encode(word), lm.encode(" " + word)]
    assert got["text"] == lm.generate("KING.", bad_words_ids=banned, **knobs) != lm.decode(free)
    long = lm.encode("Now is the winter of our discontent made glorious summer by this sun of York")
    got = call(server, "/v1/completions", base | {"prompt": long, "truncate_prompt_tokens": 5, "echo": True})[1]
    assert got["choices"][0]["text"] == lm.decode(long[-5:]) + lm.decode(lm.generate_ids([long[-5:]], **knobs)[0])
    assert got["usage"]["prompt_tokens"] == 5


def test_stop_strings_are_left_out(server, lm):
    full = greedy(lm, "KING.", 40)
    stop = full.strip()[2:5]  # text the greedy continuation contains
    cut = full[: full.index(stop)]
    status, body = call(
        server, "/v1/completions", {"prompt": "KING.", "max_tokens": 40, "temperature": 0, "stop": stop}
    )
    assert status == 200
    assert body["choices"][0] == {"index": 0, "text": cut, "logprobs": None, "finish_reason": "stop"}
    _, text = call(server, "/v1/completions", {"prompt": "KING.", "max_tokens": 40, "temperature": 0,
                                                    "stop": [stop, "zzz"], "stream": True})  # fmt: skip
    chunks = events(text)
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_chat(server, lm):
    messages = [{"role": "system", "content": "A play."}, {"role": "user", "content": "Who art thou?"}]
    status, body = call(server, "/v1/chat/completions", {"model": NAME, "messages": messages, "max_tokens": 20,
                                                         "temperature": 0})  # fmt: skip
    assert status == 200 and body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    transcript = "A play.\nUser: Who art thou?\nAssistant:"
    expected = lm.generate(transcript, max_new_tokens=20, do_sample=False, stop_strings=["\nUser:"])
    expected = expected.split("\nUser:")[0].lstrip()
    assert choice["message"]["content"] == expected
    assert body["usage"]["prompt_tokens"] == len(lm.encode(transcript))
    status, text = call(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 20, "temperature": 0,
                                                         "stream": True})  # fmt: skip
    chunks = events(text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_concurrent_requests_share_a_batch_and_match_solo(server, lm):
    """Requests that wait while a batch runs decode together in the next one, each as it would alone."""
    batches = server.engine.batches
    blocker = threading.Thread(target=call, args=(server, "/v1/completions", {"prompt": "A", "max_tokens": 400,
                                                                               "temperature": 0}))  # fmt: skip
    blocker.start()
    while server.engine.batches == batches:  # the engine is busy with the blocker
        time.sleep(0.001)
    prompts = [f"{name}." for name in ("KING", "QUEEN", "HAMLET", "OPHELIA", "GHOST", "LAERTES")]
    results = {}

    def ask(prompt):
        results[prompt] = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 48, "temperature": 0})[1]

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in [*threads, blocker]:
        t.join()
    for prompt in prompts:
        assert results[prompt]["choices"][0]["text"] == greedy(lm, prompt, 48), prompt
    assert server.engine.largest_batch >= 2  # some of them decoded together
    assert call(server, "/health")[1]["largest_batch_requests"] >= 2


def test_a_request_joins_the_running_batch(lm):
    """Continuous batching: a request that arrives while a long generation runs joins it at the next step and
    finishes first, with its solo tokens; so do requests with other settings. A seeded one waits and runs alone."""
    engine = Engine(lm, max_batch=8)
    engine.start()
    try:
        long = engine.submit([lm.encode("KING.")], lm.generation_config(max_new_tokens=300, min_new_tokens=300,
                                                                        do_sample=False))  # fmt: skip
        events = iter(long)
        next(events)  # it is decoding
        prompts = [lm.encode("QUEEN. Good morrow, my lord, how fares"), lm.encode("Ay")]
        settings = [dict(max_new_tokens=12, do_sample=False), dict(max_new_tokens=9, do_sample=False,
                                                                    repetition_penalty=1.3)]  # fmt: skip
        jobs = [engine.submit([p], lm.generation_config(**kw)) for p, kw in zip(prompts, settings)]
        sampled = engine.submit([prompts[1]], lm.generation_config(max_new_tokens=5, do_sample=True))
        seeded = engine.submit([prompts[1]], lm.generation_config(max_new_tokens=5, do_sample=True, seed=11))
        got = [[e.token for e in job if isinstance(e, Token)] for job in jobs]
        assert sum(isinstance(e, Token) for e in sampled) == 5
        rest = list(events)
        assert sum(isinstance(e, Token) for e in rest) == 299  # the long one was still going
        assert [e for e in rest if isinstance(e, End)] == [End(0, "length", 300)]
        seeded_tokens = [e.token for e in seeded if isinstance(e, Token)]
    finally:
        engine.close()
    for p, kw, tokens in zip(prompts, settings, got):
        assert tokens == lm.generate_ids([p], **kw)[0]
    assert seeded_tokens == lm.generate_ids([prompts[1]], max_new_tokens=5, do_sample=True, seed=11)[0]
    assert engine.largest_batch == 4  # the long one, the two greedy ones and the sampled one; not the seeded one


def test_a_long_prompt_is_read_in_chunks_between_steps(lm, monkeypatch):
    """Chunked prefill: a long prompt that arrives while a generation runs is read a chunk per step, between the
    running sequence's steps, and both get their solo tokens."""
    steps, reads = [0], []  # steps so far; (step, budget, tokens read) per Prefill.read
    step, read = DecodeBatch.step, Prefill.read

    def counted_step(self):
        steps[0] += 1
        return step(self)

    def recorded_read(self, model, budget=None):
        reads.append((steps[0], budget, read(self, model, budget)))
        return reads[-1][2]

    monkeypatch.setattr(DecodeBatch, "step", counted_step)
    monkeypatch.setattr(Prefill, "read", recorded_read)
    engine = Engine(lm, max_batch=8)
    engine.prefill_chunk = 128  # below MIN_PREFILL_CHUNK, to chunk a prompt within the bundled model's 512
    engine.start()
    try:
        gc = lm.generation_config(max_new_tokens=60, min_new_tokens=60, do_sample=False)
        running = engine.submit([lm.encode("KING.")], gc)
        events = iter(running)
        next(events)  # it is decoding
        prompt = lm.encode("QUEEN. Good morrow, my lord, how fares the King? " * 40)[:420]
        joining = engine.submit([prompt], lm.generation_config(max_new_tokens=8, do_sample=False))
        joined = [e.token for e in joining if isinstance(e, Token)]
        tokens = [e.token for e in events if isinstance(e, Token)]
    finally:
        engine.close()
    chunks = [(at, spent) for at, budget, spent in reads if budget == 128]
    assert [spent for _, spent in chunks] == [128, 128, 164]  # the last takes what is left (< 2 chunks)
    assert [at - chunks[0][0] for at, _ in chunks] == [0, 1, 2]  # one a step
    assert joined == lm.generate_ids([prompt], max_new_tokens=8, do_sample=False)[0]
    alone = lm.generate_ids([lm.encode("KING.")], max_new_tokens=60, min_new_tokens=60, do_sample=False)[0]
    assert tokens == alone[1:]  # its first token was taken above
    with pytest.raises(NeolmError, match="at least 256"):
        Engine(lm, prefill_chunk=100)


def test_client_gone_stops_its_sequences(server):
    """A streaming client that disconnects stops its generation (the engine serves the next request at once)."""
    body = json.dumps({"prompt": "KING.", "max_tokens": 500, "temperature": 0, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=60) as client:
        client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        assert b"data: " in client.recv(4096) or b"data: " in client.recv(4096)  # generation has started
        generated = server.engine.generated
    status, body = call(server, "/v1/completions", {"prompt": "KING.", "max_tokens": 3, "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert server.engine.generated - generated < 500  # the 500-token stream did not run to its end


def test_completion_logprobs_are_the_model_s(server, lm):
    prompt = "KING. What say you?"
    status, body = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0,
                                                    "repetition_penalty": 1.0, "logprobs": 3})  # fmt: skip
    assert status == 200
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    ids, new = lm.encode(prompt), lm.generate_ids([lm.encode(prompt)], max_new_tokens=12, do_sample=False,
                                                  repetition_penalty=1.0)[0]  # fmt: skip
    assert len(lp["tokens"]) == len(new) == body["usage"]["completion_tokens"] == 12
    assert "".join(lp["tokens"]) == choice["text"] == lm.decode(new)
    assert lp["text_offset"] == [len(lm.decode(new[:i])) for i in range(len(new))]
    reference = reference_logprobs(lm, ids + new)[len(ids) - 1 :]
    assert lp["token_logprobs"] == pytest.approx(reference.gather(1, torch.tensor(new)[:, None])[:, 0].tolist(), abs=1e-4)
    for token, logprob, top, best in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], reference.topk(3).indices.tolist()):
        assert list(top) == [lm.decode([t]) for t in best]  # the 3 most likely, most likely first; greedy: the chosen
        assert top[token] == logprob == max(top.values())
    assert sum(lp["token_logprobs"]) == pytest.approx(loglikelihoods(lm.model, [(ids, new)])[0][0], abs=1e-3)


def test_echo_logprobs_score_the_prompt(server, lm):
    """max_tokens 0 with echo: the prompt scored, its first token without a log-probability."""
    prompt = "To be, or not to be, that is the question"
    status, body = call(server, "/v1/completions", {"prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0})
    (choice,) = body["choices"]
    lp, ids = choice["logprobs"], lm.encode(prompt)
    assert status == 200 and choice["text"] == prompt and body["usage"]["completion_tokens"] == 0
    assert lp["tokens"] == [lm.decode([t]) for t in ids] and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][0] is None
    reference = reference_logprobs(lm, ids).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert lp["token_logprobs"][1:] == pytest.approx(reference.tolist(), abs=1e-4)
    assert [list(top) for top in lp["top_logprobs"][1:]] == [[t] for t in lp["tokens"][1:]]  # k=0: the token itself
    assert lp["text_offset"] == [len(lm.decode(ids[:i])) for i in range(len(ids))]


def test_streamed_logprobs_join_to_the_whole(server):
    body = {"prompt": ["KING.", "QUEEN. Speak"], "max_tokens": 10, "temperature": 0, "logprobs": 2, "echo": True}
    whole = call(server, "/v1/completions", body)[1]["choices"]
    joined = {}
    for event in events(call(server, "/v1/completions", {**body, "stream": True})[1]):
        (choice,) = event["choices"]
        part = joined.setdefault(choice["index"], {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                   "text_offset": []})  # fmt: skip
        for key in part:
            part[key] += choice["logprobs"][key]
    assert [joined[c["index"]] for c in whole] == [c["logprobs"] for c in whole]


def test_chat_logprobs(server, lm):
    status, body = call(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Speak."}],
                        "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2})  # fmt: skip
    (choice,) = body["choices"]
    content = choice["logprobs"]["content"]
    assert status == 200 and len(content) == body["usage"]["completion_tokens"]
    assert choice["message"]["content"] in bytes(b for item in content for b in item["bytes"]).decode().lstrip()
    assert all(len(item["top_logprobs"]) == 2 and item["logprob"] <= 0 for item in content)
    assert all(item["top_logprobs"][0]["logprob"] >= item["top_logprobs"][1]["logprob"] for item in content)
    streamed = call(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Speak."}],
                    "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2, "stream": True})[1]  # fmt: skip
    assert [item for e in events(streamed) for item in (e["choices"][0]["logprobs"] or {}).get("content", [])] == content
    status, body = call(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Speak."}],
                        "max_tokens": 2, "logprobs": False})  # fmt: skip
    assert status == 200 and body["choices"][0]["logprobs"] is None


def test_engine_batches_jobs_with_and_without_logprobs(lm):
    """Log-probabilities change no token, and a job gets exactly the alternatives it asked for."""
    engine = Engine(lm, max_batch=8)
    gc = lm.generation_config(max_new_tokens=6, do_sample=False)
    prompts = [lm.encode("KING."), lm.encode("Good morrow, sir")]
    jobs = [engine.submit(prompts, gc), engine.submit(prompts, gc, logprobs=4, prompt_logprobs=True),
            engine.submit(prompts, gc, logprobs=1)]  # fmt: skip
    engine.start()
    try:
        got = [list(job) for job in jobs]
    finally:
        engine.close()
    assert engine.batches == 2  # jobs that want their prompts scored batch apart
    tokens = [[[e.token for e in events if isinstance(e, Token) and e.sequence == s] for s in range(2)] for events in got]
    assert tokens[0] == tokens[1] == tokens[2] == lm.generate_ids(prompts, max_new_tokens=6, do_sample=False)
    assert all(e.logprob is None and e.top == () for e in got[0] if isinstance(e, Token))
    assert all(len(e.top) == 4 for e in got[1] if isinstance(e, Token))
    assert all(len(e.top) == 1 and e.logprob <= 0 for e in got[2] if isinstance(e, Token))
    scored = [e for e in got[1] if isinstance(e, Prompt)]
    assert [e.prompt for e in scored] == [0, 1] and [len(e.logprobs) for e in scored] == [len(p) - 1 for p in prompts]
    assert all(len(top) == 4 for e in scored for top in e.top)
    assert not any(isinstance(e, Prompt) for e in got[0] + got[2])


def test_tokenizer_routes(server, lm):
    status, body = call(server, "/tokenize", {"prompt": "Hello, world", "return_token_strs": True})
    assert status == 200 and body["tokens"] == lm.encode("Hello, world") and body["count"] == len(body["tokens"])
    assert "".join(body["token_strs"]) == "Hello, world" and body["max_model_len"] == 512
    assert call(server, "/detokenize", {"tokens": body["tokens"]})[1] == {"prompt": "Hello, world"}
    messages = [{"role": "user", "content": "Speak."}]
    chat = call(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1})[1]
    assert call(server, "/tokenize", {"messages": messages})[1]["count"] == chat["usage"]["prompt_tokens"]
    status, info = call(server, "/tokenizer_info")
    assert status == 200 and info["eos_token"] == "<|endoftext|>" and info["model_max_length"] == 512


def test_lm_eval_scores_through_the_server(server, lm):
    """lm-evaluation-harness's `local-completions` backend, with the tokenizer it finds on the server, gives
    neolm's own log-likelihoods and greedy text."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    api = LocalCompletionsAPI(base_url=url(server, "/v1/completions"), model=NAME, max_retries=1)
    assert api.tokenizer_backend == "remote"
    requests = [("To be, or not to be,", " that is the question"), ("KING.", " Speak"), ("Good", " morrow, my lord")]
    got = api.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)])
    want = loglikelihoods(lm.model, [(lm.encode(c), lm.encode(x)) for c, x in requests])
    assert [g for _, g in got] == [g for _, g in want]
    assert [lp for lp, _ in got] == pytest.approx([lp for lp, _ in want], abs=1e-4)
    (text,) = api.generate_until([Instance("generate_until", {}, ("KING.", {"until": ["QUEEN"], "max_gen_toks": 24}), 0)])
    assert text == greedy(lm, "KING.", 24).split("QUEEN")[0]


@pytest.mark.parametrize(
    "path, body, status, words",
    [
        ("/v1/completions", b"{not json", 400, ["not JSON"]),
        ("/v1/completions", [1, 2], 400, ["JSON object"]),
        ("/v1/completions", {"prompt": "a", "max_tokens": 5000}, 400, ["context of 512", "max_tokens"]),
        ("/v1/completions", {"prompt": "a", "max_tokens": -1}, 400, ["'max_tokens' must be >= 0"]),
        ("/v1/completions", {"prompt": "a", "temperature": "hot"}, 400, ["'temperature' must be"]),
        ("/v1/completions", {"prompt": "a", "logprobs": 21}, 400, ["'logprobs' must be between 0 and 20"]),
        ("/v1/completions", {"prompt": "a", "logprobs": True}, 400, ["'logprobs' must be an integer"]),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
         ["needs 'logprobs': true"]),
        ("/tokenize", {"text": "a"}, 400, ["unrecognized", "text"]),
        ("/detokenize", {"tokens": [1, -5]}, 400, ["outside the model's vocabulary"]),
        ("/v1/completions", {"prompt": "a", "presence_penalty": 3}, 400, ["'presence_penalty' must be between -2 and 2"]),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"abc": 1}}, 400, ["'logit_bias' maps token ids"]),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"5": 101}}, 400, ["between -100 and 100"]),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"99999999": 5}}, 400, ["outside the model's vocabulary"]),
        ("/v1/completions", {"prompt": "a", "min_p": 2}, 400, ["'min_p' must be in [0, 1]"]),
        ("/v1/completions", {"prompt": "a", "n": 2, "temperature": 0}, 400, ["needs sampling"]),
        ("/v1/completions", {"prompt": "a", "best_of": 2, "temperature": 0}, 400, ["'best_of' > 1 needs sampling"]),
        ("/v1/completions", {"prompt": "a", "n": 3, "best_of": 2}, 400, ["'best_of' must be between n (3) and 128"]),
        ("/v1/completions", {"prompt": "a", "best_of": 2, "stream": True}, 400, ["cannot be streamed"]),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "best_of": 2}, 400, ["best_of"]),
        ("/v1/completions", {"prompt": "a", "bogus": 1}, 400, ["unrecognized", "bogus"]),
        ("/v1/completions", {"prompt": [[1, 99999999]]}, 400, ["outside the model's vocabulary"]),
        ("/v1/completions", {"prompt": "a", "model": "gpt-4"}, 404, ["'gpt-4' does not exist", NAME]),
        ("/v1/chat/completions", {"messages": []}, 400, ["'messages'"]),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, ["role must be"]),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{}]}, 400, ["tools"]),
        ("/v1/images/generations", {"prompt": "a"}, 404, ["no route"]),
        ("/v1/completions", {"prompt": "a", "stop_token_ids": [99999999]}, 400, ["'stop_token_ids' must be a list"]),
        ("/v1/completions", {"prompt": "a", "allowed_token_ids": []}, 400, ["'allowed_token_ids' must not be empty"]),
        ("/v1/completions", {"prompt": "a", "bad_words": [3]}, 400, ["'bad_words' must be a list of non-empty"]),
        ("/v1/completions", {"prompt": "a", "truncate_prompt_tokens": 0}, 400, ["'truncate_prompt_tokens' must be"]),
        ("/v1/completions", {"prompt": "a", "ignore_eos": "yes"}, 400, ["'ignore_eos' must be a bool"]),
    ],
)
def test_bad_requests_get_openai_errors(server, path, body, status, words):
    got, answer = call(server, path, body)
    assert got == status, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    for word in words:
        assert word in answer["error"]["message"], answer
    assert call(server, "/health")[0] == 200  # still serving


def test_openai_client(server, lm):
    openai = pytest.importorskip("openai", reason="the openai client is a test extra")
    client = openai.OpenAI(base_url=url(server, "/v1"), api_key="unused")
    assert [m.id for m in client.models.list()] == [NAME]
    completion = client.completions.create(model=NAME, prompt="KING.", max_tokens=16, temperature=0)
    assert completion.choices[0].text == greedy(lm, "KING.", 16)
    pieces = client.completions.create(model=NAME, prompt="KING.", max_tokens=16, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in pieces) == greedy(lm, "KING.", 16)
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Speak."}], max_tokens=12,
                                          seed=3)  # fmt: skip
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 12
    scored = client.completions.create(model=NAME, prompt="KING.", max_tokens=4, temperature=0, logprobs=2)
    assert len(scored.choices[0].logprobs.token_logprobs) == 4 and len(scored.choices[0].logprobs.top_logprobs[0]) >= 2
    chat = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Speak."}], max_tokens=3,
                                          logprobs=True, top_logprobs=1)  # fmt: skip
    assert len(chat.choices[0].logprobs.content) == chat.usage.completion_tokens
    with pytest.raises(openai.BadRequestError, match="context of 512"):
        client.completions.create(model=NAME, prompt="KING.", max_tokens=4096)


def test_api_key(lm):
    server = Server(lm, port=0, model_name=NAME, api_key="sesame")
    server.start()
    try:
        status, answer = call(server, "/v1/models")
        assert status == 401 and "API key" in answer["error"]["message"]
        assert call(server, "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(server, "/v1/models", headers={"Authorization": "Bearer sesame"})[0] == 200
    finally:
        server.close()


def test_serve_command(tmp_path):
    """`neolm serve --port 0` starts, says where, answers, and stops on SIGINT."""
    process = subprocess.Popen([sys.executable, "-m", "neolm.cli", "serve", "--port", "0", "--max-batch", "4"],
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = process.stderr.readline()
        match = re.search(r"neo-shakespeare on http://127\.0\.0\.1:(\d+)/v1", line)
        assert match, line
        request = urllib.request.Request(f"http://127.0.0.1:{match[1]}/v1/completions",
                                         json.dumps({"prompt": "KING.", "max_tokens": 5}).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as response:
            assert json.loads(response.read())["usage"]["completion_tokens"] == 5
        process.send_signal(2)
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()


@pytest.mark.parametrize("limit", [None, "0"], ids=["no-limit", "shutdown-timeout-0"])
def test_serve_command_answers_the_requests_it_took_on_sigterm(limit):
    """On SIGTERM (docker stop, systemd, Kubernetes) `neolm serve` answers the requests it has taken to the end,
    a stream in progress and a request queued behind it, then exits 0. With --shutdown-timeout, those still
    unanswered when it passes end with a 503: the stream's error event, the queued request's status."""
    process = subprocess.Popen([sys.executable, "-m", "neolm.cli", "serve", "--port", "0", "--max-batch", "1",
                                *(["--shutdown-timeout", limit] if limit else [])],
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        port = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", process.stderr.readline())[1]
        base, got, streaming = f"http://127.0.0.1:{port}", {}, threading.Event()

        def ask(key: str, body: dict) -> None:
            request = urllib.request.Request(f"{base}/v1/completions", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    lines = []
                    for line in response:
                        lines.append(line.decode())
                        streaming.set()
                    got[key] = "".join(lines)
            except urllib.error.HTTPError as e:
                got[key] = e

        greedy = {"prompt": "KING.", "temperature": 0}
        n = 400 if limit else 60  # (with the limit: still streaming when it passes)
        clients = [threading.Thread(target=ask, args=("stream", greedy | {"max_tokens": n, "min_tokens": n,
                                                                          "stream": True}))]  # fmt: skip
        clients[0].start()
        assert streaming.wait(60)
        clients.append(threading.Thread(target=ask, args=("queued", greedy | {"max_tokens": 8, "min_tokens": 8})))
        clients[1].start()
        for _ in range(600):  # until the second waits for the first (max-batch 1)
            with urllib.request.urlopen(f"{base}/metrics", timeout=60) as response:
                if re.search(r"neolm:num_requests_waiting\{[^}]*\} 1", response.read().decode()):
                    break
            time.sleep(0.01)
        else:
            pytest.fail("the second request never waited")
        process.send_signal(15)
        for client in clients:
            client.join(120)
        assert process.wait(timeout=60) == 0
        log = process.stderr.read()
    finally:
        process.kill()
    chunks = [json.loads(line[6:]) for line in got["stream"].splitlines() if line.startswith("data: {")]
    assert got["stream"].rstrip().endswith("data: [DONE]")
    if limit is None:
        assert "every request answered" in log
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert json.loads(got["queued"])["usage"]["completion_tokens"] == 8
    else:
        assert "--shutdown-timeout ended 2 requests unanswered" in log
        assert chunks[-1]["error"]["code"] == 503 and chunks[-2]["choices"][0]["finish_reason"] is None
        assert got["queued"].code == 503 and "shutdown timeout" in got["queued"].read().decode()


def test_a_draining_server_refuses_new_requests_and_answers_those_it_took(lm):
    """Server.drain(): the jobs taken run to the end, a queued one too; meanwhile /health answers 503 "shutting
    down" and a new request on a connection already open gets 503, each the connection's last answer; drain
    returns once all are answered."""
    server = Server(lm, port=0, model_name=NAME, max_batch=1)
    server.start()
    try:
        opened = [http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60) for _ in range(2)]
        for connection in opened:  # before the drain, kept open
            connection.request("GET", "/health")
            response = connection.getresponse()
            assert response.status == 200 and response.read()
        gc = neolm.GenerationConfig(max_new_tokens=40, min_new_tokens=40, do_sample=False)
        prompt = lm.tokenizer.encode("KING.")
        jobs = [server.engine.submit([prompt], gc), server.engine.submit([prompt], gc)]  # the second waits
        draining = threading.Thread(target=server.drain)
        draining.start()
        while not server.draining:
            time.sleep(0.01)
        opened[0].request("GET", "/health")
        health = opened[0].getresponse()
        assert health.status == 503 and json.loads(health.read())["status"] == "shutting down"
        assert health.will_close  # (Connection: close: each connection's last answer)
        opened[1].request("POST", "/v1/completions", json.dumps({"prompt": "KING.", "max_tokens": 3}),
                          {"Content-Type": "application/json"})  # fmt: skip
        refused = opened[1].getresponse()
        assert refused.status == 503 and "shutting down" in json.loads(refused.read())["error"]["message"]
        assert_port_closed(server)
        draining.join(120)
        assert not draining.is_alive() and server.answering == 0
        assert [[e.tokens for e in job if isinstance(e, End)] for job in jobs] == [[40], [40]]
        with pytest.raises(NeolmError, match="shutting down"):
            server.engine.submit([prompt], gc)
    finally:
        server.close()


def assert_port_closed(server) -> None:
    """A draining server's port refuses new connections (soon after the drain began: its accept loop ends
    first), rather than leaving them waiting in the backlog."""
    port = server.server_address[1]
    for _ in range(200):
        if server.socket.fileno() == -1:
            break
        time.sleep(0.01)
    with pytest.raises(ConnectionError):
        fresh = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        fresh.request("GET", "/health")
        fresh.getresponse()


def test_a_drain_whose_time_runs_out_ends_the_answers_left_with_503(lm):
    """Server.drain(timeout): requests still unanswered when the time is up are ended, a stream with an error event
    (code 503, naming the timeout) and [DONE], a whole answer with a 503; drain returns False and the engine counts
    them as stopped."""
    server = Server(lm, port=0, model_name=NAME, max_batch=1)
    server.start()
    try:
        stream = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
        stream.request("POST", "/v1/completions", json.dumps({"prompt": "KING.", "max_tokens": 400, "min_tokens": 400,
                       "temperature": 0, "stream": True}), {"Content-Type": "application/json"})  # fmt: skip
        streamed = stream.getresponse()
        assert streamed.status == 200
        first = streamed.readline()  # its first chunk: the job runs
        assert first.startswith(b"data: ")
        whole = {}
        waiting = threading.Thread(target=lambda: whole.update(answer=call(server, "/v1/completions", {
            "prompt": "KING.", "max_tokens": 20, "temperature": 0})))  # fmt: skip
        waiting.start()
        while server.engine.waiting < 1:  # queued behind the stream (max_batch 1)
            time.sleep(0.01)
        assert server.drain(timeout=0) is False
        payloads = events((first + streamed.read()).decode())
        texts = [p["choices"][0]["text"] for p in payloads[:-1]]
        assert 0 < len("".join(texts)) and all(p["choices"][0]["finish_reason"] is None for p in payloads[:-1])
        assert payloads[-1]["error"]["code"] == 503 and "shutdown timeout of 0 s" in payloads[-1]["error"]["message"]
        waiting.join(60)
        status, body = whole["answer"]
        assert status == 503 and "shutdown timeout" in body["error"]["message"]
        assert server.engine.stopped == 2 and server.answering == 0
        assert_port_closed(server)
    finally:
        server.close()


def test_metrics_count_tokens_requests_and_latencies(server, lm):
    """GET /metrics: Prometheus' text format with vLLM's names (neolm: for vllm:), counting what was served."""

    def scrape() -> dict[str, float]:
        status, text = call(server, "/metrics")
        assert status == 200
        samples = {}
        for line in text.splitlines():
            if not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                samples[re.sub(r'model_name="[^"]*",?', "", name).replace("{}", "")] = float(value)
        return samples

    before = scrape()
    prompt = "KING. Speak"
    status, body = call(server, "/v1/completions", {"prompt": [prompt, "Ay"], "max_tokens": 5, "min_tokens": 5,
                                                    "temperature": 0})  # fmt: skip
    after = scrape()
    assert status == 200

    def grew(name: str) -> float:
        return after[name] - before.get(name, 0)

    assert grew("neolm:generation_tokens_total") == 10 == body["usage"]["completion_tokens"]
    assert grew("neolm:prompt_tokens_total") == len(lm.encode(prompt)) + len(lm.encode("Ay"))
    assert grew('neolm:request_success_total{finished_reason="length"}') == 2
    assert grew("neolm:time_to_first_token_seconds_count") == grew("neolm:e2e_request_latency_seconds_count") == 1
    assert grew('neolm:e2e_request_latency_seconds_bucket{le="+Inf"}') == 1
    assert 0 < grew("neolm:time_to_first_token_seconds_sum") <= grew("neolm:e2e_request_latency_seconds_sum")
    assert after["neolm:num_requests_running"] == after["neolm:num_requests_waiting"] == 0


def _open(server, path: str, method: str, headers: dict, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url(server, path), data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers)


def test_browser_pages_of_allowed_origins_may_call_the_api(server, lm):
    preflight = {"Origin": "http://a.org", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type, authorization"}  # fmt: skip
    status, headers = _open(server, "/v1/chat/completions", "OPTIONS", preflight)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*", headers  # any origin, by default
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "content-type, authorization"
    body = {"prompt": "x", "max_tokens": 1}
    assert _open(server, "/v1/completions", "POST", {"Origin": "http://a.org"}, body)[1][
        "Access-Control-Allow-Origin"] == "*"  # fmt: skip
    assert "Access-Control-Allow-Origin" not in _open(server, "/v1/completions", "POST", {}, body)[1]
    assert call(server, "/version") == (200, {"version": neolm.__version__})
    strict = Server(lm, port=0, api_key="sesame", allowed_origins=("http://a.org",))
    strict.start()
    try:
        status, headers = _open(strict, "/v1/completions", "OPTIONS", preflight)  # no key with a preflight
        assert status == 200 and headers["Access-Control-Allow-Origin"] == "http://a.org"
        assert headers["Vary"] == "Origin"
        status, headers = _open(strict, "/v1/completions", "OPTIONS", preflight | {"Origin": "http://b.org"})
        assert status == 403 and "Access-Control-Allow-Origin" not in headers
        status, headers = _open(strict, "/v1/completions", "POST", {"Origin": "http://a.org"}, body)
        assert status == 401 and headers["Access-Control-Allow-Origin"] == "http://a.org"  # the page reads the error
    finally:
        strict.close()

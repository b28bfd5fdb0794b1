"""Speculative decoding in the server (neolm.serve.speculation, DecodeBatch.steps): a sequence decoding alone gets
its tokens a round at a time, the same tokens (and log-probabilities, ends, penalties) as without; a batch of
several steps as before; vLLM's --speculative-config is read and checked."""

from __future__ import annotations

import json
import math
import urllib.request

import pytest
from test_speculative import LOOP, count_forwards

import neolm
from neolm.errors import NeolmError
from neolm.generate import DecodeBatch
from neolm.serve.engine import End, Engine, Token
from neolm.serve.http import Server
from neolm.serve.speculation import Speculation, guesser

NGRAM = Speculation("ngram", 5, prompt_lookup_max=3)


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    return {name: neolm.load(folder) for name, (_, folder) in tiny_checkpoints.items()}


def run(lm, prompts, guess=None, logprobs=None, **knobs):
    """Each sequence's tokens (and (logprob, top) per token with `logprobs`), its end, and the engine's metrics,
    from an engine of its own (with `guess`: speculating)."""
    engine = Engine(lm, guesser=guess)
    engine.start()
    try:
        job = engine.submit(prompts, lm.generation_config(**knobs), logprobs)
        tokens, scores, ends = {}, {}, {}
        for event in job:
            if isinstance(event, Token):
                tokens.setdefault(event.sequence, []).append(event.token)
                scores.setdefault(event.sequence, []).append((event.logprob, event.top))
            elif isinstance(event, End):
                ends[event.sequence] = (event.reason, event.tokens)
    finally:
        engine.close()
    return tokens, scores, ends, engine.metrics


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_ngram_rounds_give_the_plain_greedy_tokens(models, name):
    """Past GPT-Neo's local window (8 here) and with processors that read the history (the tables of tokens
    seen and made, which a round fills for every token it keeps): the engine's plain tokens, generate()'s with
    prompt lookup, in fewer forwards than tokens."""
    lm = models[name]
    cases = [{}, {"repetition_penalty": 1.3}, {"presence_penalty": 0.5, "frequency_penalty": 0.3},
             {"no_repeat_ngram_size": 4, "min_new_tokens": 30}]  # fmt: skip
    kept, rounds = [], []
    for knobs in cases:
        plain, _, plain_ends, _ = run(lm, [LOOP], max_new_tokens=40, do_sample=False, **knobs)
        with count_forwards(lm.model) as calls:
            ours, _, ends, metrics = run(
                lm, [LOOP], guesser(NGRAM, lm, paced=False), max_new_tokens=40, do_sample=False, **knobs
            )
        assert ours == plain and ends == plain_ends, knobs
        ref = lm.generate_ids([LOOP], max_new_tokens=40, do_sample=False, prompt_lookup_num_tokens=5,
                              max_matching_ngram_size=3, **knobs)[0]  # fmt: skip
        assert ours[0] == ref, knobs
        assert 0 <= metrics.spec_accepted <= metrics.spec_draft_tokens, knobs
        # the prompt's forward gives the first token; every later forward (a round, or a step where nothing was
        # guessed) one more and the guesses it kept
        assert ends[0] == ("length", 40) and len(calls) - 1 == 39 - metrics.spec_accepted, knobs
        assert len(calls[1:]) >= metrics.spec_drafts == sum(n > 1 for n in calls[1:]), knobs
        kept.append(metrics.spec_accepted)
        rounds.append(metrics.spec_drafts)
    assert sum(rounds) >= 5, rounds
    if name == "neox-parallel-pct25":  # these random weights' text repeats itself: guesses were kept
        assert max(kept) >= 3, kept


def test_a_round_ends_where_plain_decoding_ends(models):
    """A draft model that is the model itself: every guess kept, so rounds make 6 tokens; a stop string, an eos
    token or the token budget that falls inside a round ends the sequence there, with the same reason."""
    lm = models["neox-parallel-pct25"]
    draft = guesser(Speculation("draft_model", 5, "self"), lm, lm, paced=False)
    free, _, _, _ = run(lm, [LOOP], max_new_tokens=30, do_sample=False)
    free = free[0]
    stop = lm.tokenizer.decode(free[:10])[-3:]  # text that ends inside token 10 (or before)
    cases = [{"max_new_tokens": 13}, {"max_new_tokens": 30, "stop_strings": [stop]},
             {"max_new_tokens": 30, "eos_token_id": free[8]}, {"max_new_tokens": 30, "min_new_tokens": 12, "eos_token_id": free[8]}]  # fmt: skip
    seen = []
    for knobs in cases:
        plain, _, plain_ends, _ = run(lm, [LOOP], do_sample=False, **knobs)
        ours, _, ends, metrics = run(lm, [LOOP], draft, do_sample=False, **knobs)
        assert ours == plain and ends == plain_ends, knobs
        assert metrics.spec_accepted == metrics.spec_draft_tokens > 0, knobs  # (the model guesses itself)
        seen.append(ends[0])
    assert seen[0] == ("length", 13) and seen[1][0] == seen[2][0] == "stop" and seen[1][1] <= 10 and seen[2][1] <= 9


def test_log_probabilities_are_those_of_plain_steps(models):
    lm = models["neo"]
    plain, plain_scores, _, _ = run(lm, [LOOP], logprobs=3, max_new_tokens=24, do_sample=False)
    ours, scores, _, metrics = run(lm, [LOOP], guesser(Speculation("draft_model", 4, "self"), lm, lm, paced=False), logprobs=3,
                                   max_new_tokens=24, do_sample=False)  # fmt: skip
    assert ours == plain and metrics.spec_accepted > 0
    for (p, top), (q, top_q) in zip(plain_scores[0], scores[0]):
        assert math.isclose(p, q, abs_tol=1e-4)
        assert [t for t, _ in top] == [t for t, _ in top_q]
        assert all(math.isclose(a, b, abs_tol=1e-4) for (_, a), (_, b) in zip(top, top_q))


def test_a_draft_model_of_another_tokenizer_guesses_through_text(models):
    """GPT-Neo (GPT-2's tokenizer) drafting for a Pythia (GPT-NeoX's): the Pythia's greedy tokens."""
    lm, draft = models["neox-parallel-pct25"], models["neo"]
    assert not lm.tokenizer.same_vocabulary(draft.tokenizer)
    prompt = [lm.tokenizer.encode("KING. Long live the king! KING. Long live the king! KING.")]
    plain, _, _, _ = run(lm, prompt, max_new_tokens=24, do_sample=False)
    ours, _, _, metrics = run(lm, prompt, guesser(Speculation("draft_model", 4, "neo"), lm, draft, paced=False), max_new_tokens=24,
                              do_sample=False)  # fmt: skip
    assert ours == plain and metrics.spec_drafts > 0


def test_rounds_stop_while_others_decode_and_resume_when_alone(models):
    """A DecodeBatch with a guesser: a sequence alone goes a round at a time; one that joins it makes the batch
    step a token at a time; once the newcomer ends, the first goes on in rounds. Both get their plain tokens."""
    lm = models["neo"]
    other = [5, 17, 300, 9, 9, 41]
    gc_a, gc_b = (lm.generation_config(max_new_tokens=n, do_sample=False) for n in (60, 12))
    alone_a, alone_b = (
        lm.generate_ids([p], max_new_tokens=n, do_sample=False)[0] for p, n in ((LOOP, 60), (other, 12))
    )
    batch = DecodeBatch(
        lm.model, lm.tokenizer.decode, guesser=guesser(Speculation("draft_model", 3, "self"), lm, lm, paced=False)
    )
    (a,) = batch.add([LOOP], gc_a)
    got, sizes = {}, []

    def advance() -> None:
        steps = batch.steps()
        sizes.append(len(steps))
        for step in steps:
            for i, token in zip(step.ids, step.tokens):
                if token is not None:
                    got.setdefault(i, []).append(token)

    for _ in range(4):
        advance()
    (b,) = batch.add([other], gc_b)
    while b not in got or len(got[b]) < 12:
        advance()
    while not batch.finished:
        advance()
    assert got[a] == alone_a and got[b] == alone_b
    # the first step (the prompt's logits) is one token; then rounds of 4 (3 guesses, the model's own, all kept),
    # single steps while two decode, and rounds again after
    assert sizes[1:4] == [4, 4, 4] and sizes[4:16] == [1] * 12 and max(sizes[16:]) == 4
    assert batch.kept == batch.guessed > 0


def test_sampling_speculates_and_seeded_sampling_does_not(models):
    lm = models["neox-parallel-pct25"]
    draft = guesser(Speculation("draft_model", 4, "self"), lm, lm, paced=False)
    ours, _, ends, metrics = run(lm, [LOOP], draft, max_new_tokens=30, do_sample=True, temperature=0.7)
    assert len(ours[0]) == 30 and ends[0] == ("length", 30) and metrics.spec_drafts > 0
    seeded, _, _, metrics = run(lm, [LOOP], draft, max_new_tokens=30, do_sample=True, temperature=0.7, seed=3)
    assert metrics.spec_drafts == 0
    assert seeded[0] == lm.generate_ids([LOOP], max_new_tokens=30, do_sample=True, temperature=0.7, seed=3)[0]


def test_structured_outputs_speculate(lm):
    """The bundled model with a JSON schema, ngram guesses (the automaton's state is followed through each
    position's own history): the tokens of plain decoding, and valid JSON."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "lines": {"type": "array", "items": {"type": "integer"}}},
              "required": ["name", "lines"]}  # fmt: skip
    prompt = [lm.tokenizer.encode("KING. Speak, and say thy name. KING. Speak!\n")]
    knobs = {"max_new_tokens": 60, "do_sample": False, "structured_outputs": {"json": schema}}
    plain, _, _, _ = run(lm, prompt, **knobs)
    ours, _, _, metrics = run(lm, prompt, guesser(NGRAM, lm, paced=False), **knobs)
    assert ours == plain and metrics.spec_drafts > 0
    assert set(json.loads(lm.tokenizer.decode(ours[0]))) == {"name", "lines"}


def test_the_prefix_cache_keeps_what_a_speculating_sequence_read(lm):
    """A chat's second turn, from the prefix cache of a first turn that ended inside a round: the tokens of the
    second turn without either."""
    from neolm.serve.engine import Engine as E

    prompt = lm.tokenizer.encode("KING. Long live the king! KING. Long live the king! KING.")
    gc = lm.generation_config(max_new_tokens=23, do_sample=False)
    engine = E(lm, prefix_cache_mb=64, guesser=guesser(NGRAM, lm, paced=False))
    engine.start()
    try:
        first = [e.token for e in engine.submit([prompt], gc) if isinstance(e, Token)]
        follow = prompt + first + lm.tokenizer.encode("\nQUEEN.")
        second = [e.token for e in engine.submit([follow], gc) if isinstance(e, Token)]
        cached = engine.metrics.prefix_hits
    finally:
        engine.close()
    assert cached >= len(prompt) + len(first) - 1
    assert engine.metrics.spec_drafts > 0
    assert second == lm.generate_ids([follow], max_new_tokens=23, do_sample=False)[0]


def test_the_server_speculates_and_counts_it(lm):
    server = Server(lm, port=0, guesser=guesser(NGRAM, lm, paced=False))
    server.start()
    try:
        host, port = server.server_address[:2]
        url = f"http://{host}:{port}"
        body = {"prompt": "KING. Long live the king! KING. Long live the king! KING.", "max_tokens": 40,
                "temperature": 0}  # fmt: skip
        request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request) as answer:
            text = json.load(answer)["choices"][0]["text"]
        with urllib.request.urlopen(f"{url}/metrics") as answer:
            metrics = answer.read().decode()
    finally:
        server.close()
    assert text == lm.generate(body["prompt"], max_new_tokens=40, do_sample=False)
    counts = {
        line.split("{")[0]: float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("neolm:spec")
    }
    assert counts["neolm:spec_decode_num_drafts_total"] > 0
    assert (
        0 <= counts["neolm:spec_decode_num_accepted_tokens_total"] <= counts["neolm:spec_decode_num_draft_tokens_total"]
    )


@pytest.mark.parametrize(
    "text, message",
    [
        ("{", "not JSON"),
        ("[1]", "JSON object"),
        ('{"method": "eagle", "num_speculative_tokens": 3}', "method must be one of"),
        ('{"method": "ngram"}', "num_speculative_tokens"),
        ('{"method": "ngram", "num_speculative_tokens": 0}', "integer >= 1"),
        ('{"method": "ngram", "num_speculative_tokens": true}', "integer >= 1"),
        ('{"method": "ngram", "num_speculative_tokens": 3, "model": "x"}', "takes no model"),
        ('{"method": "draft_model", "num_speculative_tokens": 3}', 'needs "model"'),
        ('{"model": "x", "num_speculative_tokens": 3, "prompt_lookup_max": 2}', "for the ngram method"),
        ('{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 4, "prompt_lookup_max": 2}', "<="),
        ('{"method": "ngram", "num_speculative_tokens": 3, "disable_by_batch_size": 4}', "not supported"),
    ],
)
def test_bad_speculative_configs_are_refused(text, message):
    with pytest.raises(NeolmError, match=message):
        Speculation.parse(text)


def test_speculative_configs_read_as_vllm_s():
    assert Speculation.parse('{"model": "EleutherAI/pythia-70m", "num_speculative_tokens": 4}') == Speculation(
        "draft_model", 4, "EleutherAI/pythia-70m")  # fmt: skip
    spec = Speculation.parse('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}')
    assert (spec.prompt_lookup_max, spec.prompt_lookup_min) == (4, 1)
    assert (
        Speculation.parse('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_min": 7}').prompt_lookup_max
        == 7
    )


def test_neolm_batch_speculates(tmp_path, capsys):
    from neolm.cli import main

    requests = tmp_path / "in.jsonl"
    body = {"prompt": "KING. Long live the king! KING. Long live the king! KING.", "max_tokens": 30, "temperature": 0}
    requests.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["batch", str(requests), str(out), "--speculative-config",
                 '{"method": "ngram", "num_speculative_tokens": 4}']) == 0  # fmt: skip
    assert "speculative decoding while one sequence decodes: ngram" in capsys.readouterr().err
    answer = json.loads(out.read_text())["response"]["body"]["choices"][0]["text"]
    assert answer == neolm.load().generate(body["prompt"], max_new_tokens=30, do_sample=False)
    assert main(["batch", str(requests), str(tmp_path / "x.jsonl"), "--speculative-config", '{"method": "x"}']) == 1
    assert "method must be one of" in capsys.readouterr().err


def test_rounds_wait_while_they_cost_more_than_steps():
    """_Paced times rounds and steps per token made (from one guess() to the next): while a round's tokens cost more
    than a step's it steps, with a round every PROBE_EVERY steps; once rounds pay again it guesses every time. Time
    that other sequences' steps took (more tokens than the call could make) is not counted; nor is the first round."""
    from neolm.serve.speculation import PROBE_EVERY, _Paced

    class Fixed:
        def guess(self, seq, limit):
            return [7] * min(limit, 3), None

        def update(self, kept, guessed):
            pass

    now = [0.0]
    paced = _Paced(Fixed(), clock=lambda: now[0])
    seq = [1] * 5
    log = []

    def call(round_s: float, kept: int = 0, step_s: float = 1.0) -> None:
        """A guess(), then what the engine does with it: a round of its kept guesses and one more token, at round_s
        a token, or a step of one token at step_s."""
        guesses, _ = paced.guess(seq, 10)
        made = kept + 1 if guesses else 1
        log.append(bool(guesses))
        seq.extend([2] * made)
        now[0] += (round_s if guesses else step_s) * made

    for _ in range(3 + 2 * (PROBE_EVERY + 1)):  # rounds at 3 s a token, steps at 1 s
        call(3.0)
    # the first round (not timed), the second (timed), a step (timed once rounds were), then a round as a probe
    # after every PROBE_EVERY steps
    assert log[:2] == [True, True]
    assert log[2:] == ([False] * PROBE_EVERY + [True]) * 2 + [False], log
    for _ in range(3 * (PROBE_EVERY + 1)):  # rounds that keep their 3 guesses, at 0.5 s a token: once the probes'
        call(0.5, kept=3)  # times outweigh the old ones in the decayed sums, a round every time
    assert log[-PROBE_EVERY:] == [True] * PROBE_EVERY, log
    seq.extend([2] * 50)  # other sequences ran between two calls (50 tokens, 1000 s): not this one's time
    now[0] += 1000.0
    for _ in range(3):
        call(0.5, kept=3)
    assert log[-3:] == [True] * 3
    assert _Paced(Fixed(), context=12).guess([1] * 10, 10)[0] == [7, 7]  # 12 - 10 tokens of the draft's context
    assert _Paced(Fixed(), context=12).guess([1] * 12, 10)[0] == []


def test_paced_rounds_give_the_same_tokens(lm):
    """The bundled model (a step costs little more than its Python): paced rounds stand aside for steps and come
    back as probes; whatever they choose, the tokens are plain decoding's."""
    prompt = [lm.tokenizer.encode("KING. Long live the king! KING. Long live the king! KING.")]
    plain, _, _, _ = run(lm, prompt, max_new_tokens=80, do_sample=False)
    ours, _, _, metrics = run(lm, prompt, guesser(NGRAM, lm), max_new_tokens=80, do_sample=False)
    assert ours == plain and metrics.spec_drafts >= 1

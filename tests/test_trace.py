"""neolm.trace: hidden states, attention weights, logits and token log-probabilities as transformers gives them
(output_hidden_states / output_attentions, eager attention, fp32), and `neolm score`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file
from test_cli import assert_one_line_error, cli

import neolm
from neolm.errors import NeolmError

TOL = 1e-4  # as tests/test_parity.py


def random_ids(rows: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 50257, (rows, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    """name -> (transformers model, neolm LanguageModel) for every TINY config."""
    return {
        name: (hf, neolm.load(folder, dtype="float32", device="cpu")) for name, (hf, folder) in tiny_checkpoints.items()
    }


@pytest.mark.parametrize("name", list(TINY))
def test_everything_matches_transformers(models, name):
    hf, lm = models[name]
    ids = random_ids(2, 30)  # 30 tokens > GPT-Neo's local window of 8
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True, output_attentions=True)
    traces = lm.trace_ids(ids.tolist(), output_hidden_states=True, output_attentions=True)
    n_layer = lm.config.n_layer
    for row, trace in enumerate(traces):
        assert trace.tokens == ids[row].tolist()
        assert len(trace.hidden_states) == n_layer + 1 and len(trace.attentions) == n_layer
        assert trace.hidden_states[0].shape == (30, lm.config.d_model)
        assert trace.attentions[0].shape == (lm.config.n_head, 30, 30)
        assert max_diff(trace.hidden_states, [h[row] for h in ref.hidden_states]) <= TOL
        assert max_diff(trace.attentions, [a[row] for a in ref.attentions]) <= TOL
        assert (trace.logits - ref.logits[row]).abs().max().item() <= TOL
        expected = torch.log_softmax(ref.logits[row, :-1], -1).gather(1, ids[row, 1:, None])[:, 0]
        assert (trace.token_logprobs - expected).abs().max().item() <= TOL
        # logit lens of the last hidden state: the logits
        assert (lm.model.lm_head(trace.hidden_states[-1]) - trace.logits).abs().max().item() <= TOL


HF_PARTS = {"neo": ("transformer.h.{}.mlp", "transformer.h.{}.attn"),
            "neox-parallel-pct25": ("gpt_neox.layers.{}.mlp", "gpt_neox.layers.{}.attention")}  # fmt: skip


@pytest.mark.parametrize("name", list(HF_PARTS))
def test_module_outputs_match_transformers(models, name):
    """modules= records each named module's output, as hooks on transformers' modules see them: the MLP's own
    output, which the model adds the attention and the residual into in place unless a hook watches it."""
    hf, lm = models[name]
    ids = random_ids(2, 20, seed=4)
    seen = {}
    handles = []
    named = dict(hf.named_modules())

    def keep(key):
        return lambda module, args, out: seen.__setitem__(key, out[0] if isinstance(out, tuple) else out)

    for i in range(lm.config.n_layer):
        for kind, pattern in zip(("mlp", "attn"), HF_PARTS[name]):
            handles.append(named[pattern.format(i)].register_forward_hook(keep(f"blocks.{i}.{kind}")))
    with torch.no_grad():
        hf(ids)
    for handle in handles:
        handle.remove()
    traces = lm.trace_ids(ids.tolist(), modules=["blocks.*.mlp", "blocks.*.attn"])
    for row, trace in enumerate(traces):
        assert set(trace.records) == set(seen)
        for key, out in trace.records.items():
            assert out.shape == (20, lm.config.d_model)
            assert (out - seen[key][row]).abs().max().item() <= TOL, key
    one = lm.trace_ids(ids.tolist(), modules="blocks.0.attn.qkv")[0]
    assert list(one.records) == ["blocks.0.attn.qkv"] and one.records["blocks.0.attn.qkv"].shape == (
        20,
        3 * lm.config.d_model,
    )
    with pytest.raises(NeolmError, match="blocks.0.mlp.fc"):
        lm.trace_ids(ids.tolist(), modules=["blocks.*.ffn"])


def test_local_layers_weigh_only_their_window(models):
    _, lm = models["neo"]
    trace = lm.trace_ids(random_ids(1, 20).tolist(), output_attentions=True)[0]
    window = TINY["neo"]["window_size"]
    for layer, weights in zip(lm.model.blocks, trace.attentions):
        assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[:2]))  # each query's weights sum to 1
        assert (weights.triu(1) == 0).all()  # nothing from the future
        if layer.window is not None:
            assert layer.window == window
            assert (weights.tril(-layer.window) == 0).all()  # nothing from before the window
            assert (weights.diagonal(-(window - 1), 1, 2) > 0).all()  # query i sees key i - w + 1


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_padded_batches_give_each_sequence_its_own_numbers(models, name):
    _, lm = models[name]
    ids = random_ids(3, 24, seed=5).tolist()
    seqs = [ids[0][:7], ids[1], ids[2][:15]]
    together = lm.trace_ids(seqs, output_hidden_states=True, output_attentions=True)
    split = lm.trace_ids(seqs, output_hidden_states=True, output_attentions=True, batch_size=2)
    for i, seq in enumerate(seqs):
        alone = lm.trace_ids([seq], output_hidden_states=True, output_attentions=True)[0]
        for other in (together[i], split[i]):
            assert other.tokens == seq
            assert len(other.token_logprobs) == len(seq) - 1
            assert max_diff(other.hidden_states, alone.hidden_states) <= TOL
            assert max_diff(other.attentions, alone.attentions) <= TOL
            assert (other.logits - alone.logits).abs().max().item() <= TOL


def test_without_logits_the_log_probabilities_are_the_same(models, monkeypatch):
    _, lm = models["neox-parallel-pct25"]
    monkeypatch.setattr("neolm.sampling.PROJECT_CHUNK", 7)  # several chunks of positions, a last one of one
    ids = random_ids(1, 29).tolist()
    full, lean = lm.trace_ids(ids)[0], lm.trace_ids(ids, output_logits=False)[0]
    assert lean.logits is None and lean.hidden_states is None and lean.attentions is None
    assert (full.token_logprobs - lean.token_logprobs).abs().max().item() <= 1e-6
    with pytest.raises(NeolmError, match="no logits"):
        lean.ranks()


def test_ranks_top_and_surprisal_agree(models):
    _, lm = models["neo"]
    ids = random_ids(1, 25, seed=3)[0].tolist()
    greedy = lm.model(torch.tensor([ids])).argmax(-1)[0, :-1].tolist()
    ids = ids[:12] + greedy[11:12] + ids[13:]  # token 12 is the model's likeliest after 0 .. 11
    trace = lm.trace_ids([ids])[0]
    ranks = trace.ranks()
    top_ids, top_lp = trace.top(3)
    assert top_ids.shape == (24, 3) and (top_lp[:, :-1] >= top_lp[:, 1:]).all()
    assert ranks[11].item() == 1
    for t in range(24):
        assert (ranks[t].item() == 1) == (top_ids[t, 0].item() == ids[t + 1])
        assert ranks[t].item() >= 1
        if ranks[t].item() <= 3:
            assert top_ids[t, ranks[t].item() - 1].item() == ids[t + 1]
            assert abs(top_lp[t, ranks[t].item() - 1].item() - trace.token_logprobs[t].item()) <= 1e-5
    assert torch.allclose(trace.surprisal, -trace.token_logprobs / math.log(2))


def test_a_probe_trains_on_the_hidden_states(models):
    _, lm = models["neox-parallel-pct25"]
    trace = lm.trace_ids(random_ids(1, 12).tolist(), output_hidden_states=True)[0]
    probe = torch.nn.Linear(lm.config.d_model, 2)
    loss = probe(trace.hidden_states[1]).logsumexp(-1).mean()
    loss.backward()  # (inference-mode tensors would refuse this)
    assert probe.weight.grad is not None and not trace.hidden_states[1].requires_grad


def test_quantized_models_are_traced_as_they_run(tiny_checkpoints):
    lm = neolm.load(tiny_checkpoints["neox-parallel-pct25"][1], quantize="int8", quantize_head=True)
    ids = random_ids(1, 16).tolist()
    trace = lm.trace_ids(ids, output_hidden_states=True)[0]
    with torch.no_grad():
        logits = lm.model(torch.tensor(ids))[0]
    assert (trace.logits - logits).abs().max().item() <= TOL


def test_hooks_are_removed_even_after_an_error(models, monkeypatch):
    _, lm = models["neox-parallel-pct25"]

    def fail(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(lm.model.ln_f, "forward", fail)
    with pytest.raises(RuntimeError, match="boom"):
        lm.trace_ids(random_ids(1, 5).tolist(), output_hidden_states=True, output_attentions=True)
    monkeypatch.undo()
    modules = list(lm.model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)
    lm.trace_ids(random_ids(1, 5).tolist(), output_hidden_states=True, output_attentions=True)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def test_text_and_errors(models):
    _, lm = models["neo"]
    one = lm.trace("To be, or not to be", output_hidden_states=True)
    assert one.tokens == lm.encode("To be, or not to be")
    two = lm.trace(["To be", "or not to be, that is"])
    assert [t.tokens for t in two] == [lm.encode("To be"), lm.encode("or not to be, that is")]
    with pytest.raises(NeolmError, match="empty"):
        lm.trace_ids([[1, 2], []])
    with pytest.raises(NeolmError, match="context of 512"):
        lm.trace_ids([[1] * 513])
    with pytest.raises(NeolmError, match="vocabulary"):
        lm.trace_ids([[1, 50257]])
    with pytest.raises(NeolmError, match="batch_size"):
        lm.trace_ids([[1, 2]], batch_size=0)
    with pytest.raises(NeolmError, match="string"):
        lm.trace([1, 2])


def test_score_command_prints_the_library_numbers(tiny_checkpoints, capsys, tmp_path):
    folder = tiny_checkpoints["neo"][1]
    lm = neolm.load(folder)
    text = "To be, or not to be, that is the question"
    trace = lm.trace(text)
    code, out, err = cli(capsys, "score", "--model", folder, text, "--json", "--top", "2")
    assert code == 0, err
    result = json.loads(out)
    tokens = result["tokens"]
    assert [t["id"] for t in tokens] == trace.tokens[1:]
    assert [t["logprob"] for t in tokens] == pytest.approx(trace.token_logprobs.tolist(), abs=1e-5)
    assert [t["rank"] for t in tokens] == trace.ranks().tolist()
    assert all(len(t["top"]) == 2 for t in tokens)
    total = trace.token_logprobs.sum().item()
    assert result["summary"]["perplexity"] == pytest.approx(math.exp(-total / len(tokens)), rel=1e-5)

    save = tmp_path / "trace.safetensors"
    code, out, err = cli(capsys, "score", "--model", folder, text, "--prefix-eos", "--save", save, "--attentions")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[1].split()[:2] == ["0", json.dumps(lm.decode([lm.tokenizer.eos_token_id]))]
    assert len(lines) == 1 + 1 + len(trace.tokens) + 2  # header, the first token, each scored token, summary, saved
    assert "perplexity" in lines[-2] and str(save) in lines[-1]
    saved = load_file(save)
    eos_trace = lm.trace_ids([[lm.tokenizer.eos_token_id] + trace.tokens], True, True)[0]
    assert saved["tokens"].tolist() == eos_trace.tokens
    assert len([k for k in saved if k.startswith("hidden_states.")]) == lm.config.n_layer + 1
    assert torch.equal(saved["hidden_states.2"], eos_trace.hidden_states[2])
    assert torch.equal(saved["attentions.1"], eos_trace.attentions[1])
    assert not list(tmp_path.glob("*.partial"))


def test_score_across_revisions(tiny_checkpoints, capsys, monkeypatch):
    """--revisions scores the text under each revision (two checkpoints stand in for a hub id's training
    checkpoints): a column each, equal to each one's own trace."""
    import neolm.hub

    two = {
        "step1000": tiny_checkpoints["neox-parallel-pct25"][1],
        "step2000": tiny_checkpoints["neox-sequential-pct100"][1],
    }
    real = neolm.hub.resolve
    monkeypatch.setattr(neolm.hub, "resolve", lambda model, revision=None: two[revision]
                        if model == "EleutherAI/made-up" else real(model, revision))  # fmt: skip
    text = "To be, or not to be, that is the question"
    code, out, err = cli(
        capsys, "score", "-m", "EleutherAI/made-up", "--revisions", "step1000,step2000", text, "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    for revision, folder in two.items():
        trace = neolm.load(folder).trace(text)
        got = [t["logprob"][revision] for t in result["tokens"]]
        assert got == pytest.approx(trace.token_logprobs.tolist(), abs=1e-5)
        assert result["summary"][revision]["perplexity"] == pytest.approx(
            math.exp(-trace.token_logprobs.mean().item()), rel=1e-5)  # fmt: skip
    code, out, err = cli(capsys, "score", "-m", "EleutherAI/made-up", "--revisions", "step1000,step2000", text)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[-2:] == ["step1000", "step2000"] and lines[-1].startswith("step2000: mean log-probability")
    code, _, err = cli(capsys, "score", "-m", "EleutherAI/made-up", "--revisions", "step1000", text, "--save", "x.st")
    assert_one_line_error(code, err, "not with --revisions")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["x"], "one token"),
        (["x y", "--attentions"], "--save"),
        (["   "], "the text is empty"),
        (["word " * 600], "context of 512"),
        (["a b", "--save", "/nonexistent/dir/t.safetensors"], "cannot write"),
    ],
)
def test_score_errors(tiny_checkpoints, capsys, argv, needle):
    code, _, err = cli(capsys, "score", "--model", tiny_checkpoints["neo"][1], *argv)
    assert_one_line_error(code, err, needle)

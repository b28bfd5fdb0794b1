"""DoLa (dola_layers; neolm.dola) against its rule run step by step on transformers' model (transformers 5 keeps
DoLa on the hub, out of reach offline), its layer choice, scores, streaming and refusals."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import neolm
from neolm.dola import candidate_layers
from neolm.errors import NeolmError

PROMPT = [3, 3, 4, 5, 3, 4, 9, 3, 4]


def reference(hf, prompt: list[int], layers: list[int], n: int, processors) -> list[int]:
    """DoLa without a cache: the head over each candidate layer's last hidden state (no final LayerNorm), the
    layer furthest from the final distribution p (transformers' divergence: KL(m || p) + KL(m || q) for the mean m
    of p and the layer's q, where the Jensen-Shannon divergence has KL(p || m) + KL(q || m)), final - premature
    log-probabilities
    within a tenth of the likeliest's probability, then the processors and the greedy pick."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            out = hf(torch.tensor([seq]), output_hidden_states=True)
            final = out.logits[0, -1]
            premature = [hf.get_output_embeddings()(out.hidden_states[i][0, -1]) for i in layers]
            p = final.softmax(-1)
            js = []
            for q_logits in premature:
                q = q_logits.softmax(-1)
                m = 0.5 * (p + q)
                js.append(0.5 * ((m * (m / p).log()).sum() + (m * (m / q).log()).sum()))
            base = premature[int(torch.stack(js).argmax())].log_softmax(-1)
            final = final.log_softmax(-1)
            scores = torch.where(final < final.max() + math.log(0.1), -float("inf"), final - base)
            scores = processors(torch.tensor([seq]), scores[None])[0]
            seq.append(int(scores.argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize(
    ("name", "dola_layers", "layers"),
    [("neo", "low", [2]), ("neo", [0, 1, 3], [0, 1, 3]), ("neox-parallel-pct25", "high", [1]),
     ("neox-parallel-pct25", [0, 1, 2], [0, 1, 2])],
)  # fmt: skip
def test_dola_follows_its_rule(tiny_checkpoints, name, dola_layers, layers):
    """The tokens are the rule's on transformers' model with repetition_penalty 1.2 (transformers' processor on
    the contrast), and differ from greedy decoding's; batched, streamed and with scores they are the same."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    hf, folder = tiny_checkpoints[name]
    lm = neolm.load(folder)
    config = lm.config
    assert candidate_layers(dola_layers, config.n_layer, config.tie_embeddings) == layers
    n = 14
    kw = dict(max_new_tokens=n, do_sample=False, eos_token_id=None, repetition_penalty=1.2, dola_layers=dola_layers)
    ours = lm.generate_ids([PROMPT, PROMPT[:3]], **kw)
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2)])
    assert ours[0] == reference(hf, PROMPT, layers, n, processors)
    assert ours[1] == lm.generate_ids([PROMPT[:3]], **kw)[0]
    assert ours[0] != lm.generate_ids([PROMPT], **{**kw, "dola_layers": None})[0]
    out = lm.generate_ids([PROMPT], return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
    assert out.sequences == ours[:1] and len(out.scores[0]) == n
    with torch.no_grad():
        full = hf(torch.tensor([PROMPT + ours[0]])).logits[0, len(PROMPT) - 1 : -1]
    assert (out.logits[0] - full).abs().max().item() <= 1e-4  # the final layer's logits
    assert torch.equal(out.scores[0].argmax(-1), torch.tensor(ours[0]))
    text = "Once upon a time"
    assert "".join(lm.stream(text, **kw)) == lm.generate(text, **kw)
    sampled = dict(kw, do_sample=True, seed=3, num_return_sequences=2)
    assert lm.generate_ids([PROMPT], **sampled) == lm.generate_ids([PROMPT], **sampled)


def test_layer_choice_rules():
    """transformers' choice: halves every second layer (past 40 layers: 20 from either end), from layer 2 with a
    head tied to the embeddings; listed layers at or past the last are dropped."""
    assert candidate_layers("low", 24, False) == [0, 2, 4, 6, 8, 10]
    assert candidate_layers("low", 24, True) == [2, 4, 6, 8, 10]
    assert candidate_layers("high", 24, False) == [12, 14, 16, 18, 20, 22]
    assert candidate_layers("high", 44, False) == list(range(24, 44, 2))
    assert candidate_layers("low", 44, True) == list(range(2, 20, 2))
    assert candidate_layers([3, 30, 7], 24, False) == [3, 7]
    with pytest.raises(NeolmError, match="names no layer"):
        candidate_layers([30], 24, False)


def test_js_divergence_is_torchs():
    """The divergence the reference above writes out is the one neolm takes from F.kl_div (as transformers)."""
    from neolm.dola import contrast

    final, a, b = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    scores = contrast(final, {0: a, 1: b})
    p = final.softmax(-1)
    js = [0.5 * F.kl_div(torch.stack([p.log(), q.log_softmax(-1)]), 0.5 * (p + q.softmax(-1)), reduction="sum")
          for q in (a, b)]  # fmt: skip
    base = (a, b)[int(torch.stack(js).argmax())]
    kept = torch.isfinite(scores)
    assert torch.allclose(scores[kept], (final.log_softmax(-1) - base.log_softmax(-1))[kept])


def test_refusals(tiny_checkpoints):
    lm = neolm.load(tiny_checkpoints["neo"][1])
    bad = [
        (dict(dola_layers="middle"), "dola_layers must be"),
        (dict(dola_layers=[-1]), "dola_layers must be"),
        (dict(dola_layers="low", num_beams=2), "without beams"),
        (dict(dola_layers="low", penalty_alpha=0.6, top_k=4), "contrastive search"),
        (dict(dola_layers=[9]), "names no layer"),
    ]
    for knobs, needle in bad:
        with pytest.raises(NeolmError, match=needle):
            lm.generate_ids([PROMPT], max_new_tokens=4, **knobs)
    with pytest.raises(NeolmError, match="cannot be batched"):
        list(neolm.Conversation(lm, [{"role": "user", "content": "hi"}], dola_layers="high").reply())

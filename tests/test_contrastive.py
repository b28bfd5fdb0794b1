"""Contrastive search (penalty_alpha, top_k; neolm.contrastive) against the rule run step by step on transformers'
model (transformers 5 keeps contrastive search on the hub, out of reach offline), its scores, streaming and refusals."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import neolm
from neolm.errors import NeolmError
from neolm.model import KVCache

PROMPT = [3, 3, 4, 5, 3, 4, 9, 3, 4]


def reference(hf, prompt: list[int], alpha: float, k: int, n: int, processors=None) -> list[int]:
    """Contrastive search without a cache: every step reads the whole text, then each candidate appended to it,
    and scores (1 - alpha) p - alpha max cos(candidate's last hidden state, the text's)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            out = hf(torch.tensor([seq]), output_hidden_states=True)
            logits = out.logits[:, -1]
            if processors is not None:
                logits = processors(torch.tensor([seq]), logits)
            probs, candidates = logits.softmax(dim=-1)[0].topk(k)
            text = torch.nn.functional.normalize(out.hidden_states[-1][0], dim=-1)  # (T, C)
            rows = torch.tensor([seq + [c] for c in candidates.tolist()])
            last = hf(rows, output_hidden_states=True).hidden_states[-1][:, -1]  # (k, C)
            penalty = (torch.nn.functional.normalize(last, dim=-1) @ text.T).max(dim=-1).values
            seq.append(int(candidates[torch.argmax((1 - alpha) * probs - alpha * penalty)]))
    return seq[len(prompt) :]


@contextmanager
def count_cache_rows():
    """The rows of each KV cache made in the block (a list filled as they are made)."""
    rows: list[int] = []
    made = KVCache.__init__

    def spy(self, config, batch_size, *args, **kwargs):
        rows.append(batch_size)
        made(self, config, batch_size, *args, **kwargs)

    KVCache.__init__ = spy
    try:
        yield rows
    finally:
        KVCache.__init__ = made


@pytest.mark.parametrize(
    "knobs", [dict(penalty_alpha=0.6, top_k=4), dict(penalty_alpha=0.9, top_k=8, repetition_penalty=1.3)],
    ids=["alpha0.6-k4", "alpha0.9-k8-penalty"],
)  # fmt: skip
@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_contrastive_search_follows_its_rule(tiny_checkpoints, name, knobs):
    """The tokens are the rule's on transformers' model, differ from greedy decoding's, and are the same
    streamed, batched (each prompt alone) and with per-token scores (the processed logits the candidates came
    from; the logits are the model's)."""
    from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

    hf, folder = tiny_checkpoints[name]
    lm = neolm.load(folder)
    n = 16
    processors = None
    if "repetition_penalty" in knobs:
        processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(knobs["repetition_penalty"])])
    kw = dict(max_new_tokens=n, do_sample=False, eos_token_id=None, **knobs)
    ours = lm.generate_ids([PROMPT, PROMPT[:4]], **kw)
    assert ours[0] == reference(hf, PROMPT, knobs["penalty_alpha"], knobs["top_k"], n, processors)
    assert ours[1] == lm.generate_ids([PROMPT[:4]], **kw)[0]
    assert ours[0] != lm.generate_ids([PROMPT], **{**kw, "penalty_alpha": None})[0]
    with count_cache_rows() as rows:  # low_memory: the candidates one at a time, in a cache of one row
        assert lm.generate_ids([PROMPT, PROMPT[:4]], low_memory=True, **kw) == ours
    assert rows and max(rows) == 1, rows
    out = lm.generate_ids([PROMPT], return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
    assert out.sequences == ours[:1] and out.scores[0].shape == out.logits[0].shape == (n, hf.config.vocab_size)
    with torch.no_grad():
        full = hf(torch.tensor([PROMPT + ours[0]])).logits[0, len(PROMPT) - 1 : -1]
    assert (out.logits[0] - full).abs().max().item() <= 1e-4
    text = "Once upon a time"
    assert "".join(lm.stream(text, **kw)) == lm.generate(text, **kw)


def test_refusals(tiny_checkpoints):
    lm = neolm.load(tiny_checkpoints["neo"][1])
    bad = [
        (dict(penalty_alpha=1.5, top_k=4), "penalty_alpha must be in"),
        (dict(penalty_alpha=0.6, top_k=1), "top_k must be > 1"),
        (dict(penalty_alpha=0.6, top_k=4, do_sample=True), "without sampling or beams"),
        (dict(penalty_alpha=0.6, top_k=4, num_beams=2), "without sampling or beams"),
        (dict(penalty_alpha=0.6, top_k=4, guidance_scale=2.0), "guidance_scale"),
        (dict(penalty_alpha=0.6, top_k=4, prompt_lookup_num_tokens=3), "prompt lookup"),
        (dict(penalty_alpha=0.6, top_k=4, low_memory="yes"), "low_memory must be true or false"),
        (dict(num_beams=2, low_memory=True), "low_memory .* is not offered with beams"),
    ]
    for knobs, needle in bad:
        with pytest.raises(NeolmError, match=needle):
            lm.generate_ids([PROMPT], max_new_tokens=4, **knobs)
    with pytest.raises(NeolmError, match="cannot be batched"):
        list(neolm.Conversation(lm, [{"role": "user", "content": "hi"}], penalty_alpha=0.6, top_k=4).reply())


def test_a_checkpoint_that_samples_gives_way_and_the_command_line(capsys):
    """The bundled model's generation_config samples; penalty_alpha without do_sample is contrastive search all the
    same (a greedy mode), from the library and from `neolm generate --penalty-alpha`."""
    from test_cli import cli

    lm = neolm.load()
    assert lm.generation_defaults.get("do_sample")
    kw = dict(penalty_alpha=0.6, top_k=4, max_new_tokens=12)
    text = lm.generate("The king", **kw)
    assert text == lm.generate("The king", do_sample=False, **kw)
    code, out, err = cli(capsys, "generate", "The king", "--penalty-alpha", "0.6", "--top-k", "4", "--max-new-tokens",
                         "12", "--no-stream")  # fmt: skip
    assert code == 0 and out == "The king" + text + "\n", err

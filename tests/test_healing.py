"""Token healing (neolm.healing): the prompt's last token chosen again among the tokens that begin with it, as
transformers' token_healing=True does, and the continuation given as the text that follows the prompt."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, cli

import neolm
from neolm.errors import NeolmError
from neolm.healing import BIAS, KEEP, candidates, heal

TOKENIZERS = Path(neolm.__file__).parent / "tokenizers"
PROMPTS = ["The link is http:", "x = obj.len", "print(foo", 'They said "no']  # last tokens without a leading space


def hf_tokenizer(name: str):
    import transformers

    special = dict.fromkeys(("eos_token", "bos_token", "unk_token", "pad_token"), "<|endoftext|>")
    if name == "neo":
        return transformers.GPT2TokenizerFast(str(TOKENIZERS / "gpt2" / "vocab.json"),
                                              str(TOKENIZERS / "gpt2" / "merges.txt"), **special)  # fmt: skip
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(TOKENIZERS / "gpt-neox-20b" / "tokenizer.json"),
                                                **special)  # fmt: skip


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_healed_prompts_and_their_greedy_text_are_transformers(tiny_checkpoints, name):
    hf, folder = tiny_checkpoints[name]
    lm, tokenizer = neolm.load(folder), hf_tokenizer(name)
    changed = 0
    for prompt in PROMPTS:
        ids = lm.encode(prompt)
        healed = heal(lm.model, lm.tokenizer, ids)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), token_healing=True, tokenizer=tokenizer, max_new_tokens=6,
                              do_sample=False, pad_token_id=0)[0].tolist()  # fmt: skip
        new = lm.generate_ids([healed.ids], max_new_tokens=6, do_sample=False, repetition_penalty=1.0)[0]
        assert healed.ids + new == ref, prompt
        changed += healed.ids != ids
        text = lm.generate(prompt, token_healing=True, max_new_tokens=6, do_sample=False, repetition_penalty=1.0)
        assert prompt + text == lm.decode(ref)  # the continuation of the prompt as written
        assert "".join(lm.stream(prompt, token_healing=True, max_new_tokens=6, do_sample=False,
                                 repetition_penalty=1.0)) == text  # fmt: skip
    assert changed  # (some last token was healed into a longer one)


def test_a_last_token_with_a_leading_space_is_healed_among_the_tokens_that_begin_with_it(tiny_checkpoints):
    lm = neolm.load(tiny_checkpoints["neox-parallel-pct25"][1])
    ids = lm.encode("KING. My lo")
    tail = lm.tokenizer.token_bytes(ids[-1])
    assert tail == b" lo"
    options = candidates(lm.tokenizer, ids[-1])
    assert ids[-1] in options and len(options) > 10
    assert all(lm.tokenizer.token_bytes(t).startswith(b" lo") for t in options)
    healed = heal(lm.model, lm.tokenizer, ids)
    with torch.no_grad():  # the rule: greedy under BIAS on every candidate, and KEEP more on the original
        logits = lm.model(torch.tensor([ids[:-1]]))[0, -1].float()
    logits[options] += BIAS
    logits[ids[-1]] += KEEP
    assert healed.ids == ids[:-1] + [int(logits.argmax())]
    assert healed.ids[-1] in options


def test_what_is_not_healed_and_what_is_refused(tiny_checkpoints, capsys):
    lm = neolm.load(tiny_checkpoints["neo"][1])
    one = lm.encode("http")
    assert heal(lm.model, lm.tokenizer, one).ids == one  # a prompt of one token stays
    spaced = lm.encode("  print(foo \n")
    assert heal(lm.model, lm.tokenizer, spaced).text == "print(foo"  # outer whitespace goes first
    with pytest.raises(NeolmError, match="token_healing needs the prompts' text"):
        lm.generate_ids([one], token_healing=True)
    code, out, err = cli(capsys, "generate", "print(foo", "-m", tiny_checkpoints["neo"][1], "--token-healing",
                         "--max-new-tokens", "4", "--no-do-sample")  # fmt: skip
    assert code == 0 and out.startswith("print(foo"), err
    code, _, err = cli(capsys, "chat", "-m", tiny_checkpoints["neo"][1], "--token-healing")
    assert_one_line_error(code, err, "--token-healing", exit_code=2)

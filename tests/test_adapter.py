"""LoRA adapters in PEFT's format (neolm.adapter): PEFT's adapters merge into neolm's weights with PEFT's logits,
and the adapters a neolm LoRA run writes load in PEFT with neolm's logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, hf_model
from test_cli import assert_one_line_error, cli
from test_train import TEXT, run_args, tiny_data  # noqa: F401  (a fixture)

import neolm
from neolm.errors import NeolmError
from neolm.train.loop import train

peft = pytest.importorskip("peft", reason="the test extras install peft")  # (pyproject's [test])

TOL = 1e-4  # as tests/test_parity.py
MODULES = {"neo": ["q_proj", "k_proj", "v_proj", "out_proj", "c_fc", "c_proj"],
           "neox-parallel-pct25": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]}  # fmt: skip


def peft_adapter(tiny_checkpoints, name: str, folder, seed: int = 7, r: int = 4, modules=None, **settings):
    """A PEFT LoRA model over the tiny checkpoint `name`, with random A and B (from `seed`), saved to `folder`."""
    hf_ref, _ = tiny_checkpoints[name]
    hf = hf_model(TINY[name], std=0.2, seed=list(TINY).index(name))
    hf.load_state_dict(hf_ref.state_dict())
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=modules or MODULES[name], init_lora_weights=False,
                             **settings)  # fmt: skip
    torch.manual_seed(seed)
    model = peft.get_peft_model(hf, config).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
                module.lora_B["default"].weight.normal_(std=0.1)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("settings", [{}, {"use_rslora": True}], ids=["lora", "rslora"])
@pytest.mark.parametrize("name", list(MODULES))
def test_peft_adapters_merge_with_peft_s_logits(tiny_checkpoints, tmp_path, name, settings):
    model = peft_adapter(tiny_checkpoints, name, tmp_path / "adapter", **settings)
    ids = torch.randint(0, 50000, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        base = tiny_checkpoints[name][0](ids).logits
    lm = neolm.load(tiny_checkpoints[name][1], adapter=tmp_path / "adapter")
    with torch.no_grad():
        ours = lm.model(ids)
    assert (ref - base).abs().max().item() > 0.1  # the adapter changes the model
    assert (ours - ref).abs().max().item() <= TOL
    int8 = neolm.load(tiny_checkpoints[name][1], adapter=tmp_path / "adapter", quantize="int8", quantize_head=True)
    with torch.no_grad():  # merged before the weights are quantized
        assert (int8.model(ids) - ref).abs().max().item() < 0.5 * (ref - base).abs().max().item()


def test_a_neolm_lora_run_writes_an_adapter_peft_loads(tiny_data, tmp_path, tiny_checkpoints):  # noqa: F811
    import transformers

    folder = tiny_checkpoints["neo"][1]
    summary = train(run_args(tiny_data, tmp_path / "run", preset=None, init=str(folder), lora_r=4, lora_alpha=8.0,
                             lora_dropout=0.0, max_steps=4, lr=1e-2))  # fmt: skip
    adapter = tmp_path / "run" / "final-adapter"
    settings = json.loads((adapter / "adapter_config.json").read_text())
    assert settings["r"] == 4 and settings["target_modules"] == sorted(MODULES["neo"])
    tuned = neolm.load(summary["export"])
    base = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.tensor([tuned.encode(TEXT)[:40]])
    with torch.no_grad():
        assert (model(input_ids=ids).logits - tuned.model(ids)).abs().max().item() <= TOL
    again = neolm.load(folder, adapter=adapter)  # the base model with the adapter: the merged export
    with torch.no_grad():
        assert (again.model(ids) - tuned.model(ids)).abs().max().item() <= TOL


def test_adapters_neolm_cannot_merge_are_refused(tiny_checkpoints, tmp_path, capsys):
    folder = tiny_checkpoints["neox-parallel-pct25"][1]
    peft_adapter(tiny_checkpoints, "neox-parallel-pct25", tmp_path / "ok")
    with pytest.raises(NeolmError, match="no adapter_config.json"):
        neolm.load(folder, adapter=tmp_path)
    settings = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    for change, words in [({"use_dora": True}, "DoRA"), ({"bias": "all"}, "trains biases"),
                          ({"modules_to_save": ["embed_out"]}, "whole modules"), ({"peft_type": "IA3"}, "IA3")]:  # fmt: skip
        (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps(settings | change))
        with pytest.raises(NeolmError, match=words):
            neolm.load(folder, adapter=tmp_path / "ok")
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps(settings))
    with pytest.raises(NeolmError, match="made for another model"):
        neolm.load(tiny_checkpoints["neox-sequential-pct100"][1], adapter=tmp_path / "ok")
    code, _, err = cli(capsys, "generate", "--model", folder, "--adapter", tmp_path / "nowhere", "hi")
    assert_one_line_error(code, err, "nowhere")
    code, out, err = cli(capsys, "generate", "--model", folder, "--adapter", tmp_path / "ok", "hi", "--max-new-tokens",
                         "5", "--no-stream")  # fmt: skip
    assert code == 0, err
    merged = neolm.load(folder, adapter=tmp_path / "ok")
    assert out == "hi" + merged.generate("hi", max_new_tokens=5) + "\n"

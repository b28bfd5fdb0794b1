"""Many LoRA adapters held unmerged over one model (neolm.multilora): each gives PEFT's logits, a batch whose rows
use different adapters gives each row what it gets alone, and the server gives each request the adapter its
`model` names."""

from __future__ import annotations

import pytest
import torch
from test_adapter import MODULES, peft_adapter

import neolm
from neolm.errors import NeolmError

peft = pytest.importorskip("peft", reason="the test extras install peft")  # (pyproject's [test])

TOL = 1e-4  # as tests/test_parity.py
IDS = torch.randint(0, 50000, (3, 20), generator=torch.Generator().manual_seed(5))


def two_adapters(tiny_checkpoints, name, tmp_path):
    """Two PEFT adapters over `name` (the second of another rank, adapting only the attention's input and the
    MLP's output), their PEFT models, and their folders."""
    first = peft_adapter(tiny_checkpoints, name, tmp_path / "first", seed=7)
    some = [MODULES[name][i] for i in ((0, 2, 5) if name == "neo" else (0, 3))]
    second = peft_adapter(tiny_checkpoints, name, tmp_path / "second", seed=8, r=6, modules=some)
    return (first, second), (tmp_path / "first", tmp_path / "second")


@pytest.mark.parametrize("name", list(MODULES))
def test_adapters_held_unmerged_give_peft_s_logits(tiny_checkpoints, tmp_path, name):
    (first, second), folders = two_adapters(tiny_checkpoints, name, tmp_path)
    lm = neolm.load(tiny_checkpoints[name][1])
    with torch.no_grad():
        base = lm.model(IDS)
    assert lm.load_adapter(folders[0]) == "first" and lm.active_adapter == "first"  # the first becomes active
    assert lm.load_adapter(folders[1], "other") == "other" and lm.active_adapter == "first"
    assert lm.adapters == ["first", "other"]
    with torch.no_grad():
        refs = [model(input_ids=IDS).logits for model in (first, second)]
        assert (lm.model(IDS) - refs[0]).abs().max().item() <= TOL
        lm.set_adapter("other")
        assert (lm.model(IDS) - refs[1]).abs().max().item() <= TOL
        lm.disable_adapters()
        assert lm.active_adapter is None
        assert torch.equal(lm.model(IDS), base)  # no adapter: the base layers alone
        assert min((ref - base).abs().max().item() for ref in refs) > 0.1  # (each adapter changes the model)
        with lm.adapter_set.using([1, 0, 2]):  # a batch whose rows each use another adapter
            mixed = lm.model(IDS)
    for row, ref in enumerate((refs[0], base, refs[1])):
        assert (mixed[row] - ref[row]).abs().max().item() <= TOL


def test_an_adapter_over_a_quantized_model_and_deleting_adapters(tiny_checkpoints, tmp_path):
    name = "neox-parallel-pct25"
    (first, _), folders = two_adapters(tiny_checkpoints, name, tmp_path)
    lm = neolm.load(tiny_checkpoints[name][1], quantize="int8")
    layer = lm.model.blocks[0].attn.qkv
    with torch.no_grad():
        base = lm.model(IDS)
        ref = first(input_ids=IDS).logits
        lm.load_adapter(folders[0])
        lm.load_adapter(folders[1])
        ours = lm.model(IDS)
        hf_base = tiny_checkpoints[name][0](IDS).logits
        assert (ours - ref).abs().max().item() < 0.5 * (ref - hf_base).abs().max().item()  # int8's rounding only
        lm.delete_adapter("first")
        assert lm.adapters == ["second"] and lm.active_adapter is None
        with pytest.raises(NeolmError, match="no adapter named 'first'"):
            lm.set_adapter("first")
        lm.delete_adapter("second")
        assert lm.adapters == [] and lm.model.blocks[0].attn.qkv is layer  # the model's own layers are back
        assert torch.equal(lm.model(IDS), base)


def greedy(lm, ids: list[int], adapter: str | None, n: int = 12) -> list[int]:
    lm.set_adapter(adapter)
    return lm.generate_ids([ids], max_new_tokens=n, do_sample=False, repetition_penalty=1.0)[0]


@pytest.mark.parametrize("name", list(MODULES))
def test_generation_with_an_adapter_is_peft_s_and_a_mixed_batch_gives_each_its_own(tiny_checkpoints, tmp_path, name):
    from neolm.serve.engine import Engine, Token

    (first, _), folders = two_adapters(tiny_checkpoints, name, tmp_path)
    lm = neolm.load(tiny_checkpoints[name][1])
    lm.load_adapter(folders[0])
    lm.load_adapter(folders[1])
    prompts = [IDS[i, : 8 + 3 * i].tolist() for i in range(3)]
    with torch.no_grad():  # transformers' greedy search on PEFT's model (steps through the adapter, unmerged)
        ref = first.generate(torch.tensor([prompts[0]]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    alone = {(p, a): greedy(lm, prompts[p], a) for p in range(3) for a in (None, "first", "second")}
    assert alone[0, "first"] == ref[0, len(prompts[0]) :].tolist()
    assert len({tuple(alone[0, a]) for a in (None, "first", "second")}) == 3  # each adapter its own text

    lm.set_adapter("first")  # (the engine gives every request the adapter it names, whatever is set here)
    engine = Engine(lm, max_batch=9)
    gc = lm.generation_config(max_new_tokens=12, do_sample=False, repetition_penalty=1.0)
    asks = [(p, a) for p in range(3) for a in (None, "first", "second")]
    jobs = [engine.submit([prompts[p]], gc, adapter=a) for p, a in asks]  # queued before the engine starts: one batch
    engine.start()
    try:
        for job, ask in zip(jobs, asks):
            assert [event.token for event in job if isinstance(event, Token)] == alone[ask], ask
    finally:
        engine.close(timeout=30)
    assert engine.largest_batch == len(asks)
    with pytest.raises(NeolmError, match="no adapter named 'third'"):
        engine.submit([prompts[0]], gc, adapter="third")


def test_the_server_and_batch_give_each_request_the_adapter_its_model_names(tiny_checkpoints, tmp_path, capsys):
    import json

    from test_cli import assert_one_line_error, cli
    from test_serve import call

    from neolm.serve.engine import Engine
    from neolm.serve.http import Server

    name = "neox-parallel-pct25"
    _, folders = two_adapters(tiny_checkpoints, name, tmp_path)
    lm = neolm.load(tiny_checkpoints[name][1])
    for folder in folders:
        lm.load_adapter(folder)
    prompt = "The quick brown fox"
    texts = {}
    for adapter in (None, "first", "second"):
        lm.set_adapter(adapter)
        texts[adapter] = lm.generate(prompt, max_new_tokens=10, do_sample=False, repetition_penalty=1.0)
    assert len(set(texts.values())) == 3
    lm.disable_adapters()
    server = Server(lm, port=0, model_name="base")
    server.start()
    try:
        status, body = call(server, "/v1/models")
        assert status == 200
        assert [(m["id"], m["parent"]) for m in body["data"]] == [("base", None), ("first", "base"), ("second", "base")]
        assert body["data"][1]["root"] == str(folders[0])
        status, body = call(server, "/v1/models/second")
        assert status == 200 and body["id"] == "second"
        for model, adapter in (("base", None), ("first", "first"), ("second", "second")):
            request = {"model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0}
            status, body = call(server, "/v1/completions", request)
            assert status == 200 and body["model"] == model and body["choices"][0]["text"] == texts[adapter], model
        status, body = call(server, "/v1/completions", {"model": "third", "prompt": prompt})
        assert status == 404 and "'third' does not exist" in body["error"]["message"]
        assert "'first'" in body["error"]["message"]
        status, text = call(server, "/metrics")  # vLLM's lora_requests_info: nothing in flight now
        assert status == 200
        assert 'neolm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}' in text
    finally:
        server.close()
    engine = Engine(lm)  # (not running: its queue stays as submitted)
    job = engine.submit([lm.encode(prompt)], lm.generation_config(max_new_tokens=4), adapter="second")
    assert engine.lora_info() == ([], ["second"], 2)
    engine._note_running([job])  # as the engine notes the requests it runs
    text = engine.metrics.render("base", 1, engine.lora_info())
    assert 'running_lora_adapters="second",waiting_lora_adapters="second"' in text
    engine.close()

    requests, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"custom_id": model or "none", "url": "/v1/completions",
              "body": {**({"model": model} if model else {}), "prompt": prompt, "max_tokens": 10, "temperature": 0}}
             for model in (None, "base", "first", "second", "third")]  # fmt: skip
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, _, err = cli(capsys, "batch", requests, output, "--model", tiny_checkpoints[name][1], "--served-model-name",
                       "base", "--lora-modules", f"first={folders[0]}", json.dumps({"name": "second", "path": str(folders[1])}))  # fmt: skip
    assert code == 0, err
    records = {r["custom_id"]: r for r in map(json.loads, output.read_text().splitlines())}
    for custom_id, adapter in (("none", None), ("base", None), ("first", "first"), ("second", "second")):
        assert records[custom_id]["response"]["body"]["choices"][0]["text"] == texts[adapter], custom_id
    assert records["third"]["response"]["status_code"] == 404
    code, _, err = cli(capsys, "batch", requests, tmp_path / "o2.jsonl", "--model", tiny_checkpoints[name][1],
                       "--served-model-name", "base", "--lora-modules", f"base={folders[0]}")  # fmt: skip
    assert_one_line_error(code, err, "--lora-modules", "a name of its own", "base")
    code, _, err = cli(capsys, "serve", tiny_checkpoints[name][1], "--lora-modules", "first")
    assert_one_line_error(code, err, "--lora-modules", "NAME=PATH", exit_code=2)


@pytest.mark.parametrize("load", [{"dtype": "float32"}, {"dtype": "bfloat16"}, {"quantize": "int8"}],
                         ids=["fp32", "bf16", "int8"])  # fmt: skip
def test_the_native_decode_step_adds_each_row_s_adapter_as_torch_does(tiny_checkpoints, tmp_path, load):
    from neolm.generate import DecodeBatch
    from neolm.native import decode

    name = "neox-parallel-pct25"
    _, folders = two_adapters(tiny_checkpoints, name, tmp_path)
    models = [neolm.load(tiny_checkpoints[name][1], native=native, **load) for native in (True, False)]
    if models[0].model.decode_step is None:
        pytest.skip("no native decode step on this machine")
    steps = []
    native_step = decode.DecodeStep.__call__

    def counted(self, *args, **kwargs):
        out = native_step(self, *args, **kwargs)
        steps.append(out is not None)
        return out

    logits = []
    for lm in models:
        for folder in folders:
            lm.load_adapter(folder)
        batch = DecodeBatch(lm.model, adapters=lm.adapter_set)
        gc = lm.generation_config(max_new_tokens=4, do_sample=False, repetition_penalty=1.0)
        for adapter in (2, 0, 1):  # rows: the second adapter, none, the first
            prefill = batch.prefill([IDS[adapter, : 6 + adapter].tolist()], gc, adapter=adapter)
            prefill.read(lm.model)
            batch.join(prefill)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(decode.DecodeStep, "__call__", counted)
            for _ in range(3):
                batch.step()
            with torch.inference_mode():
                batch._flush()
        logits.append(batch.rows.logits)
    assert len(steps) >= 3 and all(steps)  # the native model's steps ran natively, adapters and all (the first
    # rebuilds the step, whose new one then runs: counted twice)
    apart = (logits[0] - logits[1]).abs().amax(dim=1)  # per row
    if load.get("dtype") == "float32":
        assert apart.max().item() <= TOL
    else:  # each path rounds its own sums (bf16 activations): the adapters' rows no further apart than the base's
        assert max(apart[0], apart[2]).item() <= 3 * apart[1].item() + TOL, apart


def test_adapters_load_and_unload_while_the_server_runs(tiny_checkpoints, tmp_path):
    import threading
    import time

    from test_serve import call

    from neolm.serve.http import Server

    name = "neox-parallel-pct25"
    _, folders = two_adapters(tiny_checkpoints, name, tmp_path)
    lm = neolm.load(tiny_checkpoints[name][1])
    prompt = "The quick brown fox"
    lm.load_adapter(folders[0])
    text = lm.generate(prompt, max_new_tokens=8, do_sample=False, repetition_penalty=1.0)
    lm.delete_adapter("first")
    request = {"model": "first", "prompt": prompt, "max_tokens": 8, "temperature": 0}

    closed = Server(lm, port=0, model_name="base")
    closed.start()
    try:  # without runtime_lora (--allow-runtime-lora-updating) the routes are off
        status, body = call(closed, "/v1/load_lora_adapter", {"lora_name": "first", "lora_path": str(folders[0])})
        assert status == 404 and "--allow-runtime-lora-updating" in body["error"]["message"]
    finally:
        closed.close()

    server = Server(lm, port=0, model_name="base", runtime_lora=True)
    server._listen()  # HTTP only: the engine starts below
    try:
        job = server.engine.submit([lm.encode(prompt)], lm.generation_config(max_new_tokens=4), adapter=None)
        loaded = {}
        load = {"lora_name": "first", "lora_path": str(folders[0])}
        thread = threading.Thread(target=lambda: loaded.update(answer=call(server, "/v1/load_lora_adapter", load)))
        thread.start()
        while not server.engine._tasks:  # held between two steps: waits for the engine
            time.sleep(0.01)
        server.engine.start()
        thread.join(30)
        assert loaded["answer"] == (200, "Success: LoRA adapter 'first' added successfully.")
        list(job)
        assert [m["id"] for m in call(server, "/v1/models")[1]["data"]] == ["base", "first"]
        status, body = call(server, "/v1/completions", request)
        assert status == 200 and body["choices"][0]["text"] == text
        status, body = call(server, "/v1/load_lora_adapter", load)
        assert status == 400 and "already been loaded" in body["error"]["message"]
        status, body = call(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(tmp_path)})
        assert status == 400 and "adapter_config.json" in body["error"]["message"]
        status, body = call(server, "/v1/unload_lora_adapter", {"lora_name": "first"})
        assert status == 200 and "removed" in body and lm.adapters == []
        status, body = call(server, "/v1/completions", request)
        assert status == 404
        status, body = call(server, "/v1/unload_lora_adapter", {"lora_name": "first"})
        assert status == 404 and "cannot be found" in body["error"]["message"]
    finally:
        server.close()

    server = Server(lm, port=0, model_name="base", runtime_lora=True)  # a request in flight keeps its adapter
    lm.load_adapter(folders[0])
    server._listen()
    try:
        job = server.engine.submit([lm.encode(prompt)], lm.generation_config(max_new_tokens=4), adapter="first")
        answer = {}
        unload = {"lora_name": "first"}
        thread = threading.Thread(target=lambda: answer.update(got=call(server, "/v1/unload_lora_adapter", unload)))
        thread.start()
        while not server.engine._tasks:
            time.sleep(0.01)
        server.engine.start()  # (tasks run before the waiting request joins: it is in flight, waiting)
        thread.join(30)
        status, body = answer["got"]
        assert status == 409 and "in use by 1 request" in body["error"]["message"]
        list(job)
        assert call(server, "/v1/unload_lora_adapter", unload)[0] == 200  # once it has ended
    finally:
        server.close()


def test_adapter_names_mix_adapters_in_one_generation_as_peft_does(tiny_checkpoints, tmp_path):
    (first, _), folders = two_adapters(tiny_checkpoints, "neo", tmp_path)
    first.load_adapter(folders[1], adapter_name="second")  # PEFT's model with both adapters
    lm = neolm.load(tiny_checkpoints["neo"][1])
    lm.load_adapter(folders[0])
    lm.load_adapter(folders[1])
    names = ["first", "__base__", "second", "first"]
    prompts = [IDS[i % 3, :10].tolist() for i in range(4)]  # (one length: PEFT's batch needs no padding)
    kw = {"max_new_tokens": 8, "do_sample": False, "repetition_penalty": 1.0}
    mixed = lm.generate_ids(prompts, adapter_names=names, **kw)
    for prompt, name, got in zip(prompts, names, mixed):
        lm.set_adapter(None if name == "__base__" else name)
        assert got == lm.generate_ids([prompt], **kw)[0], name  # each as alone
    with torch.no_grad():
        peft_names = [{"first": "default"}.get(name, name) for name in names]  # (PEFT named the first "default")
        ref = first.generate(input_ids=torch.tensor(prompts), adapter_names=peft_names, max_new_tokens=8,
                             do_sample=False, pad_token_id=0)  # fmt: skip
    assert mixed == ref[:, 10:].tolist()
    out = lm.generate_ids(prompts, adapter_names=names, return_dict_in_generate=True, output_scores=True, **kw)
    assert out.sequences == mixed
    lm.set_adapter("second")
    texts = lm.generate(["Hello there", "Hello there"], adapter_names=["first", "__base__"], max_new_tokens=6,
                        do_sample=False)  # fmt: skip
    lm.set_adapter("first")
    assert texts[0] == lm.generate("Hello there", max_new_tokens=6, do_sample=False)
    beams = {"num_beams": 2, "max_new_tokens": 4}  # one adapter for all: any mode
    lm.set_adapter(None)
    named = lm.generate_ids([prompts[0]], adapter_names=["second"], **beams)
    assert lm.active_adapter is None  # (for that call only)
    lm.set_adapter("second")
    assert named == lm.generate_ids([prompts[0]], **beams) != lm.generate_ids([prompts[0]], adapter_names=["__base__"],
                                                                              **beams)  # fmt: skip
    with pytest.raises(NeolmError, match="not with beam search"):
        lm.generate_ids(prompts[:2], adapter_names=["first", "second"], num_beams=2, max_new_tokens=4)
    with pytest.raises(NeolmError, match="one name per prompt"):
        lm.generate_ids(prompts, adapter_names=["first"])
    with pytest.raises(NeolmError, match="no adapter named 'third'"):
        lm.generate_ids(prompts[:1], adapter_names=["third"])

"""Checkpoint reading: layouts, dtypes, legacy buffers, and every way a checkpoint can be wrong."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import neolm
from conftest import REAL, TINY, hf_model, save_hf
from neolm import checkpoint
from neolm.config import Config
from neolm.errors import NeolmError


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


IDS = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))


def copy_checkpoint(tiny_checkpoints, name, dest: Path) -> Path:
    shutil.copytree(tiny_checkpoints[name][1], dest)
    return dest


@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_sharded_safetensors(tmp_path, tiny_checkpoints, name):
    hf = tiny_checkpoints[name][0]
    hf.save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    lm = neolm.load(tmp_path)
    assert (logits(lm.model, IDS) - logits(hf, IDS)).abs().max() <= 1e-4


def test_sharded_bin(tmp_path, tiny_checkpoints):
    hf = tiny_checkpoints["neox-sequential-pct100"][0]
    hf.config.save_pretrained(tmp_path)
    state = hf.state_dict()
    names = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :]}  # fmt: skip
    weight_map = {}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, tmp_path / file)
        weight_map.update({k: file for k in keys})
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    lm = neolm.load(tmp_path)
    assert (logits(lm.model, IDS) - logits(hf, IDS)).abs().max() <= 1e-4


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints(tmp_path, stored):
    hf = hf_model(TINY["neox-parallel-pct25"]).to(stored)
    hf.save_pretrained(tmp_path)
    reference = logits(hf.float(), IDS)
    assert (logits(neolm.load(tmp_path, dtype="float32").model, IDS) - reference).abs().max() <= 1e-4
    lm = neolm.load(tmp_path, dtype=stored)
    assert lm.dtype == stored and lm.model.blocks[0].attn.qkv.weight.dtype == stored


def test_tensors_are_copied_out_of_the_mapping(tiny_checkpoints):
    """Even when dtypes match, each tensor is copied into process memory by default (decoding from the file's
    pages was 2-8% slower) with the file's exact values."""
    folder = tiny_checkpoints["neox-parallel-pct25"][1]
    reader = checkpoint.SafetensorsFile(folder / "model.safetensors")
    config = Config.from_hf(checkpoint.read_hf_config(folder))
    state = checkpoint.load_state_dict(folder, config, torch.float32)
    mapped = reader.get("gpt_neox.layers.0.mlp.dense_h_to_4h.weight")
    assert torch.equal(state["blocks.0.mlp.fc.weight"], mapped)
    assert state["blocks.0.mlp.fc.weight"].untyped_storage().data_ptr() != mapped.untyped_storage().data_ptr()
    assert state["blocks.0.mlp.fc.weight"].untyped_storage().nbytes() == mapped.numel() * 4  # its own storage


def _mapping(address: int) -> str | None:
    """The line of /proc/self/maps whose range holds address."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        if lo <= address < hi:
            return line
    return None


def _mapped_file(t: torch.Tensor) -> str | None:
    """The path of the file mapping that holds t's first byte; None for anonymous memory."""
    fields = (_mapping(t.untyped_storage().data_ptr()) or "").split()
    return fields[5] if len(fields) > 5 else None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("name", ["neo", "neox-parallel-pct25"])
def test_mmap_keeps_weights_in_the_files_pages(tmp_path, tiny_checkpoints, name):
    """load(mmap=True): weights stored in the dtype asked for stay in the file's pages, copy-on-write (a write
    reaches neither the file nor another load); GPT-Neo's fused q/k/v and converted weights are copied. The
    logits are those of the default load, bit for bit."""
    folder = copy_checkpoint(tiny_checkpoints, name, tmp_path / "ckpt")
    path = str((folder / "model.safetensors").resolve())
    file_bytes = (folder / "model.safetensors").read_bytes()
    copied, mapped = neolm.load(folder, device="cpu"), neolm.load(folder, device="cpu", mmap=True)
    assert torch.equal(logits(mapped.model, IDS), logits(copied.model, IDS))
    fc = mapped.model.blocks[0].mlp.fc.weight
    assert _mapped_file(fc) == path and _mapped_file(copied.model.blocks[0].mlp.fc.weight) != path
    assert (_mapped_file(mapped.model.blocks[0].attn.qkv.weight) == path) == (name != "neo")
    with torch.no_grad():
        fc.zero_()  # a private page now
    assert (folder / "model.safetensors").read_bytes() == file_bytes
    again = neolm.load(folder, device="cpu", mmap=True)
    assert torch.equal(logits(again.model, IDS), logits(copied.model, IDS))
    as_bf16 = neolm.load(folder, device="cpu", dtype="bfloat16", mmap=True).model.blocks[0].mlp.fc.weight
    assert as_bf16.dtype == torch.bfloat16 and _mapped_file(as_bf16) != path


def test_saved_safetensors_data_is_cache_line_aligned(tmp_path):
    """neolm's own files start their data on a 64-byte boundary (header padded with spaces, as the format
    allows), so that weights mapped in place (mmap=True) lie on whole cache lines, and still load elsewhere."""
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64)}
    path = tmp_path / "x.safetensors"
    checkpoint.save_safetensors(tensors, path)
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert (8 + n) % 64 == 0
    back = load_file(path)
    assert all(torch.equal(back[k], v) for k, v in tensors.items())


def test_legacy_buffers_are_ignored(tmp_path):
    for name, extra in {
        "neo": {"transformer.h.0.attn.attention.bias": torch.ones(1, 1, 4, 4, dtype=torch.bool),
                "transformer.h.0.attn.attention.masked_bias": torch.tensor(-1e9)},
        "neox-parallel-pct25": {"gpt_neox.layers.0.attention.bias": torch.ones(1, 1, 4, 4, dtype=torch.bool),
                                "gpt_neox.layers.0.attention.masked_bias": torch.tensor(-1e9),
                                "gpt_neox.layers.0.attention.rotary_emb.inv_freq": torch.ones(3)},
    }.items():  # fmt: skip
        hf = hf_model(TINY[name])
        folder = tmp_path / name
        hf.config.save_pretrained(folder)
        state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight" or name != "neo"}
        save_file(state | extra, str(folder / "model.safetensors"))
        assert (logits(neolm.load(folder).model, IDS) - logits(hf, IDS)).abs().max() <= 1e-4


def edit_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    reader = checkpoint.SafetensorsFile(path)
    state = {k: reader.get(k).clone() for k in reader.keys()}
    del reader
    edit(state)
    save_file(state, str(path))


def test_missing_unexpected_and_misshaped_tensors_are_listed(tmp_path, tiny_checkpoints):
    folder = copy_checkpoint(tiny_checkpoints, "neo", tmp_path / "m")

    def damage(state):
        del state["transformer.h.1.mlp.c_fc.weight"]
        del state["transformer.h.2.attn.attention.k_proj.weight"]
        state["transformer.h.0.surprise.weight"] = torch.zeros(2)
        state["transformer.ln_f.bias"] = torch.zeros(7)

    edit_weights(folder, damage)
    with pytest.raises(NeolmError) as e:
        neolm.load(folder)
    message = str(e.value)
    assert "\n" not in message
    assert "missing 2 tensor(s)" in message and "blocks.1.mlp.fc.weight" in message and "parts k" in message
    assert "unexpected 1 tensor(s): transformer.h.0.surprise.weight" in message
    assert "mis-shaped 1 tensor(s): transformer.ln_f.bias (7,)" in message


def test_truncated_safetensors(tmp_path, tiny_checkpoints):
    folder = copy_checkpoint(tiny_checkpoints, "neox-parallel-pct25", tmp_path / "m")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(NeolmError, match="is truncated: tensor"):
        neolm.load(folder)
    path.write_bytes(data[:5])
    with pytest.raises(NeolmError, match="truncated or not a safetensors file"):
        neolm.load(folder)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + data[100:200])
    with pytest.raises(NeolmError, match="header is not valid JSON"):
        neolm.load(folder)


def test_corrupt_and_malicious_bin(tmp_path, tiny_checkpoints):
    hf = tiny_checkpoints["neo"][0]
    folder = save_hf(hf, tmp_path / "m", fmt="bin")
    path = folder / "pytorch_model.bin"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(NeolmError, match="truncated or corrupt"):
        neolm.load(folder)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    with open(path, "wb") as f:
        pickle.dump({"x": Exploit()}, f)
    with pytest.raises(NeolmError, match="refused|truncated or corrupt"):
        neolm.load(folder)
    torch.save({"transformer.wte.weight": Exploit()}, path)
    with pytest.raises(NeolmError, match="refused"):
        neolm.load(folder)
    assert not (tmp_path / "pwned").exists()


def test_no_weights_and_no_config(tmp_path, tiny_checkpoints):
    folder = copy_checkpoint(tiny_checkpoints, "neo", tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(NeolmError, match="no weights in .*model.safetensors, pytorch_model.bin"):
        neolm.load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(NeolmError, match="has no config.json"):
        neolm.load(folder)
    with pytest.raises(NeolmError, match="no such model folder"):
        neolm.load(tmp_path / "nowhere")


def test_index_naming_a_missing_shard(tmp_path, tiny_checkpoints):
    tiny_checkpoints["neo"][0].save_pretrained(tmp_path, max_shard_size="1MB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(NeolmError, match=f"missing: {shard.name}"):
        neolm.load(tmp_path)


def test_quantized_checkpoint_is_refused_clearly(tmp_path, tiny_checkpoints):
    folder = copy_checkpoint(tiny_checkpoints, "neo", tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}  # neolm reads bitsandbytes and its own
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(NeolmError, match="gptq quantized checkpoints are not supported"):
        neolm.load(folder)


@pytest.mark.parametrize("name", list(REAL))
def test_saved_checkpoint_loads_in_transformers(tmp_path, name):
    import transformers

    hf = hf_model(REAL[name], seed=3)
    lm = neolm.load(save_hf(hf, tmp_path / "hf"))
    checkpoint.save_checkpoint(lm.model, tmp_path / "ours")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    ids = torch.randint(0, 50000, (1, 32), generator=torch.Generator().manual_seed(1))
    assert (logits(again, ids) - logits(lm.model, ids)).abs().max() <= 1e-4
    assert (logits(neolm.load(tmp_path / "ours").model, ids) - logits(lm.model, ids)).abs().max() == 0


def test_hub_unreachable_names_the_files(tmp_path):
    """A real connection failure (nothing listens on the port), in a fresh process with an empty cache."""
    code = textwrap.dedent("""
        import neolm
        try:
            neolm.load("EleutherAI/pythia-160m", revision="step143000")
        except neolm.NeolmError as e:
            print(e)
    """)
    env = os.environ | {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path),
                        "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "cannot reach the Hugging Face hub" in out.stdout, out.stdout + out.stderr
    assert "EleutherAI/pythia-160m (revision step143000)" in out.stdout
    assert "config.json" in out.stdout and "model.safetensors" in out.stdout


@pytest.mark.parametrize("kernels", ["native", "none"])
def test_loading_leaves_torch_dynamo_unimported(tiny_checkpoints, kernels):
    """Importing torch._dynamo costs 1.1-1.4 s, paid only by compile=True: the meta device's embeddings skip
    their random init (normal_ there would import it), and the torch.compile'd kernels that layers offer are made
    when first called. A fresh process, as the CLI's; "none": without neolm's kernels (no C++ compiler)."""
    code = textwrap.dedent("""
        import sys, neolm
        neolm.load(sys.argv[1]).generate("The sea", max_new_tokens=2)
        print("torch._dynamo" in sys.modules)
    """)
    folder = str(tiny_checkpoints["neo"][1])
    env = os.environ | ({"CXX": "no-such-compiler"} if kernels == "none" else {})
    out = subprocess.run([sys.executable, "-c", code, folder], env=env, capture_output=True, text=True, timeout=120,
                         check=False)  # fmt: skip
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_a_model_built_off_the_meta_device_has_random_embeddings():
    model = neolm.GPT(Config("gpt_neo", vocab_size=300, n_positions=64, d_model=32, n_layer=1, n_head=2, d_ff=64,
                             pos_embedding="learned", layer_windows=(None,)))  # fmt: skip
    for embedding in (model.wte, model.wpe):
        assert 0.8 < embedding.weight.std() < 1.2  # torch's N(0, 1)


def test_modelscope_needs_its_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # as if not installed
    with pytest.raises(NeolmError, match=r"pip install 'neolm\[modelscope\]'"):
        neolm.load("modelscope:AI-ModelScope/gpt-neo-1B3")


PEAK_RSS = """
import sys, torch, neolm
def peak():  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's, inherited over exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024
before = peak()
lm = neolm.load(sys.argv[1], dtype=sys.argv[2], quantize=None if sys.argv[3] == "-" else sys.argv[3],
                huge_pages=sys.argv[4] == "hp")
loaded = peak()
with torch.no_grad():
    lm.model(torch.tensor([[1, 2, 3]]))  # touches every weight page
print(before, loaded, peak())
"""


@pytest.mark.parametrize("dtype, quantize, pages, bound", [
    ("float32", None, "", 1.3), ("bfloat16", None, "", 0.8), ("float32", "int8", "", 1.0),
    ("float32", None, "hp", 1.3), ("bfloat16", None, "hp", 0.8), ("float32", "int8", "hp", 1.2),
])  # fmt: skip
def test_frugal_loading_peak_rss(tmp_path, dtype, quantize, pages, bound):
    """Peak RSS while loading (and then using every weight), as a multiple of the checkpoint's size.

    pythia-160m shape, fp32 checkpoint. As fp32 the file is mapped in place: under 1.3x. As bf16 each
    tensor is converted and its mapped pages released at once, so the peak is the half-size model plus
    about one source tensor (the 154 MB embedding here): under 0.8x, where a naive load needs 1.5x.
    Quantized to int8 while loading, each matrix is quantized and freed as it is read: the float embeddings
    (308 MB, half the checkpoint) and 85 MB of codes, 0.84x; quantizing the loaded float model took 1.16x.
    Moved into huge pages (huge_pages=True) the weights are copied one storage at a time and each old one is
    freed as it goes: fp32 1.06x, bf16 0.63x, int8 0.97x (while the loaded state dict held every old one to the
    end, bf16 peaked at 2x the model: gpt-neo-1.3B +5.1 GB against +2.9 GB).
    """
    folder = save_hf(hf_model(REAL["pythia-160m"]), tmp_path)
    size = (folder / "model.safetensors").stat().st_size
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(folder), dtype, quantize or "-", pages or "-"],
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    before, loaded, used = map(int, out.stdout.split())
    ratio = (used - before) / size
    print(
        f"\n{dtype} {quantize or ''} {pages} from a {size / 2**20:.0f} MiB fp32 checkpoint: peak RSS +{(loaded - before) / 2**20:.0f} MiB "
        f"after load, +{(used - before) / 2**20:.0f} MiB after a forward = {ratio:.2f}x the checkpoint"
    )
    assert ratio < bound


def test_weight_memory_keeps_values_and_large_tensors_get_a_mapping_of_their_own():
    """neolm.memory.weight_copy equals the source; 8 MiB or more lie in an anonymous mapping of their own
    (page-aligned, unmapped when freed: no heap holes left behind), smaller ones come from the heap."""
    from neolm import memory

    src = torch.randn(3_000_000)
    out = memory.weight_copy(src, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, src.bfloat16())
    big = memory.weight_empty((memory.MIN_BYTES // 4,), torch.float32)
    if sys.platform.startswith("linux"):
        assert big.data_ptr() % 4096 == 0 and _mapped_file(big) is None
        line = _mapping(big.data_ptr())
        assert line.startswith(f"{big.data_ptr():x}-")  # a mapping of its own, starting with the tensor
        del big
        assert line not in Path("/proc/self/maps").read_text()  # unmapped with the tensor


def test_reuse_freed_sets_malloc_thresholds_and_load_asks_for_it(tmp_path, monkeypatch):
    """neolm.memory.reuse_freed: glibc's malloc takes both thresholds (mallopt returns 1 for each); neolm.load
    asks for it on CPU with the native kernels, not with native=False. (Its effect, 89k page faults a 512-token
    pythia-1.4b prompt -> 0, depends on the sequence of a real pass's allocations: bench/PROFILE.md, session 19.)"""
    import platform

    from neolm import api, memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the C library is not glibc")
    assert memory.reuse_freed() is True
    calls = []
    monkeypatch.setattr(memory, "reuse_freed", lambda: calls.append(1))
    folder = save_hf(hf_model(TINY["neo"]), tmp_path)
    api.load(folder, device="cpu", native=False)
    assert calls == []
    api.load(folder, device="cpu")
    assert calls == [1]

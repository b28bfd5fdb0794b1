"""Benchmark inputs, cached under /tmp/neolm-bench/models/<shape>/ (never in the repo):

  hf/              random weights of the real shape, `save_pretrained` by transformers, + real tokenizer
  ct2/             CTranslate2 float32 model (ct2-transformers-converter, needs transformers < 5)
  f32.gguf ...     GGUF by llama.cpp's own convert_hf_to_gguf.py (f32, bf16), llama_model_quantize (q8_0, q4_0)
  <file>.json      bytes of the weights each decode step streams (GGUF: from the file's tensor table)
  neolm-int8/ ...  neolm's own quantized folders (output head included), made afresh by each run with the neolm
                   it measures: its int8/int4 rows load them, as llama.cpp's rows load its GGUF files

Run as a script by bench.py, each step with the interpreter that has the tools:
  python bench/prepare.py checkpoint NAME OUT_DIR        (main environment: torch, transformers 5, neolm)
  python bench/prepare.py quantize IN.gguf OUT.gguf TYPE (llama-cpp-python's environment)
  python bench/prepare.py gguf-bytes FILE.gguf SRC_DIR   (any environment with numpy; gguf-py from SRC_DIR)
  python bench/prepare.py neolm-quantized HF_DIR OUT_DIR int8|int4   (main environment)
"""

from __future__ import annotations

import ctypes
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
INIT_STD = 0.02  # eos is banned in every engine, so greedy decoding never stops early at any std


def make_checkpoint(name: str, out: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(REPO))
    from neolm.tokenizer import Tokenizer
    from neolm.train.presets import PRESETS

    out_dir = Path(out)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    raw = dict(PRESETS[name])
    model_type = raw.pop("model_type")
    config = AutoConfig.for_model(model_type, initializer_range=INIT_STD, **raw)
    torch.manual_seed(0)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.do_sample = False
    model.save_pretrained(tmp, max_shard_size="20GB")
    # transformers 5 writes rope_parameters/dtype; the peers' converters (transformers 4, llama.cpp) read the
    # classic keys: write both, with the same values
    hf_config = json.loads((tmp / "config.json").read_text())
    hf_config.setdefault("torch_dtype", "float32")
    if model_type == "gpt_neox":
        hf_config.update(rotary_pct=raw["rotary_pct"], rotary_emb_base=raw["rotary_emb_base"])
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    tokenizer_name = "gpt2" if model_type == "gpt_neo" else "gpt-neox-20b"
    Tokenizer.builtin(tokenizer_name).save(tmp)  # tokenizer.json, exactly the shipped pipeline
    eos = "<|endoftext|>"
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, "eos_token": eos, "unk_token": eos,
        "add_bos_token": False, "add_eos_token": False, "model_max_length": raw["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }  # fmt: skip
    (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (tmp / "special_tokens_map.json").write_text(json.dumps({k: eos for k in ("bos_token", "eos_token", "unk_token")}))
    tmp.rename(out_dir)
    print(f"{name}: random {model_type} checkpoint in {time.perf_counter() - t:.0f}s -> {out_dir}")


def quantize(src: str, dst: str, kind: str) -> None:
    import llama_cpp

    ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    tmp = dst + ".tmp"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {src} -> {kind} failed with {rc}")
    Path(tmp).rename(dst)


def gguf_bytes(path: str, src_dir: str) -> None:
    """Bytes a decode step reads: every tensor once, except the embedding table (one row) when the
    file has a separate output matrix."""
    sys.path.insert(0, str(Path(src_dir) / "gguf-py"))
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(path).tensors}
    total = sum(tensors.values())
    if "output.weight" in tensors:
        total -= tensors.get("token_embd.weight", 0)
    info = {
        "stream_bytes": total,
        "file_bytes": Path(path).stat().st_size,
        "types": sorted({t.tensor_type.name for t in GGUFReader(path).tensors}),
    }
    Path(path + ".json").write_text(json.dumps(info))
    print(json.dumps(info))


def neolm_quantized(src: str, dst: str, precision: str) -> None:
    """What `neolm quantize SRC --to PRECISION --quantize-head --out DST` writes, without its quality report."""
    import neolm
    from neolm.quant import save_quantized

    lm = neolm.load(src, quantize=precision, quantize_head=True)
    shutil.rmtree(dst, ignore_errors=True)
    save_quantized(lm.model, dst, lm.tokenizer)


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    commands = {"checkpoint": make_checkpoint, "quantize": quantize, "gguf-bytes": gguf_bytes,
                "neolm-quantized": neolm_quantized}  # fmt: skip
    commands[command](*rest)

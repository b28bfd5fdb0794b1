"""neolm: `neolm.load`, then `iter_generate` (one yield per step, the first right after prefill).

Variants: "" (the defaults: since session 4 they include the native decode step) and "compile"
(`compile=True`: the other one-token matmuls timed against one-row kernels; that happens in `load`, so it
counts in the load time, not in any decode figure), and "W8A8" / "W4A8" (int8 / int4 only:
`quantize_activations=True`, each matmul's input rows quantized to int8 too, as CTranslate2's int8 and llama.cpp's
Q8_0 / Q4_0 do), and "kv16" (`kv_cache_dtype="bfloat16"`: keys and values kept in bf16 beside fp32 activations, as
llama.cpp keeps f16 caches by default), and "kv8" (`kv_cache_dtype="int8"`: int8 codes and a scale per key and value
row, as llama.cpp's q8_0 cache type), and "mmap" (fp32/bf16: `mmap=True`, weights stored in the dtype asked for
left in the checkpoint file's pages, as llama.cpp's default), and "hp" (`huge_pages=True`: the weights moved into
transparent huge pages once loaded), and "eager" (`native=False`: every step and layer in
torch; on a GPU, no CUDA graphs); options join with "+" ("W8A8+kv16"). device: "cpu" (bench.py) or "cuda"
(gpu.py, where int8/int4 rows compute in bf16). int8/int4 rows quantize the
output head too (`quantize_head=True`), as llama.cpp's Q8_0/Q4_0 files and CTranslate2's int8 do, and load
neolm's quantized folder beside the checkpoint (`neolm-int8/`, made by bench/prepare.py for each run), as
llama.cpp loads its GGUF files and CTranslate2 its converted model; without one, they quantize while loading.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch
from common import Unavailable, folder_files, module_stream_bytes

import neolm
from neolm.generate import iter_generate
from neolm.generation_config import GenerationConfig

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "int8": "float32", "int4": "float32"}


def _argument(name: str) -> str:
    """name, where neolm.load takes it; Unavailable where this neolm predates it."""
    if name not in inspect.signature(neolm.load).parameters:
        raise Unavailable(f"not available yet: neolm.load has no {name}= argument")
    return name


class Engine:
    def __init__(self, variant: str, device: str = "cpu"):
        self.lm = None
        self.device = device
        options = set(variant.split("+"))
        self.native = "eager" not in options
        self.compile = "compile" in options
        self.w8a8 = bool(options & {"W8A8", "W4A8"})  # int8 activations (neolm.load(quantize_activations=True))
        self.kv_cache_dtype = "bfloat16" if "kv16" in options else "int8" if "kv8" in options else None
        self.mmap = "mmap" in options
        self.huge_pages = "hp" in options

    @staticmethod
    def _quantized(model_dir, precision) -> Path | None:
        """neolm's quantized folder beside the checkpoint (bench/prepare.py), where there is one."""
        folder = Path(model_dir).parent / f"neolm-{precision}"
        return folder if precision in ("int8", "int4") and (folder / "config.json").exists() else None

    def files(self, model_dir, precision):
        return folder_files(self._quantized(model_dir, precision) or model_dir)

    def load(self, model_dir, precision, threads):
        torch.set_num_threads(threads)
        integer = precision in ("int8", "int4")
        dtype = "bfloat16" if integer and self.device != "cpu" else DTYPES[precision]
        kwargs = {"dtype": dtype, "device": self.device, "compile": self.compile, "native": self.native}
        if self.w8a8:
            kwargs[_argument("quantize_activations")] = True
        if self.kv_cache_dtype:
            kwargs[_argument("kv_cache_dtype")] = self.kv_cache_dtype
        if self.mmap:
            kwargs[_argument("mmap")] = True
        if self.huge_pages:
            kwargs[_argument("huge_pages")] = True
        folder = self._quantized(model_dir, precision)
        if folder is not None:
            self.lm = neolm.load(folder, **kwargs)
            return
        if integer:
            kwargs["quantize_head"] = True
            kwargs[_argument("quantize")] = precision
        try:
            self.lm = neolm.load(model_dir, **kwargs)
        except (TypeError, neolm.NeolmError) as e:
            if "quantiz" in str(e) and integer:
                raise Unavailable(f"not available yet: {e}") from e
            raise

    def _steps(self, prompts, n):
        gc = GenerationConfig(max_new_tokens=n, min_new_tokens=n)
        times, self.tokens = [], []
        t0 = time.perf_counter()
        for step in iter_generate(self.lm.model, prompts, gc):
            times.append(time.perf_counter() - t0)
            self.tokens.append(step[0])
        return times

    def single(self, ids, n):
        return self._steps([ids], n)

    def batch(self, prompts, n):
        return self._steps(prompts, n)

    def prefill(self, ids):
        with torch.inference_mode():
            self.lm.model(torch.tensor([ids], device=self.device), last_only=True)

    def unload(self):
        self.lm = None

    def info(self):
        return {
            "neolm": neolm.__version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "stream_bytes": module_stream_bytes(self.lm.model),
            "dtype": str(self.lm.dtype),
        }

"""transformers: AutoModelForCausalLM + generate (greedy, min_new_tokens = max_new_tokens).

variant: "eager" or "default" (what from_pretrained picks: sdpa where the model supports it). device: "cpu"
(bench.py) or "cuda" (gpu.py).
A streamer records the time of each step; its first put() is the prompt.
"""

from __future__ import annotations

import time

import torch
import transformers
from common import Unavailable, folder_files, module_stream_bytes
from transformers import AutoModelForCausalLM

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class _Clock:
    def __init__(self):
        self.t0, self.times, self.tokens, self.prompt_seen = time.perf_counter(), [], [], False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
        else:
            self.times.append(time.perf_counter() - self.t0)
            self.tokens.append(int(value.reshape(-1)[0]))

    def end(self):
        pass


class Engine:
    def __init__(self, variant: str, device: str = "cpu"):
        self.variant = variant or "default"
        self.device = device
        self.model = None

    def files(self, model_dir, precision):
        return folder_files(model_dir)

    def load(self, model_dir, precision, threads):
        if precision not in DTYPES:
            raise Unavailable(f"not measured: no {precision} path compared here (transformers' needs bitsandbytes)")
        torch.set_num_threads(threads)
        kwargs = {"attn_implementation": "eager"} if self.variant == "eager" else {}
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[precision], **kwargs)
        self.model = model.to(self.device).eval()
        self.eos = self.model.config.eos_token_id

    def _steps(self, prompts, n):
        ids = torch.tensor(prompts, device=self.device)  # same length: no padding needed
        clock = _Clock()
        with torch.inference_mode():
            self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=self.eos,
                streamer=clock,
            )
        self.tokens = clock.tokens
        return clock.times

    def single(self, ids, n):
        return self._steps([ids], n)

    def batch(self, prompts, n):
        return self._steps(prompts, n)

    def prefill(self, ids):
        with torch.inference_mode():
            self.model(torch.tensor([ids], device=self.device), logits_to_keep=1)

    def unload(self):
        self.model = None

    def info(self):
        return {
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "stream_bytes": module_stream_bytes(self.model),
            "attn_implementation": self.model.config._attn_implementation,
        }

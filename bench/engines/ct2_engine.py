"""CTranslate2: Generator over a model converted by ct2-transformers-converter (float32 on disk).

The compute type is chosen at load (float32, int8; bfloat16 where the CPU build supports it). The
prompt is forwarded at once (include_prompt_in_result=False); a callback times each step.
"""

from __future__ import annotations

import json
import os
import time

import ctranslate2
from common import Unavailable, folder_files

COMPUTE = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8"}


class Engine:
    def __init__(self, variant: str):
        self.generator = None

    @staticmethod
    def _dir(model_dir):  # the converted model beside the checkpoint (bench/prepare.py)
        return os.path.join(os.path.dirname(model_dir.rstrip("/")), "ct2")

    def files(self, model_dir, precision):
        return folder_files(self._dir(model_dir))

    def load(self, model_dir, precision, threads):
        ct2_dir = self._dir(model_dir)
        if precision not in COMPUTE:
            raise Unavailable(f"unsupported: CTranslate2 has no {precision} compute type")
        supported = ctranslate2.get_supported_compute_types("cpu")
        if COMPUTE[precision] not in supported:
            raise Unavailable(f"unsupported: this CPU build computes in {', '.join(sorted(supported))} only")
        if not os.path.isdir(ct2_dir):
            raise Unavailable(f"no converted model at {ct2_dir}")
        self.generator = ctranslate2.Generator(
            ct2_dir, device="cpu", compute_type=COMPUTE[precision], intra_threads=threads, inter_threads=1
        )
        with open(os.path.join(ct2_dir, "vocabulary.json")) as f:
            self.vocab = json.load(f)

    def _steps(self, prompts, n):
        tokens = [[self.vocab[i] for i in p] for p in prompts]
        times, last, self.tokens = [], [-1], []

        def on_step(result):
            if result.step != last[0]:
                last[0] = result.step
                times.append(time.perf_counter() - t0)
            if result.batch_id == 0:
                self.tokens.append(result.token_id)
            return False

        t0 = time.perf_counter()
        self.generator.generate_batch(
            tokens,
            max_length=n,
            min_length=n,
            sampling_topk=1,
            beam_size=1,
            include_prompt_in_result=False,
            callback=on_step,
        )
        return times

    def single(self, ids, n):
        return self._steps([ids], n)

    def batch(self, prompts, n):
        return self._steps(prompts, n)

    def prefill(self, ids):  # prompt at once + one new token (CTranslate2 has no "last logits only" forward)
        self.generator.generate_batch(
            [[self.vocab[i] for i in ids]], max_length=1, sampling_topk=1, include_prompt_in_result=False
        )

    def unload(self):
        self.generator = None

    def info(self):
        return {
            "ctranslate2": ctranslate2.__version__,
            "compute_type": self.generator.compute_type,
            "intra_threads": self.generator.num_threads if hasattr(self.generator, "num_threads") else None,
        }

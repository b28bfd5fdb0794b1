"""llama.cpp through llama-cpp-python's C API bindings (ctypes), so Python adds ~nothing per token.

Settings as `Llama(model_path, n_threads=T, n_ctx=1024, n_batch=512, logits_all=False)`: the prompt is
decoded in one llama_decode with logits for its last token only; then one token per llama_decode,
greedy argmax over the logits with eos banned. Batch: a second context with one sequence per prompt
(n_seq_max = batch), every step one llama_decode of `batch` tokens.
"""

from __future__ import annotations

import json
import os
import time

import llama_cpp as L
import numpy as np
from common import Unavailable

FILES = {"fp32": "f32.gguf", "bf16": "bf16.gguf", "int8": "q8_0.gguf", "int4": "q4_0.gguf"}


class Engine:
    def __init__(self, variant: str):
        self.model = None

    @staticmethod
    def _gguf(model_dir, precision):  # the GGUF file beside the checkpoint (bench/prepare.py)
        return os.path.join(os.path.dirname(model_dir.rstrip("/")), FILES[precision])

    def files(self, model_dir, precision):
        path = self._gguf(model_dir, precision)
        return [path] if os.path.isfile(path) else []

    def load(self, model_dir, precision, threads):
        self.L, self.np = L, np
        path = self._gguf(model_dir, precision)
        if not os.path.exists(path):
            raise Unavailable(f"no GGUF file {path} (conversion failed or was skipped)")
        self.path, self.threads = path, threads
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(path.encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab, self.eos = L.llama_vocab_n_tokens(vocab), L.llama_vocab_eos(vocab)
        self.ctx = self._context(n_ctx=1024, n_seq=1)
        self.batch_ctx = None
        self.lbatch = L.llama_batch_init(512, 0, 1)

    def _context(self, n_ctx, n_seq):
        L = self.L
        params = L.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n_ctx, 512, 512, n_seq
        params.n_threads = params.n_threads_batch = self.threads
        ctx = L.llama_init_from_model(self.model, params)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        return ctx

    def _decode(self, ctx, items):
        """items: (token, position, sequence, wants_logits)."""
        b = self.lbatch
        b.n_tokens = len(items)
        for i, (tok, pos, seq, out) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, out
            b.seq_id[i][0] = seq
        rc = self.L.llama_decode(ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, ctx, i):
        logits = self.np.ctypeslib.as_array(self.L.llama_get_logits_ith(ctx, i), shape=(self.n_vocab,))
        tok = int(logits.argmax())
        if tok == self.eos:  # eos banned, as min_new_tokens does in the other engines
            logits = logits.copy()
            logits[self.eos] = -float("inf")
            tok = int(logits.argmax())
        return tok

    def _run(self, ctx, prompts, n):
        L = self.L
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        times, self.tokens = [], []
        t0 = time.perf_counter()
        items = [(t, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
        self._decode(ctx, items)
        last = [i for i, item in enumerate(items) if item[3]]
        for step in range(n):
            tokens = [self._argmax(ctx, i) for i in last]
            self.tokens.append(tokens[0])
            times.append(time.perf_counter() - t0)
            if step == n - 1:
                break
            self._decode(ctx, [(t, len(p) + step, s, True) for s, (t, p) in enumerate(zip(tokens, prompts))])
            last = list(range(len(prompts)))
        return times

    def single(self, ids, n):
        return self._run(self.ctx, [ids], n)

    def batch(self, prompts, n):
        if self.batch_ctx is None:
            self.batch_ctx = self._context(n_ctx=len(prompts) * 256, n_seq=len(prompts))
        return self._run(self.batch_ctx, prompts, n)

    def prefill(self, ids):
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        self._decode(self.ctx, [(t, pos, 0, pos == len(ids) - 1) for pos, t in enumerate(ids)])
        self._argmax(self.ctx, len(ids) - 1)

    def unload(self):
        L = self.L
        for ctx in (self.ctx, self.batch_ctx):
            if ctx:
                L.llama_free(ctx)
        L.llama_batch_free(self.lbatch)
        L.llama_model_free(self.model)
        self.model = self.ctx = self.batch_ctx = None

    def info(self):
        info = {
            "llama_cpp_python": L.__version__,
            "file": os.path.basename(self.path),
            "n_threads": self.threads,
            "model_bytes": L.llama_model_size(self.model),
            "system": L.llama_print_system_info().decode().strip(),
        }
        sidecar = self.path + ".json"
        if os.path.exists(sidecar):
            with open(sidecar) as f:
                info.update(json.load(f))
        return info

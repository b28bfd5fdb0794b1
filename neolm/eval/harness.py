"""lm-evaluation-harness backend: `lm_eval --model neolm --model_args pretrained=...`.

This module is the harness plugin; it is the only place where neolm imports `lm_eval`. Tokenization
and request handling follow the harness's `hf` backend (HFLM) so that scores are the same: context and
continuation are split by encoding context + continuation and the context alone, an empty context is
the end-of-text token, long requests are left-truncated to max_length, rolling log-likelihoods use the
harness's disjoint windows. Scoring runs on neolm.eval.scoring (sorted, batched, shared contexts).

Registration: lm-eval 0.4.x has no plugin discovery. The `neolm-lm-eval.pth` that neolm installs
imports `_neolm_lm_eval` at start-up, which adds "neolm" to the harness's model names (a lazy
placeholder for this class) when the harness loads `lm_eval.models`: `lm_eval --model neolm` works.
Importing this module registers the name too, `neolm-lm-eval` is the harness's CLI with it registered,
and pyproject declares an `lm_eval.models` entry point for harness versions that read them.
"""

from __future__ import annotations

import logging
import time

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from neolm.errors import NeolmError
from neolm.eval.perplexity import rolling_requests
from neolm.eval.scoring import loglikelihoods
from neolm.generate import generate
from neolm.generation_config import GenerationConfig

log = logging.getLogger(__name__)

_GENERATION_KEYS = {"temperature", "top_k", "top_p", "repetition_penalty", "seed", "min_new_tokens"}


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


class NeolmLM(TemplateLM):
    """A neolm model as an lm-evaluation-harness LM.

    model_args: pretrained (folder, hub id, or omitted for neolm's default model), revision, dtype
    (default float32 on CPU), device, quantize (int8 | int4, with group_size; quantized folders need
    nothing), batch_size (sequences per forward, default 8), max_length (default: the model's context),
    max_gen_toks (default 256), share_context (default true), threads, mmap (default false: true leaves the
    weights in the checkpoint file's pages, a faster load when sweeping many checkpoints), peft (a LoRA adapter,
    as the hf backend's model_arg: merged as the weights load). Or pass a loaded model:
    NeolmLM(lm=neolm.load(...)).
    """

    backend = "causal"

    def __init__(self, pretrained=None, lm=None, revision=None, dtype=None, device=None, batch_size=8,
                 max_length=None, max_gen_toks=256, share_context=True, threads=None, quantize=None,
                 group_size=None, mmap=False, peft=None, **kwargs):  # fmt: skip
        super().__init__()
        unused = {k: v for k, v in kwargs.items() if v is not None and k not in ("max_batch_size",)}
        if unused:
            log.warning("neolm backend ignores model_args %s", ", ".join(sorted(unused)))
        if threads:
            torch.set_num_threads(int(threads))
        if lm is None:
            import neolm

            if str(device or "").startswith("cuda") and not torch.cuda.is_available():
                log.warning("no CUDA GPU here: evaluating on the CPU")  # the harness's CLI asks for cuda:0 by default
                device = "cpu"
            quant = {"quantize": quantize} if quantize else {}
            if quantize and group_size:
                quant["group_size"] = int(group_size)
            lm = neolm.load(pretrained, revision=revision, dtype=dtype, device=device, mmap=_flag(mmap), adapter=peft,
                            **quant)  # fmt: skip
        self.lm = lm
        self.tokenizer = lm.tokenizer
        self.pretrained = str(pretrained) if pretrained is not None else lm.source
        n_ctx = lm.config.n_positions
        self._max_length = int(max_length) if max_length else n_ctx
        if self._max_length > n_ctx:
            raise NeolmError(f"max_length {self._max_length} exceeds the model's context of {n_ctx}")
        self._max_gen_toks = int(max_gen_toks)
        self._batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.share_context = _flag(share_context)
        self._device = lm.model.wte.weight.device
        self.stats = {"requests": 0, "tokens": 0, "seconds": 0.0}  # scored by loglikelihood(_rolling)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> NeolmLM:
        """As the harness builds backends, but model_args win over --batch_size/--device (no duplicate error)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> NeolmLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # --- what the harness asks of a TemplateLM -----------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.lm.config.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, left_truncate_len=None, **kwargs) -> list[int]:
        ids = self.tokenizer.encode(string)  # GPT-2 and GPT-NeoX tokenizers add no special tokens
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        return {
            "model_num_parameters": self.lm.config.n_params(),
            "model_dtype": str(self.lm.model.wte.weight.dtype),
            "model_revision": "",
            "model_sha": "",
            "backend": "neolm",
        }

    # --- scoring --------------------------------------------------------------------------------------

    def _score(self, pairs, disable_tqdm: bool, desc: str) -> list[tuple[float, bool]]:
        start = time.perf_counter()
        bar = tqdm(total=len(pairs), desc=desc, disable=disable_tqdm)

        def progress(requests: int, tokens: int) -> None:
            bar.update(requests)
            self.stats["tokens"] += tokens

        out = loglikelihoods(self.lm.model, pairs, self.max_length, self.batch_size, self.share_context, progress)
        bar.close()
        self.stats["requests"] += len(pairs)
        self.stats["seconds"] += time.perf_counter() - start
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm, "neolm loglikelihood")
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        pairs, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for pair in rolling_requests(self.tok_encode(string), self.prefix_token_id, self.max_length):
                pairs.append(pair)
                owners.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, self._score(pairs, disable_tqdm, "neolm rolling loglikelihood")):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuations, cut at the first stop sequence, as HFLM's generate_until."""
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        by_kwargs: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            by_kwargs.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="neolm generate_until", disable=disable_tqdm)
        for indices in by_kwargs.values():
            kwargs = dict(normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen = kwargs.pop("max_gen_toks")
            keep = self.max_length - max_gen
            if keep <= 0:
                raise NeolmError(f"max_gen_toks {max_gen} leaves no room for a prompt in {self.max_length} tokens")
            do_sample = bool(kwargs.pop("do_sample", False))
            knobs = {k: v for k, v in kwargs.items() if k in _GENERATION_KEYS}
            if not do_sample:
                knobs = {k: v for k, v in knobs.items() if k not in ("temperature", "top_k", "top_p")}
            ignored = sorted(set(kwargs) - _GENERATION_KEYS)
            if ignored:
                log.warning("generate_until ignores generation arguments %s", ", ".join(ignored))
            stops = [u for u in until if u] or None
            gc = GenerationConfig.from_kwargs(max_new_tokens=max_gen, do_sample=do_sample, stop_strings=stops,
                                              eos_token_id=self.eot_token_id, **knobs)  # fmt: skip
            order = sorted(indices, key=lambda i: -len(requests[i].args[0]))
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=keep) or [self.prefix_token_id]
                           for i in chunk]  # fmt: skip
                for i, ids in zip(chunk, generate(self.lm.model, prompts, gc, self.tokenizer.decode)):
                    text = postprocess_generated_text(self.tok_decode(ids), until, None)
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out


def _register() -> None:
    """Make "neolm" a model name of the harness (unless a plugin entry already names this class)."""
    import lm_eval.models  # noqa: F401  (the built-in names first: the registry loads them only when empty)
    from lm_eval.api.registry import model_registry

    if "neolm" not in model_registry:
        model_registry.register("neolm", target=NeolmLM)


if __name__ != "__main__":
    _register()


def cli_main() -> None:
    """`neolm-lm-eval`: lm-evaluation-harness's own command line, with the neolm backend registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":  # python -m neolm.eval.harness: register the importable class, not __main__'s
    from neolm.eval.harness import cli_main as _main

    _main()

"""The library's front door: `neolm.load()` and `neolm.pipeline()`."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from neolm import checkpoint, cuda_graphs, hub, memory, structured
from neolm.chat import ChatFormat, Transcript, load_chat_format
from neolm.config import Config
from neolm.contrastive import contrastive_tokens
from neolm.conversation import Conversation
from neolm.dola import dola_tokens
from neolm.embedding import embed
from neolm.errors import NeolmError
from neolm.generate import generate, iter_generate
from neolm.generation_config import GenerationConfig
from neolm.healing import heal
from neolm.model import GPT
from neolm.multilora import AdapterSet
from neolm.native import attention, decode
from neolm.ops import compile_gemv, use_native
from neolm.outputs import GenerateOutput, generate_output
from neolm.speculative import assisted_tokens
from neolm.synthid import SynthIDDetection
from neolm.tokenizer import StreamDecoder, Tokenizer, load_tokenizer
from neolm.trace import DEFAULT_BATCH_SIZE as TRACE_BATCH_SIZE
from neolm.trace import Trace
from neolm.trace import trace as trace_model
from neolm.universal import Universal
from neolm.watermark import Detection, detect_tokens

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).parent / "default_model"
DEFAULT_MODEL_NAME = "neo-shakespeare"  # the bundled model's name (its model card: default_model/README.md)
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip
KV_CACHE_DTYPES = {**DTYPES, "int8": torch.int8}  # int8: codes and a scale per key and value (neolm.model.quantize_kv)


def parse_dtype(dtype: str | torch.dtype | None, device: torch.device, checkpoint_dtype: str | None) -> torch.dtype:
    """The compute dtype: as asked, else float32 on CPU and the checkpoint's half type (or bf16) on GPU."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise NeolmError(f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
        return dtype
    if dtype is None or dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return torch.float16 if checkpoint_dtype == "float16" else torch.bfloat16
    if dtype not in DTYPES:
        raise NeolmError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return DTYPES[dtype]


def parse_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise NeolmError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NeolmError("device cuda was asked for, but PyTorch sees no CUDA GPU here")
    return device


class LanguageModel:
    """A loaded model with its tokenizer: generate text, stream it, or call the model directly (`.model`)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, source: str, load_seconds: float = 0.0,
                 generation_defaults: dict | None = None, chat_format: ChatFormat | None = None):  # fmt: skip
        self.model, self.tokenizer, self.source = model, tokenizer, source
        self.load_seconds = load_seconds
        self.generation_defaults = generation_defaults or {}  # from the checkpoint's generation_config.json
        self.chat_format = chat_format or Transcript()  # the checkpoint's chat template, or the plain transcript
        self.adapter_set: AdapterSet | None = None  # LoRA adapters held unmerged (load_adapter)
        self.adapter_sources: dict[str, str] = {}  # where each came from

    @property
    def config(self) -> Config:
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return self.model.ln_f.weight.dtype  # not lm_head: a quantized head holds integer codes

    @property
    def device(self) -> torch.device:
        return self.model.ln_f.weight.device

    def load_adapter(self, adapter: str | os.PathLike, adapter_name: str | None = None) -> str:
        """Hold a LoRA adapter in PEFT's format (a folder or hub id) beside the weights, unmerged, as
        transformers' load_adapter: `set_adapter` picks the one generation uses, and the server gives each
        request the one it names, in one batch (neolm.multilora). The first one loaded becomes the active one.
        adapter_name: default the folder's name. Returns the name. (neolm.load's adapter= merges one instead:
        decoding then costs what the base model's does.)"""
        from neolm.adapter import lora_factors

        name = adapter_name or Path(str(adapter).rstrip("/")).name
        if not name:
            raise NeolmError(f"give the adapter {adapter!r} a name (adapter_name=)")
        self.hold_adapter(name, str(adapter), lora_factors(hub.resolve(adapter), self.config))
        if len(self.adapters) == 1:
            self.set_adapter(name)
        return name

    def hold_adapter(self, name: str, source: str, factors: dict) -> None:
        """load_adapter's second half: hold factors read by neolm.adapter.lora_factors as adapter `name` (the
        server reads them in a request's thread, then holds them between two steps). Changes no selection."""
        if self.adapter_set is None:
            self.adapter_set = AdapterSet.attach(self.model)
        self.adapter_set.add(name, factors)
        self.adapter_sources[name] = source
        log.info("adapter %r (%s) held unmerged", name, source)

    def set_adapter(self, adapter_name: str | None) -> None:
        """Generate with this loaded adapter from now on (None: the base model alone; disable_adapters())."""
        if adapter_name is None:
            if self.adapter_set is not None:
                self.adapter_set.select(0)
            return
        if self.adapter_set is None:
            raise NeolmError(f"no adapter named {adapter_name!r}: load one with load_adapter()")
        self.adapter_set.select(self.adapter_set.index(adapter_name))

    def disable_adapters(self) -> None:
        """Generate with the base model alone (set_adapter(name) turns one on again)."""
        self.set_adapter(None)

    def delete_adapter(self, adapter_name: str) -> None:
        """Forget a loaded adapter; with the last one gone, the model's own layers are back (and its native
        decode step)."""
        if self.adapter_set is None:
            raise NeolmError(f"no adapter named {adapter_name!r}: none is loaded")
        self.adapter_set.remove(adapter_name)
        del self.adapter_sources[adapter_name]
        if not self.adapter_set.held:
            self.adapter_set.detach()
            self.adapter_set = None

    @property
    def adapters(self) -> list[str]:
        """The names of the adapters held (load_adapter), in the order loaded."""
        return [] if self.adapter_set is None else self.adapter_set.held

    @property
    def active_adapter(self) -> str | None:
        """The adapter generation uses now, or None (the base model)."""
        rows = None if self.adapter_set is None else self.adapter_set.rows
        return self.adapter_set.names[rows - 1] if isinstance(rows, int) and rows else None

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True,
                            continue_final_message: bool = False, **kwargs) -> list[int] | str:  # fmt: skip
        """A conversation ([{"role", "content"}, ...]) as a prompt, in the checkpoint's chat format (its chat
        template, else a plain "User: / Assistant:" transcript; neolm.chat): token ids, or the text with
        tokenize=False. As transformers' method of that name: add_generation_prompt ends it with the
        assistant's turn opening, continue_final_message ends it inside the final message (for the model to go
        on with it), other keyword arguments go to the template."""
        text = self.chat_format.render(messages, add_generation_prompt, continue_final_message, **kwargs)
        return self.encode(text) if tokenize else text

    def chat(self, messages: list[dict], **kwargs) -> str:
        """The assistant's reply to a conversation ([{"role", "content"}, ...], as OpenAI's), in the checkpoint's
        chat format (its template, else a plain transcript whose "User:" lines stop the reply); when the last
        message is the assistant's, the rest of it. Keyword arguments: generation arguments (as generate's),
        chat_template_kwargs for the template, and tools (OpenAI's function tools, given to the template; read
        the reply's calls with self.chat_format.tool_calls.parse, neolm.tool_calls). For a conversation held over
        several turns, which computes only each turn's new tokens, use neolm.Conversation."""
        return "".join(Conversation(self, messages, **kwargs).reply())

    def embed(self, texts: str | list[str], pooling: str = "last", normalize: bool = True,
              batch_size: int = 8) -> torch.Tensor:  # fmt: skip
        """Embeddings of texts: (C,) for one, (N, C) fp32 for a list; each text's final hidden states (after the
        last LayerNorm) pooled, "last" token (vLLM's default for a causal LM) or "mean", L2-normalised if
        `normalize` (neolm.embedding)."""
        one = isinstance(texts, str)
        vectors = embed(self.model, [self.encode(t) for t in ([texts] if one else texts)], pooling, normalize,
                        batch_size)  # fmt: skip
        return vectors[0] if one else vectors

    def generation_config(self, **kwargs) -> GenerationConfig:
        """What a call with these generation arguments runs: the checkpoint's defaults (its
        generation_config.json), then the arguments; eos and bos from the model's config, else the tokenizer's."""
        negative = kwargs.pop("negative_prompt", None)
        if negative is not None:  # guidance's context as text: one for all prompts, or one per prompt
            texts = [negative] if isinstance(negative, str) else negative
            if not (isinstance(texts, list) and texts and all(isinstance(x, str) for x in texts)):
                raise NeolmError("negative_prompt must be a string, or a list of one string per prompt")
            if "negative_prompt_ids" in kwargs:
                raise NeolmError("give negative_prompt or negative_prompt_ids, not both")
            kwargs["negative_prompt_ids"] = (self.encode(negative) if isinstance(negative, str)
                                             else [self.encode(x) for x in negative])  # fmt: skip
        words = kwargs.pop("force_words", None)
        if words is not None:  # constrained beam search's phrases as text: each a string, or a list of alternatives
            ok = isinstance(words, list) and words and all(
                isinstance(w, str) and w or isinstance(w, list) and w and all(isinstance(x, str) and x for x in w)
                for w in words)  # fmt: skip
            if not ok:
                raise NeolmError("force_words must be a list of phrases, each a non-empty string or a list of "
                                 "alternative strings")  # fmt: skip
            kwargs["force_words_ids"] = [*kwargs.get("force_words_ids", []),
                                         *([self.encode(x) for x in w] if isinstance(w, list) else self.encode(w)
                                           for w in words)]  # fmt: skip
        constrained = kwargs.get("force_words_ids") is not None or kwargs.get("constraints") is not None
        greedy_mode = kwargs.get("penalty_alpha") or (kwargs.get("num_beam_groups") or 1) > 1 or constrained
        if greedy_mode and "do_sample" not in kwargs:  # contrastive, diverse and constrained beam search choose
            kwargs["do_sample"] = False  # without sampling: the checkpoint's sampling defaults give way to them
        gc = GenerationConfig.from_kwargs(**(self.generation_defaults | kwargs))
        if gc.eos_token_id is None:
            gc.eos_token_id = (
                self.config.eos_token_id if self.config.eos_token_id is not None else self.tokenizer.eos_token_id
            )
        if gc.bos_token_id is None:
            gc.bos_token_id = (
                self.config.bos_token_id if self.config.bos_token_id is not None else self.tokenizer.bos_token_id
            )
        if gc.structured_outputs is not None:
            gc.structured_outputs = structured.compile(gc.structured_outputs, self.tokenizer)
        return gc

    def generate_ids(self, prompts: list[list[int]], **kwargs) -> list[list[int]] | GenerateOutput:
        """New token ids for each prompt's token ids (x num_return_sequences, prompt-major); with
        return_dict_in_generate=True a GenerateOutput (output_scores, output_logits, output_hidden_states,
        output_attentions: see generate())."""
        assistant = self._assistant(kwargs.pop("assistant_model", None))
        outputs = _output_options(kwargs)
        adapters, mixed = self._adapter_names(kwargs.pop("adapter_names", None), len(prompts))
        gc = self.generation_config(**kwargs)
        with adapters:
            if outputs is not None:
                return generate_output(self.model, prompts, gc, self.tokenizer.decode, assistant, *outputs, mixed)
            return generate(self.model, prompts, gc, self.tokenizer.decode, assistant, mixed)

    def _adapter_names(self, names, prompts: int):
        """PEFT's adapter_names (an adapter's name per prompt; "__base__": none) as (the context a call runs in,
        multilora.Mixed or None): one adapter for all runs in every mode, different ones in one DecodeBatch."""
        if names is None:
            return contextlib.nullcontext(), None
        if self.adapter_set is None:
            raise NeolmError("adapter_names needs adapters held: load them with load_adapter()")
        mixed = self.adapter_set.mixed(names, prompts)
        if len(set(mixed.per_prompt)) == 1:
            return self.adapter_set.using(mixed.per_prompt[0]), None
        return contextlib.nullcontext(), mixed

    def _assistant(self, assistant) -> GPT | Universal | None:
        """The model of an assistant_model argument (a LanguageModel, or a GPT with this one's vocabulary): with
        another tokenizer than this model's, it guesses through text (universal assisted generation)."""
        if assistant is None or isinstance(assistant, (GPT, Universal)):
            return assistant
        if not isinstance(assistant, LanguageModel):
            raise NeolmError(f"assistant_model must be a model from neolm.load, got {type(assistant).__name__}")
        if not self.tokenizer.same_vocabulary(assistant.tokenizer):
            log.info("the assistant model (%s) has another tokenizer than the model: its guesses are carried over "
                     "as text (universal assisted generation)", assistant.source)  # fmt: skip
            return Universal(assistant.model, assistant.tokenizer, self.tokenizer)
        return assistant.model

    def generate(self, prompt: str | list[str], **kwargs) -> str | list[str] | list[list[str]] | GenerateOutput:
        """The continuation of `prompt` (without the prompt itself).

        Keyword arguments are those of `transformers.generate`: max_new_tokens, max_length, min_length,
        min_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, num_return_sequences,
        eos_token_id, pad_token_id, stop_strings, num_beams, length_penalty, early_stopping, num_beam_groups and
        diversity_penalty (diverse beam search, neolm.beam), force_words_ids and constraints (constrained beam
        search, neolm.constrained; or force_words: the phrases as text, each a string or a list of alternatives,
        encoded as given: " Paris" mid-sentence), and its other
        processors (no_repeat_ngram_size, bad_words_ids, sequence_bias, min_p, typical_p, ...: GenerationConfig);
        plus seed (reproducible sampling), truncate_prompt, and OpenAI's presence_penalty and frequency_penalty.
        Classifier-free guidance (neolm.guidance): guidance_scale, with negative_prompt_ids or negative_prompt (text:
        one for all prompts, or one per prompt) as the context to steer away from (default: the prompt's last
        token); each step then costs two forwards.
        token_healing=True (neolm.healing): the prompt's last token is chosen again among those that begin with it
        (the text returned follows the prompt as written).
        adapter_names (PEFT's mixed adapter batches): a loaded adapter's name per prompt ("__base__": none), the
        prompts decoded in one batch, each with its own (load_adapter; neolm.multilora).
        Assisted generation (neolm.speculative): prompt_lookup_num_tokens, or assistant_model (a smaller model
        from neolm.load) with num_assistant_tokens and assistant_confidence_threshold; an assistant with another
        tokenizer guesses through text (neolm.universal: assistant_lookbehind, target_lookbehind).
        A string gives a string (a list of them with num_return_sequences > 1: samples, or the best beams first);
        a list of prompts is generated as one batch and gives a list.

        return_dict_in_generate=True gives a GenerateOutput instead (neolm.outputs): every sequence's new tokens
        and texts, with output_scores=True the scores each token was picked from and transition_scores(), with
        output_logits=True the model's logits, with output_hidden_states / output_attentions every layer's hidden
        states and attention weights over its prompt and new tokens, and with beams each hypothesis's score
        (sequences_scores).
        """
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise NeolmError("prompt must be a string or a non-empty list of strings")
        assistant = self._assistant(kwargs.pop("assistant_model", None))
        outputs = _output_options(kwargs)
        adapters, mixed = self._adapter_names(kwargs.pop("adapter_names", None), len(prompts))
        gc = self.generation_config(**kwargs)
        with adapters:
            ids, texts_of = self._prompts(prompts, gc, mixed)
            gc = dataclasses.replace(gc, token_healing=False)
            if outputs is not None:
                out = generate_output(self.model, ids, gc, self.tokenizer.decode, assistant, *outputs, mixed)
                out.texts = texts_of(out.sequences)
                return out
            new = generate(self.model, ids, gc, self.tokenizer.decode, assistant, mixed)
        texts = texts_of(new)
        k = gc.num_return_sequences
        grouped = [texts[i * k : (i + 1) * k] for i in range(len(prompts))]
        if k == 1:
            return texts[0] if single else texts
        return grouped[0] if single else grouped

    def _prompts(self, prompts: list[str], gc: GenerationConfig, mixed=None):
        """The prompts' token ids (healed with gc.token_healing: neolm.healing, each with its adapter), and how to
        give a generation's new tokens (each prompt's num_return_sequences, prompt-major) as the text that follows
        its prompt."""
        ids = [self.encode(p) for p in prompts]
        if not gc.token_healing:
            return ids, lambda new: [self.decode(seq) for seq in new]
        healed = []
        for i, p in enumerate(ids):
            with contextlib.nullcontext() if mixed is None else mixed.adapters.using(mixed.per_prompt[i]):
                healed.append(heal(self.model, self.tokenizer, p))
        k = gc.num_return_sequences
        return [h.ids for h in healed], lambda new: [healed[i // k].continuation(self.tokenizer, seq)
                                                     for i, seq in enumerate(new)]  # fmt: skip

    def stream(self, prompt: str, **kwargs) -> Iterator[str]:
        """Text pieces of the continuation as tokens are produced (never half a UTF-8 character).

        The request is checked when stream() is called; the pieces come as the iterator is consumed.
        """
        assistant = self._assistant(kwargs.pop("assistant_model", None))
        gc = self.generation_config(**kwargs)
        if gc.num_return_sequences != 1:
            raise NeolmError("streaming produces one sequence; num_return_sequences must be 1")
        if not isinstance(prompt, str):
            raise NeolmError("stream() takes one prompt string")
        ids, decode = self.encode(prompt), self.tokenizer.decode
        head = ""  # what a healed last token adds to the prompt's text
        if gc.token_healing:
            healed = heal(self.model, self.tokenizer, ids)
            ids, head, gc = healed.ids, healed.head(self.tokenizer), dataclasses.replace(gc, token_healing=False)
        if assistant is not None or gc.assisted:  # tokens come a round at a time
            tokens = assisted_tokens(self.model, ids, gc, decode, assistant)
        elif gc.contrastive or gc.dola_layers is not None:  # one sequence at a time, outside a DecodeBatch
            tokens = (contrastive_tokens if gc.contrastive else dola_tokens)(self.model, ids, gc, decode)
        else:
            return self._pieces(iter_generate(self.model, [ids], gc, decode), head)
        return self._pieces(([token] for token in tokens), head)

    def _pieces(self, steps, head: str = "") -> Iterator[str]:
        if head:
            yield head
        decoder = StreamDecoder(self.tokenizer)
        for (token,) in steps:
            if token is not None:
                piece = decoder.push(token)
                if piece:
                    yield piece
        rest = decoder.flush()
        if rest:
            yield rest

    def trace(
        self,
        text: str | list[str],
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        output_logits: bool = True,
        batch_size: int = TRACE_BATCH_SIZE,
        modules: list[str] | str = (),
    ) -> Trace | list[Trace]:
        """The forward pass over `text` (a list: a Trace each) for analysis (neolm.trace): each token's
        log-probability, the logits, and with output_hidden_states / output_attentions every layer's hidden states
        and every head's attention weights, as transformers gives them; `modules` (names or patterns such as
        "blocks.*.mlp") records those modules' outputs. Text is encoded as generate() encodes it (no token is
        prepended; "<|endoftext|>" in the text is that token, so the first word can be scored)."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise NeolmError("text must be a string or a non-empty list of strings")
        traces = self.trace_ids([self.encode(t) for t in texts], output_hidden_states, output_attentions,
                                output_logits, batch_size, modules)  # fmt: skip
        return traces[0] if single else traces

    def trace_ids(
        self,
        ids: list[list[int]],
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        output_logits: bool = True,
        batch_size: int = TRACE_BATCH_SIZE,
        modules: list[str] | str = (),
    ) -> list[Trace]:
        """trace() of token id sequences."""
        return trace_model(self.model, ids, output_hidden_states, output_attentions, output_logits, batch_size, modules)

    def detect_watermark(self, text: str | Sequence[int], watermarking_config=None, z_threshold: float = 3.0,
                         ignore_repeated_ngrams: bool | None = None) -> Detection | SynthIDDetection:  # fmt: skip
        """Whether `text` (a string, or token ids) carries the watermark of `watermarking_config` (a
        WatermarkingConfig, its dict, or transformers' config; default: the default config), as transformers'
        WatermarkDetector: its green tokens' z-score, p-value and the prediction z > z_threshold; for a SynthID
        config (neolm.synthid), its mean g-value and z-score. ignore_repeated_ngrams: count each distinct n-gram
        once (default: False for the green list, as transformers; True for SynthID). Give the text without its
        prompt; a leading bos token is dropped. Only the tokenizer and vocabulary size are used."""
        ids = self.encode(text) if isinstance(text, str) else [int(t) for t in text]
        return detect_tokens(ids, watermarking_config, self.config, z_threshold, ignore_repeated_ngrams)

    def info(self) -> dict:
        c = self.config
        windows = sorted({w for w in c.layer_windows if w})
        return {
            "source": self.source,
            "family": c.family,
            "parameters": c.n_params(),
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "context": c.n_positions,
            "layers": c.n_layer,
            "hidden size": c.d_model,
            "heads": c.n_head,
            "vocabulary": c.vocab_size,
            "position embedding": c.pos_embedding
            + (f" ({c.rotary_dims}/{c.head_dim} dims, base {c.rotary_base:g})" if c.rotary_dims else ""),
            "attention": "global" + (f" + local (window {', '.join(map(str, windows))})" if windows else ""),
            "residual": "parallel" if c.parallel_residual else "sequential",
            "tokenizer": self.tokenizer.name,
        } | self._quantization()

    def _quantization(self) -> dict:
        quant = getattr(self.model, "quant_config", None)
        if not quant:
            return {}
        from neolm.quant.load import describe

        return {"quantization": describe(quant)}


def _output_options(kwargs: dict) -> tuple[bool, bool, bool, bool] | None:
    """Take return_dict_in_generate and the output_* options out of generate()'s keyword arguments: (output_scores,
    output_logits, output_hidden_states, output_attentions) when a GenerateOutput is asked for, else None."""
    as_dict = kwargs.pop("return_dict_in_generate", False)
    names = ("output_scores", "output_logits", "output_hidden_states", "output_attentions")
    asked = tuple(bool(kwargs.pop(name, False)) for name in names)
    if any(asked) and not as_dict:
        raise NeolmError(f"{', '.join(n for n, a in zip(names, asked) if a)} need return_dict_in_generate=True")
    return asked if as_dict else None


def _adapter_merge(adapter: str | os.PathLike, config: Config):
    """checkpoint.load_state_dict's adjust: each adapted weight plus its LoRA update (in fp32, then its dtype)."""
    from neolm.adapter import lora_deltas

    deltas = lora_deltas(hub.resolve(adapter), config)

    def adjust(name: str, tensor: torch.Tensor) -> torch.Tensor:
        delta = deltas.get(name)
        if delta is None:
            return tensor
        return (tensor.float() + delta).to(tensor.dtype)

    return adjust


def _default_model() -> Path:
    if (DEFAULT_MODEL_DIR / "config.json").exists():
        return DEFAULT_MODEL_DIR
    raise NeolmError(
        "neolm does not ship a default model yet: pass a model, a local checkpoint folder or a hub id "
        "such as EleutherAI/gpt-neo-125M or EleutherAI/pythia-160m"
    )


def load(
    model: str | os.PathLike | None = None,
    revision: str | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    quantize: str | None = None,
    group_size: int = 64,
    quantize_head: bool = False,
    compile: bool = False,
    native: bool = True,
    quantize_activations: bool = False,
    kv_cache_dtype: str | torch.dtype | None = None,
    mmap: bool = False,
    huge_pages: bool = False,
    chat_template: str | None = None,
    adapter: str | os.PathLike | None = None,
) -> LanguageModel:
    """Load a GPT-Neo or GPT-NeoX checkpoint: a local folder, a hub id, or `modelscope:ID`.

    revision: a hub branch, tag or commit (Pythia's training checkpoints are "step1000", ...).
    dtype: float32 | bfloat16 | float16 (default float32 on CPU, half precision on GPU).
    device: cpu | cuda | cuda:N (default: cuda when available).
    quantize: None | "int8" | "int4": quantize the weights while loading (group_size for int4: 32, 64,
    128 or 256); quantize_head: the output head too (faster decoding, a little less exact; by default it
    stays in floating point). Quantized folders (`neolm quantize`, bitsandbytes 4-bit) load as such without it.
    quantize_activations: with int8 or int4 weights on CPU, quantize each matmul's input rows to int8 as well
    (W8A8 / W4A8, a scale per row, as CTranslate2's int8 and llama.cpp's Q8_0 and Q4_0 types do) and multiply in
    integers with AVX-512 VNNI: prompts and batches faster, at some of the activations' precision
    (bench/QUANT_QUALITY.md).
    kv_cache_dtype: float32 | bfloat16 | float16 | int8: the dtype of the keys and values kept while generating
    and scoring (default "auto": the model's dtype, exact). bfloat16 for a float32 model halves the cache's
    memory and the bytes each decode step reads from it (what long contexts and batches spend their time on;
    llama.cpp keeps f16 caches by default), at bf16's precision for keys and values. int8 quarters them (plus
    a scale per key and value, 4 bytes per head_dim numbers): each key and value row of each head as int8 codes
    with an fp32 scale (max |x| / 127, as llama.cpp's q8_0 cache type, in one block per row); attention
    computes in fp32 over them. The native decode step takes float32, bfloat16 and int8 caches.
    native: on CPU, run each decode step (one sequence, or a batch of up to 12) through every block in one
    call of neolm's AVX-512 kernels (neolm.native.decode; built with the system's C++ compiler on first use,
    cached), and every float layer's products of up to 12 rows on them (short prompts, assisted generation's
    forwards of a few tokens: 1.2-1.4x faster than oneDNN's at pythia-1.4b), where this machine can build them;
    quantized layers take them for products of any size (codes converted for oneDNN's GEMM from 48 rows on,
    int4 from 160, or 64 where the GEMM runs in fp32; on a CPU whose bf16 is slow, int8 against activations in
    16 bits a row (int8a8.cpp, VNNI; without it int8f.cpp's fp32 panels) and int4 in int4h.cpp's fp16 panels at
    every size), the attention of prompts and their rotary embedding (neolm.native.attention); and glibc's
    malloc keeps freed memory for the next pass instead of faulting it in again (neolm.memory.reuse_freed,
    process-wide). On a CUDA GPU: replay each decode step as a CUDA graph (neolm.cuda_graphs), recorded on the
    first step of each batch shape and KV cache. Training stays in torch. False: every step and layer in torch
    and aten.
    mmap: on CPU, weights stored in the dtype asked for stay in the file's pages (copy-on-write, shared with
    the page cache and with every process mapping the same file) instead of being copied into the process's
    memory, as llama.cpp does by default: the load takes next to no time or new memory. Decoding from them was
    3-12% slower for Hugging Face files and as fast as the copy for files neolm saved (64-byte aligned;
    bench/PROFILE.md, sessions 20-21). Converted, fused (GPT-Neo's q/k/v) and quantized weights are
    copied either way.
    huge_pages: on CPU (Linux), move the weights into memory advised for transparent huge pages (2 MiB) once
    they are loaded: fewer TLB misses as each decode step streams them. On a Zen 4 EPYC VM pythia-160m decoded
    1.02-1.12x faster (fp32, bf16, int8, int4) and pythia-1.4b 1.08-1.12x, while its load took 1.9-5 s longer;
    on a Xeon VM decoding was no faster (bench/PROFILE.md, sessions 20 and 43): measure on your machine. Needs the
    kernel's transparent huge pages set to "madvise" or "always" (/sys/kernel/mm/transparent_hugepage/enabled);
    not with mmap=True (it copies the weights out of the file).
    compile: on CPU, instead time every kernel each layer shape can use for one-token products (the output
    head's; every block's too when no native step runs) and keep the fastest (neolm.native's, torch.compile's
    or the layer's own; needs a C++ compiler; neolm.ops.compile_gemv).
    chat_template: a Jinja chat template (a file's path, or the template itself) to use instead of the
    checkpoint's own (its chat_template.jinja or tokenizer_config.json's chat_template; without one, chats are
    written as a plain transcript; neolm.chat).
    adapter: a LoRA adapter in PEFT's format (a folder or hub id with adapter_config.json), merged into the
    weights as they load, before any quantization (neolm.adapter).
    """
    start = time.perf_counter()
    if quantize_head and quantize is None:
        raise NeolmError("quantize_head needs quantize= (int8 or int4)")
    if huge_pages and mmap:
        raise NeolmError("huge_pages copies the weights into memory of their own; mmap leaves them in the file: "
                         "choose one")  # fmt: skip
    if quantize_activations and not native:
        raise NeolmError("quantize_activations needs neolm's native kernels (native=True)")
    kv_dtype = None if kv_cache_dtype in (None, "auto") else KV_CACHE_DTYPES.get(kv_cache_dtype, kv_cache_dtype)
    if kv_dtype is not None and kv_dtype not in KV_CACHE_DTYPES.values():
        raise NeolmError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; use auto, float32, bfloat16, float16 or int8")
    if quantize is not None:
        from neolm.quant.linear import check_group_size, parse_quantize

        parse_quantize(quantize)
        check_group_size(group_size)
    folder = _default_model() if model is None else hub.resolve(model, revision)
    raw_config = checkpoint.read_hf_config(folder)
    config = Config.from_hf(raw_config, source=str(folder / "config.json"))
    chat_format = load_chat_format(folder, chat_template)  # before the weights: a bad template fails at once
    device = parse_device(device)
    if huge_pages and device.type != "cpu":
        raise NeolmError(f"huge_pages is for weights in CPU memory, not on {device}")
    dtype = parse_dtype(dtype, device, raw_config.get("torch_dtype") or raw_config.get("dtype"))
    adjust = _adapter_merge(adapter, config) if adapter is not None else None
    if quantize is not None or raw_config.get("quantization_config"):
        from neolm.quant.load import load_model

        net = load_model(folder, raw_config, config, dtype, device, quantize, group_size, quantize_head, native,
                         quantize_activations, adjust)  # fmt: skip
    else:
        state = checkpoint.load_state_dict(folder, config, dtype, mmap=mmap and device.type == "cpu", adjust=adjust)
        net = checkpoint.build_model(config, state, device)
        del state  # (its tensors share the parameters' storages: huge_pages' move frees each as it goes, not at the end)
    if quantize_activations:
        from neolm.quant.linear import quantize_activations as quantize_inputs

        quantize_inputs(net)
    net.kv_dtype = kv_dtype
    if huge_pages:
        _into_huge_pages(net)
    if compile:
        compile_gemv(net)
    if native and device.type == "cuda":
        why_not = cuda_graphs.attach(net)
        log.info("decode steps: %s", f"in torch ({why_not})" if why_not else "CUDA graphs (one launch per step)")
    elif native:
        why_not = decode.attach(net)
        log.info("decode steps: %s", f"in torch ({why_not})" if why_not else "native (one call per step)")
        why_not = attention.attach(net)
        log.info("prompt attention: %s", f"in torch ({why_not})" if why_not else "native")
        if not compile:  # products of 2 to FEW_ROWS rows: short prompts, assisted generation's checks
            use_native([m for m in net.modules() if callable(getattr(m, "gemv_kernels", None))])
        if device.type == "cpu":
            memory.reuse_freed()
    tokenizer = load_tokenizer(folder, default=config.tokenizer)
    defaults = checkpoint.read_generation_defaults(folder, GenerationConfig.field_names())
    seconds = time.perf_counter() - start
    log.info("loaded %s (%s, %s) in %.1fs", folder, config.family, dtype, seconds)
    return LanguageModel(net, tokenizer, str(model if model is not None else folder), seconds, defaults, chat_format)


def _into_huge_pages(net) -> None:
    """neolm.load(huge_pages=True): the weights in CPU memory moved into transparent huge pages, or a warning."""
    mode = memory.transparent_huge_pages()
    if mode not in ("always", "madvise"):
        why = f"they are set to {mode!r} ({memory.THP_ENABLED})" if mode else "this system has none"
        log.warning("huge_pages: weights left in 4 KiB pages: %s", why)
        return
    moved, huge = memory.into_huge_pages(memory.module_tensors(net))
    log.info("huge_pages: %.0f MB of weights moved, %.0f MB of them in huge pages", moved / 1e6, huge / 1e6)
    if moved and huge < moved // 2:
        log.warning("huge_pages: the kernel gave huge pages to %.0f of %.0f MB of weights (short of free 2 MiB "
                    "blocks; /proc/sys/vm/compact_memory may help)", huge / 1e6, moved / 1e6)  # fmt: skip


class TextGenerationPipeline:
    """`transformers.pipeline("text-generation")`'s call shape: text(s) in, [{"generated_text": ...}] out.

    A chat (a list of {"role", "content"} messages) or a list of chats in gives, as transformers', the
    conversation with the assistant's reply added (return_full_text=False: the reply alone); a chat that ends
    with the assistant's message has it continued."""

    def __init__(self, lm: LanguageModel):
        self.lm = lm

    def __call__(self, text_inputs, return_full_text: bool = True, **kwargs):
        if kwargs.get("return_dict_in_generate"):
            raise NeolmError("the pipeline gives texts; for return_dict_in_generate call the model's generate()")
        one_chat = _is_chat(text_inputs)
        if one_chat or (isinstance(text_inputs, list) and text_inputs and all(map(_is_chat, text_inputs))):
            results = []
            for messages in [text_inputs] if one_chat else text_inputs:
                conversation = Conversation(self.lm, messages, **kwargs)
                reply = "".join(conversation.reply())
                results.append([{"generated_text": conversation.messages if return_full_text else reply}])
            return results[0] if one_chat else results
        single = isinstance(text_inputs, str)
        prompts = [text_inputs] if single else list(text_inputs)
        outputs = self.lm.generate(prompts, **kwargs)
        results = []
        for prompt, out in zip(prompts, outputs):
            texts = [out] if isinstance(out, str) else out
            results.append([{"generated_text": (prompt if return_full_text else "") + t} for t in texts])
        return results[0] if single else results


def _is_chat(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def pipeline(task: str, model: str | os.PathLike | None = None, **load_kwargs) -> TextGenerationPipeline:
    """`neolm.pipeline("text-generation", model=...)`, as on the GPT-Neo model cards."""
    if task != "text-generation":
        raise NeolmError(f"unknown pipeline task {task!r}; neolm has 'text-generation'")
    return TextGenerationPipeline(load(model, **load_kwargs))

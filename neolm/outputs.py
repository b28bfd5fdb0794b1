"""What generation gives with transformers' return_dict_in_generate=True: the sequences, with output_scores the
scores each token was picked from, with output_logits the model's logits, with output_hidden_states and
output_attentions every layer's hidden states and attention weights, and for beam search each hypothesis's score.

transformers pads: its `scores` are a tuple over steps of (batch, V), and its sequences hold the prompt and
padding. neolm keeps to its own convention of each sequence's new tokens, unpadded, so each sequence gets its
own (new tokens, V) tensors; row t is the step that gave its token t (with assisted generation: the model's
position that gave or checked it). `transition_scores()` is transformers' compute_transition_scores for them.

Hidden states and attention weights are those of the tokens the model read to choose the new ones: the prompt
and every new token but the last, positions 0 .. T - 1 (transformers: the prompt's at the first step, then one
position a step). They come from one forward over each finished sequence (neolm.trace), which gives what the
generation's own forwards computed (a causal model's position sees no later token), up to rounding, in every
mode; decoding itself stays on its fast path, which records nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from neolm.beam import beam_hypotheses
from neolm.contrastive import contrastive_generate
from neolm.dola import dola_generate
from neolm.errors import NeolmError
from neolm.generate import check_mixed, generate, iter_steps
from neolm.generation_config import GenerationConfig, fit_prompts
from neolm.model import GPT
from neolm.multilora import Mixed
from neolm.speculative import assisted_generate
from neolm.trace import Trace, trace


@dataclass
class GenerateOutput:
    """Sequences in generate()'s order (prompts x num_return_sequences, prompt-major)."""

    sequences: list[list[int]]  # each sequence's new tokens (an eos that ended it included)
    scores: list[torch.Tensor] | None = None  # output_scores: (new tokens, V) fp32, processors and warpers applied
    logits: list[torch.Tensor] | None = None  # output_logits: (new tokens, V) fp32, the model's raw logits
    sequences_scores: list[float] | None = None  # beam search: each hypothesis's length-penalised log-probability
    # output_hidden_states: per sequence, n_layer + 1 of (T, C) (neolm.trace.Trace's, for the T tokens read)
    hidden_states: list[tuple[torch.Tensor, ...]] | None = None
    attentions: list[tuple[torch.Tensor, ...]] | None = None  # output_attentions: per sequence, n_layer of (H, T, T)
    texts: list[str] | None = None  # the sequences decoded (LanguageModel.generate)

    def transition_scores(self, normalize_logits: bool = False) -> list[torch.Tensor]:
        """(new tokens,) per sequence: the score of each token it got, as transformers' compute_transition_scores;
        normalize_logits: of the log-softmax of the scores (with sampling's warpers: the distribution sampled)."""
        if self.scores is None:
            raise NeolmError("transition scores need output_scores=True")
        out = []
        for seq, scores in zip(self.sequences, self.scores):
            scores = torch.log_softmax(scores, dim=-1) if normalize_logits else scores
            out.append(scores.gather(1, torch.tensor(seq, dtype=torch.long, device=scores.device)[:, None])[:, 0])
        return out


def generate_output(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    gc: GenerationConfig,
    decode: Callable[[list[int]], str] | None = None,
    assistant: GPT | None = None,
    output_scores: bool = False,
    output_logits: bool = False,
    output_hidden_states: bool = False,
    output_attentions: bool = False,
    mixed: Mixed | None = None,
) -> GenerateOutput:
    """generate(), as a GenerateOutput: with the scores and logits of each new token when asked (with beam search:
    of the beam each hypothesis's token continued, at the step that chose it), and the hidden states and attention
    weights of each sequence's tokens (see above). mixed: as generate()'s."""
    out = _generated(model, prompts, gc, decode, assistant, output_scores, output_logits, mixed)
    if output_hidden_states or output_attentions:
        _trace_into(out, model, prompts, gc, output_hidden_states, output_attentions, mixed)
    return out


def _generated(model: GPT, prompts, gc: GenerationConfig, decode, assistant: GPT | None, output_scores: bool,
               output_logits: bool, mixed: Mixed | None) -> GenerateOutput:  # fmt: skip
    per_step = output_scores or output_logits
    check_mixed(gc, assistant, mixed)  # (so none of the modes below gets one)
    n, vocab = len(prompts) * gc.num_return_sequences, model.config.vocab_size
    if per_step and (assistant is not None or gc.assisted):
        return _each_alone(lambda on_token: assisted_generate(model, prompts, gc, decode, assistant, on_token), n,
                           output_scores, output_logits, vocab)  # fmt: skip
    if per_step and (gc.contrastive or gc.dola_layers is not None):
        run = contrastive_generate if gc.contrastive else dola_generate
        return _each_alone(lambda on_token: run(model, prompts, gc, decode, on_token), n, output_scores, output_logits,
                           vocab)  # fmt: skip
    if gc.num_beams > 1:
        beams = beam_hypotheses(model, prompts, gc, decode, output_scores, output_logits)
        return GenerateOutput(beams.sequences, beams.token_scores, beams.token_logits, sequences_scores=beams.scores)
    if not per_step:
        return GenerateOutput(generate(model, prompts, gc, decode, assistant, mixed))
    steps = iter_steps(model, prompts, gc, decode, keep_logits=output_logits, keep_scores=output_scores, mixed=mixed)
    sequences: list[list[int]] = [[] for _ in range(n)]
    kept = {"scores": [[] for _ in range(n)], "logits": [[] for _ in range(n)]}
    for step in steps:  # (rows: the sequences in order)
        for row, token in enumerate(step.tokens):
            if token is None:
                continue
            sequences[row].append(token)
            for name, table in (("scores", step.processed), ("logits", step.logits)):
                if table is not None:
                    kept[name][row].append(table[row])
    return _output(sequences, kept, output_scores, output_logits, model.config.vocab_size)


def _each_alone(run: Callable, n: int, output_scores: bool, output_logits: bool, vocab: int) -> GenerateOutput:
    """A generation that runs one sequence at a time, run(on_token) -> the n sequences, with each token's logits and
    the scores it was picked from: assisted generation's are the model's at the position that gave (or checked)
    the token; contrastive search's scores are those its candidates were taken from."""
    kept = {"scores": [[] for _ in range(n)], "logits": [[] for _ in range(n)]}

    def on_token(i: int, logits: torch.Tensor, scores: torch.Tensor) -> None:
        if output_logits:
            kept["logits"][i].append(logits)
        if output_scores:
            kept["scores"][i].append(scores)

    return _output(run(on_token), kept, output_scores, output_logits, vocab)


def _output(sequences, kept: dict, output_scores: bool, output_logits: bool, vocab: int) -> GenerateOutput:
    def stacked(rows: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        return [torch.stack(r) if r else torch.empty(0, vocab) for r in rows]

    return GenerateOutput(
        sequences,
        scores=stacked(kept["scores"]) if output_scores else None,
        logits=stacked(kept["logits"]) if output_logits else None,
    )


def _trace_into(out: GenerateOutput, model: GPT, prompts, gc: GenerationConfig, hidden: bool, attentions: bool,
                mixed: Mixed | None) -> None:  # fmt: skip
    """Fill out's hidden states and attentions from one forward over each sequence's tokens read (each with its
    prompt's adapter, with `mixed`)."""
    fitted = fit_prompts(prompts, gc, model.config.n_positions, model.config.vocab_size)  # (as truncated)
    n = gc.num_return_sequences
    read = [fitted[i // n] + seq[:-1] for i, seq in enumerate(out.sequences)]
    adapter = [0 if mixed is None else mixed.per_prompt[i // n] for i in range(len(read))]
    traces: list[Trace | None] = [None] * len(read)
    for a in sorted(set(adapter)):
        rows = [i for i, x in enumerate(adapter) if x == a]
        with contextlib.nullcontext() if mixed is None else mixed.adapters.using(a):
            for i, t in zip(rows, trace(model, [read[i] for i in rows], hidden, attentions, logits=False)):
                traces[i] = t
    out.hidden_states = [t.hidden_states for t in traces] if hidden else None
    out.attentions = [t.attentions for t in traces] if attentions else None

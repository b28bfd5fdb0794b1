"""What generation gives with transformers' return_dict_in_generate=True: the sequences, with output_scores the
scores each token was picked from, with output_logits the model's logits, and for beam search each hypothesis's
score.

transformers pads: its `scores` are a tuple over steps of (batch, V), and its sequences hold the prompt and
padding. neolm keeps to its own convention of each sequence's new tokens, unpadded, so each sequence gets its
own (new tokens, V) tensors; row t is the step that gave its token t (with assisted generation: the model's
position that gave or checked it). `transition_scores()` is transformers' compute_transition_scores for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from neolm.beam import beam_hypotheses
from neolm.contrastive import contrastive_generate
from neolm.dola import dola_generate
from neolm.errors import NeolmError
from neolm.generate import check_mixed, generate, iter_steps
from neolm.generation_config import GenerationConfig
from neolm.model import GPT
from neolm.multilora import Mixed
from neolm.speculative import assisted_generate


@dataclass
class GenerateOutput:
    """Sequences in generate()'s order (prompts x num_return_sequences, prompt-major)."""

    sequences: list[list[int]]  # each sequence's new tokens (an eos that ended it included)
    scores: list[torch.Tensor] | None = None  # output_scores: (new tokens, V) fp32, processors and warpers applied
    logits: list[torch.Tensor] | None = None  # output_logits: (new tokens, V) fp32, the model's raw logits
    sequences_scores: list[float] | None = None  # beam search: each hypothesis's length-penalised log-probability
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
    mixed: Mixed | None = None,
) -> GenerateOutput:
    """generate(), as a GenerateOutput: with the scores and logits of each new token when asked (with beam search:
    of the beam each hypothesis's token continued, at the step that chose it). mixed: as generate()'s."""
    per_step = output_scores or output_logits
    check_mixed(gc, assistant, mixed)  # (so none of the modes below gets one)
    n, vocab = len(prompts) * gc.num_return_sequences, model.config.vocab_size
    if per_step and (assistant is not None or gc.prompt_lookup_num_tokens is not None):
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

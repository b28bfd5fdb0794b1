"""A job's events (engine.py) turned into OpenAI's answer: each choice's text as it grows, and the whole response.
The HTTP server (http.py) streams or sends them; `neolm batch` (batch.py) writes them to a file."""

from __future__ import annotations

from collections.abc import Iterator

from neolm.chat import Reply
from neolm.errors import NeolmError
from neolm.serve import protocol
from neolm.serve.engine import End, Job, Prompt, ShuttingDown, Token
from neolm.serve.protocol import ApiError, Request
from neolm.serve.tools import Held
from neolm.tokenizer import StreamDecoder


def choices(request: Request, job: Job, tokenizer, sums: list[float] | None = None) -> Iterator[tuple]:
    """Yield (choice index, text, finish reason or None, tokens generated: at its end, else 0, the choice's
    protocol.Logprob entries since the last yield) as the job produces them; add each choice's tokens'
    log-probabilities to `sums`, if given. A cancelled job's choices that had not ended end with reason None and
    the tokens they had generated."""
    n = request.gc.num_return_sequences
    replies = [Reply(request.stop, request.lstrip) for _ in range(job.sequences)]
    auto = request.tool_choice.auto if request.tool_choice else None  # the format of the calls read from replies
    decoders = [StreamDecoder(tokenizer, keep=auto.markers if auto else ()) for _ in range(job.sequences)]
    counts: list[int | None] = [0] * job.sequences  # tokens of each choice so far; None once it has ended
    offsets = [0] * job.sequences  # characters of each choice decoded so far, echo included: a token's text_offset
    pending: list[list[protocol.Logprob]] = [[] for _ in range(job.sequences)]

    def echo(p: int, entries: list[protocol.Logprob]):  # prompt p's text at the start of each of its choices
        for i in range(p * n, (p + 1) * n):
            offsets[i] = len(request.echo[p])
            yield i, request.echo[p], None, 0, entries

    if request.echo and not request.prompt_logprobs:  # else with the prompt's log-probabilities, below
        for p in range(len(job.prompts)):
            yield from echo(p, [])
    for event in job:
        if isinstance(event, Prompt):
            prompt = job.prompts[event.prompt]
            yield from echo(event.prompt, protocol.prompt_logprobs(prompt, event.logprobs, event.top, tokenizer))
            continue
        s, reply = event.sequence, replies[event.sequence]
        if isinstance(event, Token):
            counts[s] += 1
            if sums is not None:
                sums[s] += event.logprob
            piece = decoders[s].push(event.token)
            if request.logprobs is not None:
                pending[s].append(protocol.Logprob(event.token, event.logprob, event.top, offsets[s]))
            offsets[s] += len(piece)
            text = reply.push(piece)
            if text:
                yield s, text, None, 0, pending[s]
                pending[s] = []
        elif isinstance(event, End):
            text = reply.finish(decoders[s].flush())
            yield s, text, "stop" if reply.stopped else event.reason, event.tokens, pending[s]
            pending[s], counts[s] = [], None
    for s, count in enumerate(counts):  # (cancelled)
        if count is not None and job.cancelled.is_set():
            yield s, replies[s].finish(decoders[s].flush()), None, count, pending[s]


def failure(e: NeolmError) -> ApiError:
    """The answer to a generation that ended in `e`: 503 when the server shut down first (ShuttingDown), else 500."""
    return ApiError(503 if isinstance(e, ShuttingDown) else 500, str(e), kind="server_error")


def whole(request: Request, job: Job, tokenizer, model_name: str) -> dict:
    """The whole (non-streamed) response, once the job has ended; ApiError (500) if its generation failed."""
    texts, reasons, generated = [""] * job.sequences, ["length"] * job.sequences, 0
    entries: list[list[protocol.Logprob]] = [[] for _ in range(job.sequences)]
    k = request.gc.num_return_sequences
    sums, counts = ([0.0] * job.sequences, [0] * job.sequences) if request.ranked else (None, None)
    try:
        for i, text, reason, tokens, logprobs in choices(request, job, tokenizer, sums):
            texts[i] += text
            entries[i] += logprobs
            generated += tokens
            if reason:
                reasons[i] = reason
                if counts is not None:
                    counts[i] = tokens
    except NeolmError as e:
        raise failure(e) from None
    if sums is not None:  # best_of: each prompt's n with the highest mean log-probability per token
        keep = []
        for p in range(len(job.prompts)):
            mine = range(p * k, (p + 1) * k)
            keep += sorted(mine, key=lambda i: sums[i] / max(counts[i], 1), reverse=True)[: request.n]
        texts, reasons, entries = ([x[i] for i in keep] for x in (texts, reasons, entries))
    choice_logprobs = [protocol.logprobs(request, e, tokenizer) for e in entries]
    return protocol.response(request, model_name, texts, reasons, generated, choice_logprobs, job.cached)


def chunks(request: Request, job: Job, tokenizer, model_name: str) -> Iterator[dict]:
    """A streamed answer's chunks as the job produces them: each choice's text (or tool calls), its end, then the
    usage if asked; an error's body if generation fails."""
    if request.kind == "chat":
        for i in range(job.sequences):
            yield protocol.chunk(request, model_name, i, None)
    generated = 0
    tool = request.tool_choice
    held = [Held(tool) for _ in range(job.sequences)] if tool and tool.name is None else None
    try:
        for i, text, reason, tokens, logprobs in choices(request, job, tokenizer):
            generated += tokens
            if held is not None:  # tool_choice "required" or "auto": calls as they are written or once whole
                delta = held[i].push(text)
                if delta:
                    yield protocol.held_chunk(request, model_name, i, delta)
                if reason:
                    yield protocol.calls_chunk(request, model_name, i, held[i], reason)
            elif text or reason or logprobs:
                entries = protocol.logprobs(request, logprobs, tokenizer)
                yield protocol.chunk(request, model_name, i, text, reason, entries)
    except NeolmError as e:
        yield failure(e).body()
        return
    if request.include_usage:
        yield protocol.usage_chunk(request, model_name, generated, job.cached)

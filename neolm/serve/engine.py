"""The server's scheduler: one thread owns the model and runs every request's generation.

Requests become `Job`s (their prompts as token ids, already fitted to the context, and one GenerationConfig).
The engine thread takes the oldest waiting job and, unless it has a seed (a seeded request gets what it would
get alone), every other waiting job with the same settings, up to `max_batch` sequences: they decode as one
batch (neolm.generate.iter_generate, left-padded, so each sequence gets exactly the tokens it would get alone).
A job that arrives while a batch runs waits for the next one. Each job's tokens go to its own queue as they
are produced; the HTTP threads read them from there. A job may ask for log-probabilities: of each token it
gets, with the k most likely alternatives (the batch computes the largest k any of its jobs asks for), and of
its prompt's tokens (from the forward that reads the prompts; jobs that want them batch only with each other).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from neolm.errors import NeolmError
from neolm.generate import GenerationConfig, TokenLogprobs, fit_prompts, iter_generate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Token:
    sequence: int  # index among the job's sequences (prompt-major: prompt i, sample j -> i * n + j)
    token: int
    logprob: float | None = None  # with the job's logprobs: log p(token) under the model
    top: tuple[tuple[int, float], ...] = ()  # and its `logprobs` most likely (token, log p), most likely first


@dataclass(frozen=True)
class Prompt:
    """A prompt's own log-probabilities (jobs with prompt_logprobs), sent before any of its tokens."""

    prompt: int  # index among the job's prompts
    logprobs: list[float]  # of its tokens 1 .. n-1
    top: list[tuple[tuple[int, float], ...]]  # at each of them, the job's `logprobs` most likely (token, log p)


@dataclass(frozen=True)
class End:
    sequence: int
    reason: str  # "stop" (eos, or a stop string) or "length" (the token budget)
    tokens: int  # how many the sequence generated


class Job:
    """One request's sequences: each prompt x gc.num_return_sequences. Iterate it for Prompt, Token and End
    events (each sequence ends exactly once); it raises NeolmError if the generation failed. `logprobs` (k):
    each Token carries its log-probability and the k most likely tokens; `prompt_logprobs`: a Prompt event
    per prompt, with the same k."""

    def __init__(self, prompts: list[list[int]], gc: GenerationConfig, logprobs: int | None = None,
                 prompt_logprobs: bool = False):  # fmt: skip
        self.prompts, self.gc = prompts, gc
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs
        self.sequences = len(prompts) * gc.num_return_sequences
        self.cancelled = threading.Event()  # set by a client that went away: its sequences stop early
        self._events: queue.SimpleQueue = queue.SimpleQueue()

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[Token | End]:
        while True:
            event = self._events.get()
            if event is None:
                return
            if isinstance(event, Exception):
                raise NeolmError(f"generation failed: {event}")
            yield event


class Engine:
    """Runs jobs on `lm` (a neolm.LanguageModel): run() in the thread that loaded the model (it returns after
    close()), or start() for a thread of its own. submit() checks a request and queues it; close() lets the
    running batch finish and ends run().

    Where the model runs matters: OpenMP (torch's and neolm's kernels) keeps a team of threads per thread that
    starts parallel work, and once the teams outnumber the cores its idle threads sleep at once instead of
    spinning, so every parallel region pays a wake-up. Decoding in a second thread after loading in the first
    ran the bundled model ~3x slower here (2 cores); run() in the loading thread keeps one team."""

    def __init__(self, lm, max_batch: int = 8):
        if max_batch < 1:
            raise NeolmError(f"max_batch must be at least 1, got {max_batch}")
        self.lm, self.max_batch = lm, max_batch
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self.batches = self.generated = 0  # counters for /health and the log
        self.largest_batch = 0  # the most requests decoded together
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """run() in a daemon thread of its own (tests, notebooks; slower decoding, see the class doc)."""
        self._thread = threading.Thread(target=self.run, name="neolm-engine", daemon=True)
        self._thread.start()

    def submit(self, prompts: list[list[int]], gc: GenerationConfig, logprobs: int | None = None,
               prompt_logprobs: bool = False) -> Job:  # fmt: skip
        """Queue the generation of `prompts` (token ids) with `gc` (and log-probabilities: see Job). Raises
        NeolmError, before anything is queued, for a prompt that is empty, out of the vocabulary or too long
        for the context."""
        config = self.lm.config
        if prompt_logprobs and logprobs is None:
            raise NeolmError("prompt_logprobs needs logprobs (how many alternatives per position)")
        job = Job(fit_prompts(prompts, gc, config.n_positions, config.vocab_size), gc, logprobs, prompt_logprobs)
        with self._wake:
            if self._closed:
                raise NeolmError("the server is shutting down")
            self._waiting.append(job)
            self._wake.notify()
        return job

    def close(self, timeout: float | None = None) -> None:
        """Refuse new jobs, end the waiting ones, and wait (at most `timeout` s) for run() to return."""
        with self._wake:
            self._closed = True
            for job in self._waiting:  # never started: end them
                job._events.put(NeolmError("the server is shutting down"))
                job._events.put(None)
            self._waiting.clear()
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _next_batch(self) -> list[Job]:
        with self._wake:
            while not self._waiting and not self._closed:
                # with a timeout: a Ctrl-C that the OS hands to another thread reaches a main thread waiting here
                # only when it returns to Python
                self._wake.wait(timeout=0.25)
            if self._closed:
                return []
            first = self._waiting.popleft()
            batch, rows = [first], first.sequences
            if first.gc.seed is None:
                for job in list(self._waiting):
                    if (job.gc.seed is None and job.gc == first.gc and job.prompt_logprobs == first.prompt_logprobs
                            and rows + job.sequences <= self.max_batch):  # fmt: skip
                        self._waiting.remove(job)
                        batch.append(job)
                        rows += job.sequences
            return batch

    def run(self) -> None:
        """Serve jobs until close()."""
        while batch := self._next_batch():
            live = [job for job in batch if not job.cancelled.is_set()]
            try:
                if live:
                    self._generate(live)
            except Exception as error:  # a bug or out of memory: fail these requests, keep serving
                log.exception("generation failed")
                for job in live:
                    job._events.put(error)
            finally:
                for job in batch:
                    job._events.put(None)

    def _generate(self, batch: list[Job]) -> None:
        gc = batch[0].gc
        n = gc.num_return_sequences
        prompts = [p for job in batch for p in job.prompts]
        owners = [(job, i) for job in batch for i in range(job.sequences)]  # iter_generate's order, prompt-major
        budgets = [gc.new_token_budget(len(p)) for p in prompts for _ in range(n)]
        eos_ids = set(gc.eos_ids(self.lm.config.eos_token_id))
        counts, last = [0] * len(owners), [None] * len(owners)
        ended = [False] * len(owners)

        def end(s: int) -> None:
            ended[s] = True
            job, i = owners[s]
            stopped = last[s] in eos_ids or counts[s] < budgets[s]  # eos, or a stop string before the budget
            job._events.put(End(i, "stop" if stopped else "length", counts[s]))

        start = time.perf_counter()
        self.batches += 1
        self.largest_batch = max(self.largest_batch, len(batch))
        wanted = [job.logprobs for job in batch if job.logprobs is not None]
        k = max(wanted) if wanted else None
        firsts = [(job, i) for job in batch for i in range(len(job.prompts))]  # whose prompt each one is

        def on_prompt(p: int, scores: TokenLogprobs) -> None:
            job, i = firsts[p]
            top = [scores.pairs(j, job.logprobs) for j in range(len(scores.chosen))]
            job._events.put(Prompt(i, scores.chosen, top))

        steps = iter_generate(self.lm.model, prompts, gc, self.lm.tokenizer.decode, logprobs=k,
                              on_prompt=on_prompt if batch[0].prompt_logprobs else None)  # fmt: skip
        try:
            for step in steps:
                step, scores = step if k is not None else (step, None)
                for s, token in enumerate(step):
                    if token is None:
                        if not ended[s]:
                            end(s)
                        continue
                    counts[s] += 1
                    last[s] = token
                    job, i = owners[s]
                    if job.logprobs is None:
                        job._events.put(Token(i, token))
                    else:
                        job._events.put(Token(i, token, scores.chosen[s], scores.pairs(s, job.logprobs)))
                if all(job.cancelled.is_set() for job in batch):
                    log.info("every request of the batch went away: stopped")
                    break
        finally:
            steps.close()
        for s in range(len(owners)):
            if not ended[s]:
                end(s)
        self.generated += sum(counts)
        log.info("batch of %d sequences (%d requests): %d tokens in %.2fs", len(owners), len(batch), sum(counts),
                 time.perf_counter() - start)  # fmt: skip

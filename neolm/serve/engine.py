"""The server's scheduler: one thread owns the model and runs every request's generation.

Requests become `Job`s (their prompts as token ids, already fitted to the context, and one GenerationConfig).
The engine thread keeps one neolm.generate.DecodeBatch running (continuous batching): before each step it
adds the jobs that have arrived, as long as the batch holds fewer than `max_batch` sequences, and a
sequence leaves the batch when it ends. A prompt joins once it has been read into a cache of its own (jobs
that arrive together with equal settings share that read): while sequences decode, `prefill_chunk` prompt
tokens a step between their steps (chunked prefill: a long prompt delays their next tokens by a chunk's
forward, not its whole), else at once. Then it decodes a token per step with every other sequence, whatever
their settings; each sequence gets exactly the tokens it would get alone. With a guesser (speculative decoding,
neolm.serve.speculation), a sequence that decodes alone gets a round of guessed tokens checked per forward instead
(DecodeBatch.steps). A seeded request (which
must get what it would get alone with that seed) runs in a batch of its own; a beam search request runs alone
too, as neolm.beam's search, and sends its hypotheses whole at the end. Each job's tokens go to its own
queue as they are produced; the HTTP threads read them from there. A job may ask for log-probabilities: of
each token it gets, with the k most likely alternatives, and of its prompt's tokens (from the forward that
reads the prompt).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from neolm.beam import beam_hypotheses
from neolm.errors import NeolmError
from neolm.generate import DecodeBatch, Prefill
from neolm.generation_config import GenerationConfig, fit_prompts
from neolm.sampling import TokenLogprobs
from neolm.serve.metrics import Metrics
from neolm.serve.prefix import PrefixCache

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 512  # prompt tokens read per step while sequences run (vLLM's max_num_batched_tokens)
MIN_PREFILL_CHUNK = 256  # smaller chunks read slowly, and run other kernels than a whole forward (see Prefill.read)


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


class ShuttingDown(NeolmError):
    """The engine is closed: it takes no new job."""


class Job:
    """One request's sequences: each prompt x gc.num_return_sequences. Iterate it for Prompt, Token and End
    events (each sequence ends exactly once); it raises NeolmError if the generation failed. `logprobs` (k):
    each Token carries its log-probability and the k most likely tokens; `prompt_logprobs`: a Prompt event
    per prompt, with the same k."""

    def __init__(self, prompts: list[list[int]], gc: GenerationConfig, logprobs: int | None = None,
                 prompt_logprobs: bool = False, adapter: int = 0):  # fmt: skip
        self.prompts, self.gc, self.adapter = prompts, gc, adapter  # adapter: the LoRA adapter's index (0: none)
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs
        self.sequences = len(prompts) * gc.num_return_sequences
        self.cancelled = threading.Event()  # set by a client that went away: its sequences stop early
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self.submitted = time.perf_counter()
        self._first: float | None = None  # when its first token came (the engine's)
        self._counts = [0] * self.sequences  # tokens each sequence has got (the engine's)
        self._tokens: list[list[int]] = [[] for _ in range(self.sequences)]  # and which (with a prefix cache)
        self.cached = 0  # prompt tokens taken from the prefix cache instead of read (set before its first token)
        self._left = self.sequences  # sequences not yet ended (the engine's)

    @property
    def reusable(self) -> bool:
        """One sequence of one prompt, not scored: its prompt may start from a prefix cache entry."""
        return len(self.prompts) == 1 and self.gc.num_return_sequences == 1 and not self.prompt_logprobs

    @property
    def alone(self) -> bool:
        """Seeded sampling (it gets what it would get alone) and beam search (a search of its own) run alone."""
        return (self.gc.do_sample and self.gc.seed is not None) or self.gc.num_beams > 1

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[Token | End]:
        while True:
            event = self._events.get()
            if event is None:
                return
            if isinstance(event, ShuttingDown):  # (the answer is 503, not a failure)
                raise event
            if isinstance(event, Exception):
                raise NeolmError(f"generation failed: {event}")
            yield event


@dataclass
class _Reading:
    """Jobs whose prompts are being read, in the forward(s) they share, before their sequences join the batch."""

    prefill: Prefill
    jobs: list[Job]
    firsts: list[tuple[Job, int]]  # (job, its prompt index) for each prompt of the prefill

    @property
    def sequences(self) -> int:
        return sum(job.sequences for job in self.jobs)


class Engine:
    """Runs jobs on `lm` (a neolm.LanguageModel): run() in the thread that loaded the model (it returns after
    close()), or start() for a thread of its own. submit() checks a request and queues it; close() lets the
    running batch finish and ends run().

    Where the model runs matters: OpenMP (torch's and neolm's kernels) keeps a team of threads per thread that
    starts parallel work, and once the teams outnumber the cores its idle threads sleep at once instead of
    spinning, so every parallel region pays a wake-up. Decoding in a second thread after loading in the first
    ran the bundled model ~3x slower here (2 cores); run() in the loading thread keeps one team."""

    def __init__(self, lm, max_batch: int = 8, prefill_chunk: int = DEFAULT_PREFILL_CHUNK, prefix_cache_mb: int = 0,
                 guesser: Callable | None = None):  # fmt: skip
        if max_batch < 1:
            raise NeolmError(f"max_batch must be at least 1, got {max_batch}")
        if prefill_chunk and prefill_chunk < MIN_PREFILL_CHUNK:
            raise NeolmError(f"prefill_chunk must be 0 (whole prompts) or at least {MIN_PREFILL_CHUNK} tokens, got "
                             f"{prefill_chunk}")  # fmt: skip
        if prefix_cache_mb < 0:
            raise NeolmError(f"prefix_cache_mb must be >= 0 (0: off), got {prefix_cache_mb}")
        self.lm, self.max_batch, self.prefill_chunk = lm, max_batch, prefill_chunk
        self.guesser = guesser  # speculative decoding while one sequence decodes (neolm.serve.speculation)
        self.prefixes = PrefixCache(prefix_cache_mb * 2**20) if prefix_cache_mb else None
        self._waiting: deque[Job] = deque()
        self._tasks: deque[tuple[Callable, Future]] = deque()  # call()'s, run between two steps
        self._wake = threading.Condition()
        self._closed = False
        self._stopping: str | None = None  # stop(): why the jobs it has end now
        self.stopped = 0  # requests ended by stop() (or close() without drain) before their answers were whole
        self.batches = 0  # prompt forwards (for /health)
        self.largest_batch = 0  # the most requests decoded together
        self.metrics = Metrics(speculating=guesser is not None)  # for GET /metrics
        self._thread: threading.Thread | None = None

    @property
    def generated(self) -> int:
        """Tokens generated so far (for /health and the log)."""
        return self.metrics.generation_tokens

    @property
    def waiting(self) -> int:
        """Requests not yet in the batch."""
        return len(self._waiting)

    def start(self) -> None:
        """run() in a daemon thread of its own (tests, notebooks; slower decoding, see the class doc)."""
        self._thread = threading.Thread(target=self.run, name="neolm-engine", daemon=True)
        self._thread.start()

    def submit(self, prompts: list[list[int]], gc: GenerationConfig, logprobs: int | None = None,
               prompt_logprobs: bool = False, adapter: str | None = None) -> Job:  # fmt: skip
        """Queue the generation of `prompts` (token ids) with `gc` (and log-probabilities: see Job), with the
        model's LoRA adapter named `adapter` (LanguageModel.load_adapter; None: the base model's weights). Raises
        NeolmError, before anything is queued, for a prompt that is empty, out of the vocabulary or too long
        for the context, and for settings that name tokens out of the vocabulary (logit_bias)."""
        config = self.lm.config
        if prompt_logprobs and logprobs is None:
            raise NeolmError("prompt_logprobs needs logprobs (how many alternatives per position)")
        gc.check_vocab(config.vocab_size)
        index = 0
        if adapter is not None:
            if self.lm.adapter_set is None:
                raise NeolmError(f"no adapter named {adapter!r}: the model holds none")
            index = self.lm.adapter_set.index(adapter)
        job = Job(fit_prompts(prompts, gc, config.n_positions, config.vocab_size), gc, logprobs, prompt_logprobs,
                  index)  # fmt: skip
        with self._wake:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            self._waiting.append(job)
            self._wake.notify()
        return job

    def call(self, task: Callable[[list[Job]], object], timeout: float | None = None):
        """task(the jobs submitted and not yet ended), run in the engine's thread between two steps; returns what
        it returns, or raises what it raises. For changes to the model that no step may see half made (holding
        or dropping a LoRA adapter). Raises NeolmError when the engine is closed or `timeout` s pass."""
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise ShuttingDown("the server is shutting down")
            self._tasks.append((task, future))
            self._wake.notify()
        try:
            return future.result(timeout)
        except TimeoutError:
            raise NeolmError(f"the engine did not get to it in {timeout} s") from None

    def _run_tasks(self, batch: DecodeBatch | None, jobs: list[Job]) -> None:
        while self._tasks:
            task, future = self._tasks.popleft()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(task([*jobs, *self._waiting]))
            except Exception as error:  # noqa: BLE001  (the caller's to answer: call() raises it)
                future.set_exception(error)
            if batch is not None:  # the model's adapters may be new (neolm.multilora): the batch runs with them
                batch.adapters = self.lm.adapter_set

    def close(self, timeout: float | None = None, drain: bool = False) -> None:
        """Refuse new jobs (submit and call raise ShuttingDown), end the waiting ones (with `drain`: run them
        too), and wait (at most `timeout` s) for run() to return, which it does when the jobs it has are done."""
        with self._wake:
            self._closed = True
            if not drain:
                self._end_waiting("the server is shutting down")
            self._wake.notify()
        self._wait_thread(timeout)

    def stop(self, reason: str, timeout: float | None = None) -> None:
        """Close, and end every job now, running ones included: their answers end with ShuttingDown(reason), what
        they generated so far unsent (a drain's time limit). Waits (at most `timeout` s) for run() to return."""
        with self._wake:
            self._closed = True
            self._stopping = reason
            self._wake.notify()
        self._wait_thread(timeout)

    def _wait_thread(self, timeout: float | None) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _end_waiting(self, reason: str) -> None:
        """End the jobs and tasks not yet started with ShuttingDown(reason) (under self._wake)."""
        for job in self._waiting:
            self._abandon(job, reason)
        self._waiting.clear()
        for _, future in self._tasks:
            future.set_exception(ShuttingDown(reason))
        self._tasks.clear()

    def _abandon(self, job: Job, reason: str) -> None:
        job._events.put(ShuttingDown(reason))
        job._events.put(None)
        self.metrics.finished["abort"] += job._left
        self.stopped += 1

    def _admit(self, busy: bool, room: int) -> list[Job] | None:
        """The waiting jobs to add before the next step, oldest first, while they fit in `room` sequences. When
        the engine is idle (not `busy`), waits for one, and the oldest comes in whatever its size; a job that
        runs alone comes in only then, and nothing with it. None: closed, and idle."""
        with self._wake:
            while not busy and not self._waiting and not self._tasks and not self._closed:
                # with a timeout: a Ctrl-C that the OS hands to another thread reaches a main thread waiting here
                # only when it returns to Python
                self._wake.wait(timeout=0.25)
            if self._closed and not self._waiting and not self._tasks:  # (jobs left only when drained)
                return [] if busy else None
            taken: list[Job] = []
            while self._waiting:
                job = self._waiting[0]
                if (busy or taken) and (job.alone or job.sequences > room):  # first come, first served
                    break
                taken.append(self._waiting.popleft())
                room -= job.sequences
                if job.alone:
                    break
            return taken

    def run(self) -> None:
        """Serve jobs until close() (the running sequences finish first)."""
        batch, owners, running, reading = None, {}, [], deque()  # owners: sequence id -> (job, its sequence index)
        while True:
            if self._stopping is not None:
                with self._wake:
                    for job in {*running, *(job for r in reading for job in r.jobs)}:
                        self._abandon(job, self._stopping)
                    self._end_waiting(self._stopping)
                self._note_running([])
                log.warning("stopped %d requests before their answers were whole: %s", self.stopped, self._stopping)
                return
            if self._tasks:
                self._run_tasks(batch, running + [job for r in reading for job in r.jobs])
            busy = batch is not None and (not batch.finished or bool(reading))
            if busy and any(job.alone for job in running):  # nothing joins it
                admitted = []
            else:
                room = self.max_batch - (batch.live + sum(r.sequences for r in reading) if busy else 0)
                admitted = self._admit(busy, room)
            if admitted is None:
                return
            live = [job for job in admitted if not job.cancelled.is_set()]
            for job in admitted:
                if job.cancelled.is_set():
                    job._events.put(None)
            if live and live[0].gc.num_beams > 1:  # (alone: the only job admitted)
                self._search(live[0])
                batch = None
                continue
            try:
                if not busy:
                    batch = DecodeBatch(self.lm.model, self.lm.tokenizer.decode, adapters=self.lm.adapter_set,
                                        guesser=self.guesser)  # fmt: skip
                    owners, running = {}, []
                    reading = deque()
                    start, generated = time.perf_counter(), self.generated
                self._prefill(batch, live, reading)
                self._read(batch, reading, owners, running)
                if not batch.finished:
                    self._step(batch, owners, running)
            except Exception as error:  # a bug or out of memory: fail these requests, keep serving
                log.exception("generation failed")
                reading_jobs = (job for r in reading for job in r.jobs)
                for job in {
                    *running,
                    *reading_jobs,
                    *(job for job in admitted if job._left and not job.cancelled.is_set()),
                }:
                    job._events.put(error)
                    job._events.put(None)
                batch, reading = None, deque()
                self._note_running([])
                continue
            if batch.finished and not reading and (admitted or busy):
                log.info("batch done: %d tokens in %.2fs; the most requests at once so far: %d",
                         self.generated - generated, time.perf_counter() - start, self.largest_batch)  # fmt: skip
                batch = None  # its KV caches' memory goes back while the server is idle

    def _search(self, job: Job) -> None:
        """A beam search job (it runs alone): the search runs whole (its cancel() or the engine's stop() ends it
        within a step), then each hypothesis's tokens are sent, best first, with their log-probabilities if asked
        for. (A client that goes away cancels the job: the HTTP handler watches its connection.)"""
        self._note_running([job])

        def ending(ids, scores) -> bool:
            return job.cancelled.is_set() or self._stopping is not None

        gc = dataclasses.replace(job.gc, stopping_criteria=[*(job.gc.stopping_criteria or []), ending])
        held = self.lm.adapter_set
        try:
            with contextlib.nullcontext() if held is None else held.using(job.adapter):
                found = beam_hypotheses(self.lm.model, job.prompts, gc, self.lm.tokenizer.decode,
                                        keep_logits=job.logprobs is not None)  # fmt: skip
        except Exception as error:  # a bug or out of memory: fail this request, keep serving
            log.exception("beam search failed")
            job._events.put(error)
            job._events.put(None)
            self._note_running([])
            return
        self.batches += 1
        self.metrics.prompt_tokens += sum(len(p) for p in job.prompts)
        if self._stopping is not None or job.cancelled.is_set():
            if self._stopping is not None:
                with self._wake:
                    self._abandon(job, self._stopping)
            else:
                job._events.put(None)
                self.metrics.finished["abort"] += job._left
            self._note_running([])
            return
        job._first = time.perf_counter()
        self.metrics.ttft.observe(job._first - job.submitted)
        eos, n, running = gc.eos_ids(self.lm.config.eos_token_id), gc.num_return_sequences, [job]
        for s, seq in enumerate(found.sequences):
            scores = None if job.logprobs is None else torch.log_softmax(found.token_logits[s].float(), dim=-1)
            for t, token in enumerate(seq):
                if scores is None:
                    job._events.put(Token(s, token))
                else:
                    top = torch.topk(scores[t], job.logprobs)
                    job._events.put(Token(s, token, float(scores[t, token]),
                                          tuple(zip(top.indices.tolist(), top.values.tolist()))))  # fmt: skip
            self.metrics.generation_tokens += len(seq)
            ended = len(seq) < gc.new_token_budget(len(job.prompts[s // n])) or (seq and seq[-1] in eos)
            self._end(job, End(s, "stop" if ended else "length", len(seq)), running)

    def _prefill(self, batch: DecodeBatch, jobs: list[Job], reading: deque) -> None:
        """Queue the jobs' prompts to be read: those that begin with a prefix cache entry after it, alone; the
        others with equal settings share the forward that reads them."""
        if self.prefixes is not None:
            jobs = [job for job in jobs if not self._reuse(batch, job, reading)]
        while jobs:
            first = jobs[0]
            same = [job for job in jobs if job.gc == first.gc and job.prompt_logprobs == first.prompt_logprobs
                    and job.adapter == first.adapter]  # fmt: skip
            jobs = [job for job in jobs if job not in same]
            firsts = [(job, i) for job in same for i in range(len(job.prompts))]  # whose prompt each one is

            def on_prompt(p: int, scores: TokenLogprobs, firsts=firsts) -> None:
                job, i = firsts[p]
                top = [scores.pairs(j, job.logprobs) for j in range(len(scores.chosen))]
                job._events.put(Prompt(i, scores.chosen, top))

            prefill = batch.prefill([job.prompts[i] for job, i in firsts], first.gc, [job.logprobs for job, _ in firsts],
                                    on_prompt if first.prompt_logprobs else None, adapter=first.adapter)  # fmt: skip
            reading.append(_Reading(prefill, same, firsts))

    def _reuse(self, batch: DecodeBatch, job: Job, reading: deque) -> bool:
        """Queue the job's prompt to be read after the prefix cache entry it begins with, if any."""
        if not job.reusable:
            return False
        prompt = job.prompts[0]
        held = self.prefixes.find(prompt, job.adapter)
        self.metrics.prefix_queries += len(prompt)
        if held is None:
            return False
        prefill = batch.prefill([prompt], job.gc, [job.logprobs], reuse=held, adapter=job.adapter, share=True)
        job.cached = prefill.done
        self.metrics.prefix_hits += prefill.done
        reading.append(_Reading(prefill, [job], [(job, 0)]))
        return True

    def _read(self, batch: DecodeBatch, reading: deque, owners: dict, running: list[Job]) -> None:
        """Read queued prompts, oldest first, and add those read to the end to the batch. While sequences run,
        at most `prefill_chunk` prompt tokens a step (a longer prompt goes on at the next step; the next prompt
        starts only if it fits whole in what is left), so that they never wait long for a new prompt; when
        none runs, every prompt whole."""
        budget = self.prefill_chunk if self.prefill_chunk and batch.live else None
        while reading:
            r = reading[0]
            if all(job.cancelled.is_set() for job in r.jobs):  # every client went away before its first token
                reading.popleft()
                for job in r.jobs:
                    job._events.put(None)
                continue
            spent = r.prefill.read(self.lm.model, budget)
            if r.prefill.left:
                break
            reading.popleft()
            self._join(batch, r, owners, running)
            if budget is not None:
                budget -= spent
                if not reading or reading[0].prefill.left > budget:
                    break
        self._note_running(running + [job for r in reading for job in r.jobs])

    def _note_running(self, jobs: list[Job]) -> None:
        """The metrics' requests running, and the adapters they use."""
        self.metrics.running = len(jobs)
        self.metrics.running_adapters = {job.adapter for job in jobs} - {0}

    def lora_info(self) -> tuple[list[str], list[str], int] | None:
        """The adapters running and waiting requests use, and how many the model holds (vLLM's
        lora_requests_info); None when it holds none."""
        held = self.lm.adapter_set
        if held is None:
            return None
        waiting = {job.adapter for job in list(self._waiting)} - {0}

        def named(indices) -> list[str]:
            return sorted(held.names[i - 1] or "" for i in indices if i <= len(held.names))

        return named(self.metrics.running_adapters), named(waiting), len(held.held)

    def _join(self, batch: DecodeBatch, r: _Reading, owners: dict, running: list[Job]) -> None:
        ids = batch.join(r.prefill)
        gc = r.prefill.gc
        self.batches += 1
        self.metrics.prompt_tokens += sum(len(job.prompts[i]) for job, i in r.firsts)
        running += r.jobs
        n = gc.num_return_sequences
        for (job, i), p in zip(r.firsts, range(0, len(ids), n)):
            for j in range(n):
                if gc.new_token_budget(len(job.prompts[i])) == 0:  # no token to make: ended already
                    self._end(job, End(i * n + j, "length", 0), running)
                else:
                    owners[ids[p + j]] = (job, i * n + j)
        self.largest_batch = max(self.largest_batch, len(running))

    def _step(self, batch: DecodeBatch, owners: dict, running: list[Job]) -> None:
        """One token for every sequence of the batch (or a speculative round's tokens), sent to its job."""
        before = batch.rounds, batch.guessed, batch.kept
        steps = batch.steps()
        self.metrics.speculated(batch.rounds - before[0], batch.guessed - before[1], batch.kept - before[2])
        for step in steps:
            self._send(batch, step, owners, running)
        for job in [job for job in running if job.cancelled.is_set()]:  # its client went away
            gone = [i for i, (owner, _) in owners.items() if owner is job]
            batch.cancel(gone)
            for i in gone:
                del owners[i]
            running.remove(job)
            job._events.put(None)
            self.metrics.finished["abort"] += len(gone)
            self._note_running(running)
            log.info("a request went away: its sequences stopped")

    def _send(self, batch: DecodeBatch, step, owners: dict, running: list[Job]) -> None:
        """A step's tokens, each to its job."""
        now = time.perf_counter()
        for row, (sequence, token, end) in enumerate(zip(step.ids, step.tokens, step.ends)):
            if token is None:
                continue
            job, s = owners[sequence]
            job._counts[s] += 1
            if self.prefixes is not None:
                job._tokens[s].append(token)
            if job._first is None:
                job._first = now
                self.metrics.ttft.observe(now - job.submitted)
            if job.logprobs is None:
                job._events.put(Token(s, token))
            else:
                job._events.put(Token(s, token, step.scores.chosen[row], step.scores.pairs(row, job.logprobs)))
            self.metrics.generation_tokens += 1
            if end is not None:
                del owners[sequence]
                if self.prefixes is not None and job.gc.num_return_sequences == 1:  # keep its keys and values
                    self.prefixes.put(batch.row_cache(sequence), job.prompts[s] + job._tokens[s], job.adapter)
                self._end(job, End(s, end, job._counts[s]), running)

    def _end(self, job: Job, event: End, running: list[Job]) -> None:
        job._events.put(event)
        job._left -= 1
        self.metrics.finished[event.reason] += 1
        if job._left == 0:
            running.remove(job)
            job._events.put(None)
            self.metrics.latency.observe(time.perf_counter() - job.submitted)
            self._note_running(running)

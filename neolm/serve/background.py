"""Background responses (the Responses API's `background: true`, as OpenAI's and vLLM's): the request is answered
at once with the stored response in status "queued"; a thread of its own waits for the generation and stores the
finished response ("completed", "incomplete" or "failed"), which GET /v1/responses/{id} returns when polled. POST
/v1/responses/{id}/cancel stops one that is still running: it is stored "cancelled", with what it had written.
Background responses are kept as stored ones are, so they need `store`.

With `stream: true` too, the request streams the response's events as a foreground stream does (response.created
and response.queued first), but a client that goes away leaves it running: its events are kept (a Trail, in memory:
those of the MAX_TRAILS streams that ended last), and GET /v1/responses/{id}?stream=true&starting_after=N streams
them again from the one after sequence number N, then follows the stream until it ends. A cancelled stream ends with
response.incomplete, its response "cancelled".
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator

from neolm.serve import answer
from neolm.serve.engine import Job
from neolm.serve.errors import ApiError
from neolm.serve.protocol import Request
from neolm.serve.responses import Events, Turn, cancelled, failed
from neolm.serve.store import Store

log = logging.getLogger(__name__)

CANCEL_WAIT = 30  # seconds cancel() waits for the generation to stop and its response to be stored
MAX_TRAILS = 100  # the event trails of ended background streams kept for GET ?stream=true


class Trail:
    """A background stream's events as they are written, for any number of readers that follow it."""

    def __init__(self):
        self.events: list[dict] = []  # event k has sequence_number k
        self.ended = False
        self._grown = threading.Condition()

    def add(self, event: dict) -> None:
        with self._grown:
            self.events.append(event)
            self._grown.notify_all()

    def end(self) -> None:
        with self._grown:
            self.ended = True
            self._grown.notify_all()

    def follow(self, after: int = -1) -> Iterator[dict]:
        """The events after sequence number `after`, each as soon as it is written, until the stream ends."""
        at = after + 1
        while True:
            with self._grown:
                self._grown.wait_for(lambda at=at: len(self.events) > at or self.ended)
                new, ended = self.events[at:], self.ended
            yield from new
            at += len(new)
            if ended and not new:
                return


class Background:
    """The background responses being generated: id -> (their job, the thread that stores their answer); and the
    event trails of streamed ones."""

    def __init__(self, store: Store):
        self.store = store
        self._running: dict[str, tuple[Job, threading.Thread]] = {}
        self._trails: OrderedDict[str, Trail] = OrderedDict()
        self._lock = threading.Lock()

    def start(self, turn: Turn, request: Request, job: Job, model: str, tokenizer) -> dict:
        """Store the response as "queued" and answer the job in a thread (its events into a trail, if streamed:
        follow() reads them); returns the queued response."""
        queued = turn.response(model, [], None, None, request.gc) | {"status": "queued"}
        turn.keep(queued, self.store)
        if request.stream:
            trail = Trail()
            work, args = self._stream, (Events(turn, model, request.gc, self.store), request, job, tokenizer, trail)
        else:
            trail, work, args = None, self._answer, (turn, request, job, model, tokenizer)
        thread = threading.Thread(target=self._run, args=(turn, queued, work, args), name=f"neolm-{turn.id}",
                                  daemon=True)  # fmt: skip
        with self._lock:
            self._running[turn.id] = (job, thread)
            if trail is not None:
                self._trails[turn.id] = trail
        thread.start()
        return queued

    def _run(self, turn: Turn, queued: dict, work, args) -> None:
        turn.keep(queued | {"status": "in_progress"}, self.store)  # as GET shows it: the engine has the job
        try:
            work(*args)
        finally:
            with self._lock:
                self._running.pop(turn.id, None)
                ended = [rid for rid, trail in self._trails.items() if trail.ended]
                for rid in ended[:-MAX_TRAILS]:
                    del self._trails[rid]

    def _answer(self, turn: Turn, request: Request, job: Job, model: str, tokenizer) -> None:
        try:
            response = turn.answer(answer.whole(request, job, tokenizer, model), request.gc)
            if job.cancelled.is_set():
                response = cancelled(response)
        except ApiError as e:  # the generation failed, or the server shut down first
            response = failed(turn.response(model, [], None, "stop", request.gc), e.body()["error"])
            log.warning("background response %s failed: %s", turn.id, e.message)
        turn.keep(response, self.store)

    def _stream(self, events: Events, request: Request, job: Job, tokenizer, trail: Trail) -> None:
        try:
            for event in events.stream(answer.chunks(request, job, tokenizer, events.model), job):
                trail.add(event)
        finally:
            trail.end()
        if events.error is not None:
            log.warning("background response %s failed: %s", events.turn.id, events.error["message"])

    def follow(self, rid: str, after: int = -1) -> Iterator[dict]:
        """GET /v1/responses/{id}?stream=true&starting_after=N: the events of a streamed background response after
        sequence number N (-1: all), then the rest as they are written."""
        self.store.get(rid)  # (404 for an unknown id)
        with self._lock:
            trail = self._trails.get(rid)
        if trail is None:
            raise ApiError(400, f"response {rid!r} has no events to stream: background responses created with "
                           f"stream: true have (in memory, the last {MAX_TRAILS} that ended); GET it without "
                           "stream=true for the response", "stream")  # fmt: skip
        return trail.follow(after)

    def cancel(self, rid: str) -> dict:
        """POST /v1/responses/{id}/cancel: stop a background response still running and return it as stored
        ("cancelled"); one already cancelled is returned as it is, one that ended otherwise is refused (as
        OpenAI's: "Cannot cancel a completed response")."""
        response = self.store.get(rid)[0]
        if not response.get("background"):
            raise ApiError(400, f"response {rid!r} was not created with background: true; only those can be "
                           "cancelled")  # fmt: skip
        with self._lock:
            running = self._running.get(rid)
        if running is not None:
            job, thread = running
            job.cancel()
            thread.join(CANCEL_WAIT)
        response = self.store.get(rid)[0]
        if running is None and response["status"] != "cancelled":
            raise ApiError(400, f"response {rid!r} has already ended ({response['status']}): only a background "
                           "response still running can be cancelled")  # fmt: skip
        return response

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until no background response is being generated; False if `timeout` s passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                threads = [thread for _, thread in self._running.values()]
            if not threads:
                return True
            for thread in threads:
                thread.join(None if deadline is None else max(deadline - time.monotonic(), 0))
                if thread.is_alive():
                    return False

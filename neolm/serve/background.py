"""Background responses (the Responses API's `background: true`, as OpenAI's and vLLM's): the request is answered
at once with the stored response in status "queued"; a thread of its own waits for the generation and stores the
finished response ("completed", "incomplete" or "failed"), which GET /v1/responses/{id} returns when polled. POST
/v1/responses/{id}/cancel stops one that is still running: it is stored "cancelled", with what it had written.
Background responses are kept as stored ones are (in memory), so they need `store`.
"""

from __future__ import annotations

import logging
import threading

from neolm.serve import answer
from neolm.serve.engine import Job
from neolm.serve.errors import ApiError
from neolm.serve.protocol import Request
from neolm.serve.responses import Store, Turn, failed

log = logging.getLogger(__name__)

CANCEL_WAIT = 30  # seconds cancel() waits for the generation to stop and its response to be stored


class Background:
    """The background responses being generated: id -> (their job, the thread that stores their answer)."""

    def __init__(self, store: Store):
        self.store = store
        self._running: dict[str, tuple[Job, threading.Thread]] = {}
        self._lock = threading.Lock()

    def start(self, turn: Turn, request: Request, job: Job, model: str, tokenizer) -> dict:
        """Store the response as "queued" and answer the job in a thread; returns the queued response."""
        queued = turn.response(model, [], None, None, request.gc) | {"status": "queued"}
        answered = dict(queued)
        turn.keep(queued, self.store)
        thread = threading.Thread(target=self._answer, args=(turn, queued, request, job, model, tokenizer),
                                  name=f"neolm-{turn.id}", daemon=True)  # fmt: skip
        with self._lock:
            self._running[turn.id] = (job, thread)
        thread.start()
        return answered

    def _answer(self, turn: Turn, queued: dict, request: Request, job: Job, model: str, tokenizer) -> None:
        queued["status"] = "in_progress"  # the stored response, as GET shows it: the engine has the job
        try:
            response = turn.answer(answer.whole(request, job, tokenizer, model), request.gc, self.store)
            if job.cancelled.is_set():
                response |= {"status": "cancelled", "incomplete_details": None}
                for item in response["output"]:
                    item["status"] = "incomplete"
        except ApiError as e:  # the generation failed, or the server shut down first
            turn.keep(failed(turn.response(model, [], None, "stop", request.gc), e.body()["error"]), self.store)
            log.warning("background response %s failed: %s", turn.id, e.message)
        finally:
            with self._lock:
                self._running.pop(turn.id, None)

    def cancel(self, rid: str) -> dict:
        """POST /v1/responses/{id}/cancel: stop a background response still running and return it as stored
        ("cancelled"); one that has ended is returned as it is."""
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
        return self.store.get(rid)[0]

    def running(self, rid: str) -> bool:
        with self._lock:
            return rid in self._running

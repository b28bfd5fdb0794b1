"""`neolm batch`: offline inference over a file of requests in OpenAI's Batch file format, through the server's
engine (continuous batching) in this process, as vLLM's run_batch does.

Input, a request a line (JSONL): {"custom_id": "...", "method": "POST", "url": "/v1/completions",
"/v1/chat/completions" or "/v1/responses" (nothing is stored: previous_response_id is not found), "body": {the
request, as the server takes it}}. Output, a line per request as it ends
(so not in the input's order): {"id": "batch_req_...", "custom_id": ..., "response": {"status_code": 200,
"request_id": ..., "body": {the server's response}}, "error": null}; a request the server would refuse keeps its
status code and error body, with "error": {"code", "message"}. The whole input is checked before the model loads.
Each line is written and flushed when its request ends, so a crash or Ctrl-C loses only the requests in flight;
`resume` skips the custom_ids that the output already holds (a line cut short by a crash is dropped first).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from neolm.errors import NeolmError
from neolm.serve import answer, protocol, responses
from neolm.serve.engine import Engine
from neolm.serve.protocol import ApiError
from neolm.serve.store import Store

log = logging.getLogger(__name__)

URLS = {"/v1/completions": "completion", "/v1/chat/completions": "chat", "/v1/responses": "responses"}


@dataclass
class Line:
    """One request of the input file."""

    number: int  # its line in the file (from 1)
    custom_id: str
    kind: str  # "completion" or "chat"
    body: dict


@dataclass
class Summary:
    requests: int = 0  # answered in this run
    failed: int = 0  # of them, with an error
    completion_tokens: int = 0
    seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # error code -> how many


def read_requests(path: str | os.PathLike) -> list[Line]:
    """Every request of an input file, checked: JSON objects with a unique string custom_id, method POST, a url
    the server answers and an object body. NeolmError names the first bad line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise NeolmError(f"cannot read the batch file {path}: {e}") from None
    lines, seen = [], set()
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{path}, line {number}"
        try:
            item = json.loads(raw)
        except json.JSONDecodeError as e:
            raise NeolmError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(item, dict):
            raise NeolmError(f"{where}: a request is a JSON object with custom_id, method, url and body")
        custom_id, url, body = item.get("custom_id"), item.get("url"), item.get("body")
        if not isinstance(custom_id, str) or not custom_id:
            raise NeolmError(f"{where}: custom_id must be a non-empty string")
        if custom_id in seen:
            raise NeolmError(f"{where}: custom_id {custom_id!r} is used twice (each request needs its own)")
        if item.get("method", "POST") != "POST":
            raise NeolmError(f"{where}: method must be POST, got {item.get('method')!r}")
        if url not in URLS:
            raise NeolmError(f"{where}: url must be one of {', '.join(URLS)}, got {url!r}")
        if not isinstance(body, dict):
            raise NeolmError(f"{where}: body must be a JSON object (the request)")
        seen.add(custom_id)
        lines.append(Line(number, custom_id, URLS[url], body))
    if not lines:
        raise NeolmError(f"the batch file {path} holds no requests")
    return lines


def answered(path: str | os.PathLike) -> set[str]:
    """The custom_ids an output file holds. A last line cut short (a crash while it was written) is removed from
    the file, so that the run that resumes appends after whole lines."""
    out = Path(path)
    if not out.exists():
        return set()
    data = out.read_bytes()
    ids, good = set(), 0  # good: bytes up to the end of the last whole line
    for raw in data.splitlines(keepends=True):
        try:
            record = json.loads(raw)
            complete = raw.endswith(b"\n") and isinstance(record, dict) and isinstance(record.get("custom_id"), str)
        except (json.JSONDecodeError, UnicodeDecodeError):
            complete = False
        if not complete:
            if good + len(raw) < len(data):  # not the last line: the file is not an output of neolm batch
                raise NeolmError(f"{path} is not a batch output file (a line that is not a whole record)")
            log.warning("dropping the last line of %s, cut short", path)
            with open(out, "r+b") as f:
                f.truncate(good)
            break
        ids.add(record["custom_id"])
        good += len(raw)
    return ids


def _record(line: Line, status: int, body: dict, error: dict | None) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": line.custom_id,
            "response": {"status_code": status, "request_id": body.get("id", ""), "body": body}, "error": error}  # fmt: skip


def _answer(lm, engine: Engine, line: Line, model_name: str) -> dict:
    try:
        named = line.body.get("model")  # with adapters, the one it names, else the base model; without, ignored
        adapter = named if named in lm.adapters and named != model_name else None
        if lm.adapters and adapter is None and named not in (None, model_name):
            served = ", ".join(repr(n) for n in [model_name, *lm.adapters])
            raise ApiError(404, f"the model '{named}' does not exist; this batch has {served}", "model")
        kept = Store(0)  # a batch keeps no responses: previous_response_id finds none
        turn = responses.Turn(line.body, kept) if line.kind == "responses" else None
        request = protocol.parse(line.kind, line.body, lm) if turn is None else responses.parse(turn, lm)
        if request.stream:
            raise ApiError(400, "stream is not offered in a batch: each answer is written whole", "stream")
        if turn is not None and turn.background:
            raise ApiError(400, "background is not offered in a batch: each answer is written whole", "background")
        logprobs = 0 if request.ranked and request.logprobs is None else request.logprobs  # ranking needs them
        try:
            job = engine.submit(request.prompts, request.gc, logprobs, request.prompt_logprobs, adapter)
        except NeolmError as e:  # a prompt too long for the context, or out of the vocabulary
            raise ApiError(400, str(e).replace("max_new_tokens", "max_tokens")) from None
        whole = answer.whole(request, job, lm.tokenizer, adapter or model_name)
        return _record(line, 200, whole if turn is None else turn.answer(whole, request.gc), None)
    except ApiError as e:
        return _record(line, e.status, e.body(), {"code": e.kind, "message": e.message})


def run(lm, lines: list[Line], output: str | os.PathLike, model_name: str, engine: Engine,
        progress: Callable[[dict], None] | None = None) -> Summary:  # fmt: skip
    """Answer `lines` through `engine` (not yet running: its run() takes this thread, which loaded the model, as
    the server's does), appending each answer to `output` as it ends; progress(record), if given, after each.
    Returns when all are written, or after a Ctrl-C (KeyboardInterrupt, raised after the engine stops)."""
    summary, started = Summary(), time.perf_counter()
    pending = iter(lines)
    take, write = threading.Lock(), threading.Lock()
    stopping = threading.Event()

    def worker(out) -> None:
        while not stopping.is_set():
            with take:
                line = next(pending, None)
            if line is None:
                return
            try:
                record = _answer(lm, engine, line, model_name)
            except Exception:  # a bug: the request fails, the batch goes on
                log.exception("error answering %s (line %d)", line.custom_id, line.number)
                error = ApiError(500, "internal error (see the log)", kind="server_error")
                record = _record(line, 500, error.body(), {"code": error.kind, "message": error.message})
            with write:
                if stopping.is_set():  # a request cut off by the shutdown is not answered: a resumed run retries it
                    return
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                out.flush()
                summary.requests += 1
                if record["error"] is not None:
                    summary.failed += 1
                    summary.errors[record["error"]["code"]] = summary.errors.get(record["error"]["code"], 0) + 1
                else:
                    usage = record["response"]["body"]["usage"]  # (a Response's counts its output_tokens)
                    summary.completion_tokens += usage.get("completion_tokens", usage.get("output_tokens", 0))
                if progress is not None:
                    progress(record)

    with open(output, "a", encoding="utf-8") as out:
        # enough requests in flight that the engine's batch stays full (a request may hold several sequences)
        workers = [threading.Thread(target=worker, args=(out,), name=f"neolm-batch-{i}", daemon=True)
                   for i in range(2 * engine.max_batch)]  # fmt: skip
        for w in workers:
            w.start()

        def close_when_done() -> None:
            for w in workers:
                w.join()
            engine.close()

        threading.Thread(target=close_when_done, name="neolm-batch-closer", daemon=True).start()
        try:
            engine.run()
        except KeyboardInterrupt:
            with write:  # (a line being written is finished first)
                stopping.set()
            engine.close()
            raise
        finally:
            summary.seconds = time.perf_counter() - started
    return summary

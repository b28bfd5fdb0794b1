"""The HTTP side of `neolm serve`: OpenAI's routes on Python's threading HTTP server, no dependencies.

  GET  /v1/models             the model served, and each LoRA adapter it holds (LanguageModel.load_adapter)
  POST /v1/completions        text completion (stream: server-sent events, as OpenAI)
  POST /v1/chat/completions   chat completion (protocol.py's transcript format)
  POST /v1/embeddings         OpenAI's embeddings: pooled final hidden states (embeddings.py, neolm.embedding)
  POST /v1/responses          OpenAI's Responses API, read as a chat completion (responses.py); GET and DELETE
       /v1/responses/{id}     a stored response; GET /v1/responses/{id}/input_items its request's input items;
                              POST /v1/responses/{id}/cancel stops a background one (background.py)
       /v1/conversations...   OpenAI's Conversations API: conversations that responses continue (conversations.py)
  GET  /health                200 while the engine runs, with its counters (503 once drain() began); GET /version
  OPTIONS (any path)          CORS preflight: pages of the allowed origins (default: any) may call the API
  POST /tokenize, /detokenize, GET /tokenizer_info   vLLM's tokenizer routes (lm-eval's remote tokenizer uses them)
  POST /v1/load_lora_adapter, /v1/unload_lora_adapter  vLLM's, with runtime_lora: hold or drop a LoRA adapter

Each connection gets a thread that parses its request, hands it to the engine (engine.py) and writes what the
engine produces; a client that goes away while its answer is made (streamed or not) stops its sequences.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import select
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import neolm
from neolm.embedding import embed
from neolm.errors import NeolmError
from neolm.serve import answer, conversations, embeddings, protocol, responses
from neolm.serve.background import Background
from neolm.serve.engine import DEFAULT_PREFILL_CHUNK, Engine, ShuttingDown
from neolm.serve.protocol import ApiError
from neolm.serve.store import Store

log = logging.getLogger(__name__)

MAX_BODY = 32 * 2**20  # bytes of a request body
DRAIN_WRITE_TIMEOUT = 60  # seconds run() waits, once drained, for the last answers to be written
CLOSE_WAIT = 10  # seconds close() waits for the background responses it ends to be stored
WATCH_INTERVAL = 0.2  # seconds between looks at a waiting client's connection (a closed one stops its request)


class Server(ThreadingHTTPServer):
    """Serves `lm` (a neolm.LanguageModel) as `model_name` on (host, port); port 0 picks a free one
    (`server_address` says which). run() answers until close() or Ctrl-C, decoding in the calling thread (the
    one that loaded the model: engine.Engine says why); start() answers from background threads and returns."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, lm, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
                 api_key: str | None = None, max_batch: int = 8, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefix_cache_mb: int = 0, runtime_lora: bool = False,
                 allowed_origins: tuple[str, ...] = ("*",), embedding_pooling: str = "last",
                 store: Store | None = None, guesser=None):  # fmt: skip
        self.lm = lm
        self.allowed_origins = tuple(allowed_origins)  # CORS: the web pages that may call the API ("*": any)
        self.embedding_pooling = embedding_pooling  # /v1/embeddings: neolm.embedding's "last" or "mean"
        self.runtime_lora = runtime_lora  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter are open
        self.model_name = model_name or lm.source
        self.api_key = api_key
        self.started = int(time.time())
        self.stored = store or Store()  # /v1/responses kept for previous_response_id and GET (closed with the server)
        self.background = Background(self.stored)  # background /v1/responses being generated
        self.engine = Engine(lm, max_batch, prefill_chunk, prefix_cache_mb, guesser)  # (speculation's guesser)
        self.draining = False  # drain(): no new requests; those taken are answered
        self._answering = 0  # requests being answered now (not idle keep-alive connections)
        self._answered = threading.Condition()
        try:
            super().__init__((host, port), Handler)
        except OSError as e:
            self.engine.close()
            raise NeolmError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None

    _http: threading.Thread | None = None

    def run(self) -> None:
        """HTTP in a background thread, the model in this one, until close() or drain() (from another thread) or
        Ctrl-C."""
        self._listen()
        try:
            self.engine.run()
            if self.draining:  # the last answers' last bytes, and the last background responses stored
                self.wait_answered(DRAIN_WRITE_TIMEOUT)
                self.background.wait(DRAIN_WRITE_TIMEOUT)
        finally:
            self.close()

    def drain(self, timeout: float | None = None) -> bool:
        """Stop taking requests (the port is closed, so new connections are refused and a load balancer's retry
        goes elsewhere; new requests on open connections get 503; /health says "shutting down") and answer those
        taken, queued ones included. After `timeout` s (None: no limit), the requests still unanswered are ended:
        a whole answer is a 503, a stream ends with an error event (Engine.stop). Returns whether every request
        was answered whole. run() returns once the answers are written (SIGTERM's graceful stop, as vLLM's and
        uvicorn's)."""
        self.draining = True
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._http is not None:
            self.shutdown()  # the accept loop ends; connections being answered go on
            self._http = None
        self.socket.close()
        self.engine.close(timeout, drain=True)

        def left() -> float | None:
            return None if deadline is None else max(deadline - time.monotonic(), 0)

        if self.wait_answered(left()) and self.background.wait(left()):  # (background responses stored too)
            return True
        log.warning("shutdown timeout: %g s passed with %d requests unanswered; ending them", timeout, self.answering)
        self.engine.stop(f"the server shut down before this answer was whole (its shutdown timeout of {timeout:g} s "
                         "passed)")  # fmt: skip
        self.wait_answered(DRAIN_WRITE_TIMEOUT)
        self.background.wait(DRAIN_WRITE_TIMEOUT)
        return False

    @property
    def answering(self) -> int:
        """Requests being answered now."""
        return self._answering

    def wait_answered(self, timeout: float | None = None) -> bool:
        """Wait until no request is being answered; returns False if `timeout` s passed first."""
        with self._answered:
            return self._answered.wait_for(lambda: self._answering == 0, timeout)

    def start(self) -> None:
        """HTTP and the model each in a daemon thread; returns at once (tests, notebooks). close() stops both."""
        self._listen()
        self.engine.start()

    def _listen(self) -> None:
        self._http = threading.Thread(target=self.serve_forever, name="neolm-http", daemon=True)
        self._http.start()

    def close(self) -> None:
        if self._http is not None:
            self.shutdown()
            self._http = None
        self.server_close()
        self.engine.close(timeout=30)
        self.background.wait(CLOSE_WAIT)  # (background responses ended by the close are stored "failed")
        self.stored.close()

    def models(self) -> dict:
        """The base model, then its adapters (as vLLM lists them: parent, the base; root, where it came from)."""
        entry = {"object": "model", "created": self.started, "owned_by": "neolm",
                 "max_model_len": self.lm.config.n_positions}  # fmt: skip
        data = [{"id": self.model_name, **entry, "root": self.lm.source, "parent": None}]
        data += [{"id": name, **entry, "root": self.lm.adapter_sources[name], "parent": self.model_name}
                 for name in self.lm.adapters]  # fmt: skip
        return {"object": "list", "data": data}

    def adapter(self, name: str | None, param: str | None = None) -> str | None:
        """The adapter a request's `model` names (None: the base model's name, or none given); 404 for others."""
        if name is None or name == self.model_name:
            return None
        if name in self.lm.adapters:
            return name
        served = ", ".join(repr(n) for n in [self.model_name, *self.lm.adapters])
        raise ApiError(404, f"the model '{name}' does not exist; this server has {served}", param)


class Handler(BaseHTTPRequestHandler):
    server: Server
    protocol_version = "HTTP/1.1"  # keep-alive for clients that reuse connections (OpenAI's does)
    server_version = f"neolm/{neolm.__version__}"

    def setup(self):
        super().setup()
        # headers and body (and each streamed event) are separate small writes: with Nagle's algorithm on, the
        # second waits for the client's delayed ACK, ~40 ms per response on Linux
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):
        log.info("%s %s", self.address_string(), format % args)

    def do_GET(self):
        self._answer(self._get)

    def do_POST(self):
        self._answer(self._post)

    def do_DELETE(self):
        self._answer(self._delete)

    def do_OPTIONS(self):
        """A browser's CORS preflight (no API key: browsers send none with it); the answer's headers say which
        origins, methods and headers may call."""
        self.send_response(200 if self._origin() else 403)
        if self._origin():
            self.send_header("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS")
            self.send_header("Access-Control-Allow-Headers", self.headers.get("Access-Control-Request-Headers", "*"))
            self.send_header("Access-Control-Max-Age", "600")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def end_headers(self):
        """Every answer to a page of an allowed origin says so (CORS), as vLLM's and llama.cpp's servers do."""
        origin = self._origin()
        if origin:
            self.send_header("Access-Control-Allow-Origin", origin)
            if origin != "*":
                self.send_header("Vary", "Origin")
        super().end_headers()

    def _origin(self) -> str | None:
        """The Access-Control-Allow-Origin value for this request's Origin, or None (no Origin, or not allowed)."""
        origin, allowed = self.headers.get("Origin"), self.server.allowed_origins
        if origin is None:
            return None
        return "*" if "*" in allowed else origin if origin in allowed else None

    def _answer(self, route) -> None:
        server = self.server
        with server._answered:
            server._answering += 1
        try:
            self._authorize()
            if server.draining and self.command != "GET":
                raise ApiError(503, "the server is shutting down", kind="server_error")
            route(self.path.split("?")[0].rstrip("/"))
        except ShuttingDown as e:
            self.close_connection = True
            self._json(503, answer.failure(e).body())
        except ApiError as e:
            self.close_connection = True  # the body may be unread: a new connection starts clean
            self._json(e.status, e.body())
        except Exception:  # a bug: say so, keep serving
            self.close_connection = True
            log.exception("error answering %s %s", self.command, self.path)
            self._json(500, ApiError(500, "internal server error (see the server's log)", kind="server_error").body())
        finally:
            if server.draining:
                self.close_connection = True
            with server._answered:
                server._answering -= 1
                server._answered.notify_all()

    def _authorize(self) -> None:
        if self.server.api_key is None:
            return
        given = self.headers.get("Authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {self.server.api_key}".encode()):
            raise ApiError(
                401, "missing or wrong API key: send 'Authorization: Bearer KEY'", kind="authentication_error"
            )

    def _get(self, path: str) -> None:
        if path == "/v1/models":
            return self._json(200, self.server.models())
        if path.startswith("/v1/models/"):
            name = path.removeprefix("/v1/models/")
            self.server.adapter(name)  # (404 for a model not served)
            return self._json(200, next(m for m in self.server.models()["data"] if m["id"] == name))
        if path == "/version":
            return self._json(200, {"version": neolm.__version__})
        if path == "/tokenizer_info":
            return self._json(200, protocol.tokenizer_info(self.server.lm))
        if path == "/metrics":
            engine = self.server.engine
            return self._send(
                200,
                engine.metrics.render(self.server.model_name, engine.waiting, engine.lora_info()),
                "text/plain; version=0.0.4; charset=utf-8",
            )
        if _conversations(path):
            return self._json(200, conversations.answer("GET", path, self.server.stored, None, self._query()))
        if path.startswith("/v1/responses/") and path.endswith("/input_items"):
            rid = path.removeprefix("/v1/responses/").removesuffix("/input_items")
            return self._json(200, responses.input_items(self.server.stored, rid, self._query()))
        if path.startswith("/v1/responses/"):
            return self._response(path.removeprefix("/v1/responses/"))
        if path == "/health":
            engine = self.server.engine
            if self.server.draining:  # (a load balancer sends no more)
                return self._json(503, {"status": "shutting down", "model": self.server.model_name})
            return self._json(200, {"status": "ok", "model": self.server.model_name, "batches": engine.batches,
                                    "largest_batch_requests": engine.largest_batch, "generated_tokens": engine.generated})  # fmt: skip
        raise ApiError(
            404,
            f"no route GET {path}: try GET /v1/models, /health, /metrics or POST /v1/completions, /v1/chat/completions",
        )

    def _response(self, rid: str) -> None:
        """GET /v1/responses/{id}: the stored response; with ?stream=true (and starting_after=N), a streamed
        background response's events (after sequence number N), then the rest as they are written."""
        query = self._query()
        protocol.known_params(query, {"stream", "starting_after", "include", "include_obfuscation"})
        stream = query.get("stream", ["false"])[-1]
        if stream not in ("true", "false"):
            raise ApiError(400, f"stream must be 'true' or 'false', got {stream!r}", "stream")
        after = query.get("starting_after", [None])[-1]
        if after is not None and (stream == "false" or not after.isdigit()):
            raise ApiError(400, f"starting_after must be a sequence number (an integer of 0 or more) with "
                           f"stream=true, got {after!r}", "starting_after")  # fmt: skip
        if stream == "false":
            return self._json(200, self.server.stored.get(rid)[0])
        self._events(self.server.background.follow(rid, -1 if after is None else int(after)), named=True)

    def _query(self) -> dict[str, list[str]]:
        """The request's URL query parameters: name -> its values."""
        return urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query, keep_blank_values=True)

    def _delete(self, path: str) -> None:
        if _conversations(path):
            return self._json(200, conversations.answer("DELETE", path, self.server.stored, None, self._query()))
        if not path.startswith("/v1/responses/"):
            raise ApiError(404, f"no route DELETE {path}: try DELETE /v1/responses/{{id}} or /v1/conversations/{{id}}")
        self._json(200, self.server.stored.delete(path.removeprefix("/v1/responses/")))

    def _post(self, path: str) -> None:
        kinds = {"/v1/completions": "completion", "/v1/chat/completions": "chat", "/v1/responses": "responses"}
        tools = {"/tokenize": protocol.tokenize, "/detokenize": protocol.detokenize}
        adapters = {"/v1/load_lora_adapter": self._load_lora, "/v1/unload_lora_adapter": self._unload_lora}
        if path == "/v1/embeddings":
            return self._embeddings(self._body())
        if _conversations(path):
            return self._json(200, conversations.answer("POST", path, self.server.stored, self._body(), self._query()))
        if path.startswith("/v1/responses/") and path.endswith("/cancel"):
            return self._json(200, self.server.background.cancel(path.removeprefix("/v1/responses/")
                                                                 .removesuffix("/cancel")))  # fmt: skip
        if path in adapters:
            if not self.server.runtime_lora:
                raise ApiError(404, f"POST {path} is off: start the server with --allow-runtime-lora-updating")
            return adapters[path](self._body())
        if path not in kinds and path not in tools:
            raise ApiError(404, f"no route POST {path}: try /v1/completions, /v1/chat/completions, /v1/responses, "
                           "/v1/conversations, /tokenize or /detokenize")  # fmt: skip
        body = self._body()
        adapter = self.server.adapter(body.get("model") if isinstance(body, dict) else None, "model")
        if path in tools:
            return self._json(200, tools[path](body, self.server.lm))
        turn = None
        if kinds[path] == "responses":
            turn = responses.Turn(body, self.server.stored)
            request = responses.parse(turn, self.server.lm)
        else:
            request = protocol.parse(kinds[path], body, self.server.lm)
        try:
            logprobs = 0 if request.ranked and request.logprobs is None else request.logprobs  # ranking needs them
            job = self.server.engine.submit(request.prompts, request.gc, logprobs, request.prompt_logprobs, adapter)
        except ShuttingDown:
            raise
        except NeolmError as e:  # a prompt too long for the context, or out of the vocabulary
            raise ApiError(400, str(e).replace("max_new_tokens", "max_tokens")) from None
        name = adapter or self.server.model_name
        if turn is not None and turn.background:
            queued = self.server.background.start(turn, request, job, name, self.server.lm.tokenizer)
            if not request.stream:
                self._json(200, queued)
            elif not self._events(self.server.background.follow(turn.id), named=True):  # it goes on: GET follows it
                log.info("client went away: background response %s goes on", turn.id)
            return
        with self._watching(request, job):
            if turn is None:
                (self._stream if request.stream else self._whole)(request, job, name)
            elif request.stream:
                self._stream(request, job, name, responses.Events(turn, name, request.gc, self.server.stored))
            else:
                response = turn.answer(answer.whole(request, job, self.server.lm.tokenizer, name), request.gc)
                turn.keep(response, self.server.stored)
                self._json(200, response)

    @contextlib.contextmanager
    def _watching(self, request, job):
        """Stop `job` if its client closes the connection while the answer is being made: one not streamed, a
        beam search's (sent whole at the end), or a stream's next token (vLLM's is_disconnected check). A
        thread waits on the socket meanwhile; a client that sends more (its next request) is no longer watched."""
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                try:
                    readable, _, _ = select.select([self.connection], [], [], WATCH_INTERVAL)
                    if not readable:
                        continue
                    if self.connection.recv(1, socket.MSG_PEEK):
                        return
                except (OSError, ValueError):  # reset, or closed here
                    pass
                if not done.is_set() and not job.cancelled.is_set():  # (EOF: closed; a failed write may have told)
                    log.info("client went away: request %s stopped", request.id)
                    job.cancel()
                return

        threading.Thread(target=watch, name=f"watch-{request.id}", daemon=True).start()
        try:
            yield
        finally:
            done.set()

    def _embeddings(self, body) -> None:
        """OpenAI's embeddings (embeddings.py), computed in the engine's thread between two decode steps."""
        if isinstance(body, dict) and self.server.adapter(body.get("model"), "model") is not None:
            raise ApiError(400, "embeddings come from the base model: name it, not a LoRA adapter", "model")
        lm = self.server.lm
        seqs, encoding = embeddings.parse(body, lm)
        try:
            vectors = self.server.engine.call(lambda jobs: embed(lm.model, seqs, self.server.embedding_pooling))
        except ShuttingDown:
            raise
        except NeolmError as e:  # a text longer than the context
            raise ApiError(400, str(e), "input") from None
        self._json(200, embeddings.answer(vectors, seqs, encoding, self.server.model_name))

    def _strings(self, body, *fields: str) -> list[str]:
        values = [body.get(field) if isinstance(body, dict) else None for field in fields]
        for field, value in zip(fields, values):
            if not isinstance(value, str) or not value:
                raise ApiError(400, f"{field} must be a non-empty string", field)
        return values

    def _load_lora(self, body) -> None:
        """vLLM's: {"lora_name", "lora_path"}; the adapter is read here, then held between two steps."""
        from neolm import hub
        from neolm.adapter import lora_factors

        name, path = self._strings(body, "lora_name", "lora_path")
        lm = self.server.lm
        if name == self.server.model_name or name in lm.adapters:
            raise ApiError(400, f"the LoRA adapter '{name}' has already been loaded", "lora_name")
        try:
            factors = lora_factors(hub.resolve(path), lm.config)

            def hold(jobs) -> None:
                if name in lm.adapters:  # (another request, meanwhile)
                    raise ApiError(400, f"the LoRA adapter '{name}' has already been loaded", "lora_name")
                lm.hold_adapter(name, path, factors)

            self.server.engine.call(hold)
        except ShuttingDown:
            raise
        except NeolmError as e:
            raise ApiError(400, str(e), "lora_path") from None
        log.info("LoRA adapter %r loaded from %s", name, path)
        self._send(200, f"Success: LoRA adapter '{name}' added successfully.", "text/plain; charset=utf-8")

    def _unload_lora(self, body) -> None:
        """vLLM's: {"lora_name"}; refused (409) while a request that names it has not ended."""
        (name,) = self._strings(body, "lora_name")
        lm = self.server.lm

        def drop(jobs) -> None:
            if name not in lm.adapters:
                raise ApiError(404, f"the LoRA adapter '{name}' cannot be found", "lora_name")
            index = lm.adapter_set.index(name)
            using = sum(job.adapter == index for job in jobs)
            if using:
                raise ApiError(409, f"the LoRA adapter '{name}' is in use by {using} request{'s' * (using > 1)}; "
                               "unload it when they have ended", "lora_name", kind="conflict")  # fmt: skip
            lm.delete_adapter(name)

        try:
            self.server.engine.call(drop)
        except NeolmError as e:
            raise ApiError(503, str(e), kind="server_error") from None
        log.info("LoRA adapter %r unloaded", name)
        self._send(200, f"Success: LoRA adapter '{name}' removed successfully.", "text/plain; charset=utf-8")

    def _body(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(411, "send the body with a Content-Length")
        if int(length) > MAX_BODY:
            raise ApiError(413, f"the body is {int(length):,} bytes; at most {MAX_BODY:,}")
        data = self.rfile.read(int(length))
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not JSON: {e}") from None

    def _whole(self, request, job, name: str) -> None:
        self._json(200, answer.whole(request, job, self.server.lm.tokenizer, name))

    def _stream(self, request, job, name: str, events: responses.Events | None = None) -> None:
        """Stream the job's answer as server-sent events: OpenAI's chunks, ending with [DONE]; or, given `events`,
        those chunks as Responses events. A client that goes away stops its job."""
        chunks = answer.chunks(request, job, self.server.lm.tokenizer, name)
        if events is None:
            sent = self._events(chunks, done=True)
        else:
            sent = self._events(events.stream(chunks, job), named=True)
        if not sent:
            log.info("client went away: request %s stopped", request.id)
            job.cancel()

    def _events(self, events: Iterable[dict], named: bool = False, done: bool = False) -> bool:
        """Send `events` as server-sent events (`named`: each with an `event:` line of its type, as the Responses
        API's; `done`: then [DONE], as chat's and completions'); False if the client went away first."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True
        try:
            for data in events:
                self._event(data, named)
            if done:
                self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def _event(self, data: dict, named: bool = False) -> None:
        """One server-sent event; `named`: with an `event:` line of its type (the Responses API's)."""
        head = b"event: " + data["type"].encode() + b"\n" if named else b""
        self.wfile.write(head + b"data: " + json.dumps(data).encode() + b"\n\n")
        self.wfile.flush()

    def _json(self, status: int, data: dict) -> None:
        self._send(status, json.dumps(data), "application/json")

    def _send(self, status: int, text: str, content_type: str) -> None:
        payload = text.encode()
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if self.server.draining:  # its last answer on this connection
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)


def _conversations(path: str) -> bool:
    """Whether the path is the Conversations API's (neolm.serve.conversations)."""
    return path == conversations.PREFIX or path.startswith(conversations.PREFIX + "/")

"""OpenAI's Responses API (neolm/serve/responses.py): a response equals the chat completion it amounts to, streamed
events follow OpenAI's order and add up to the whole response, stored responses continue conversations, function
calls come as function_call items, and what neolm cannot honour is refused."""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import jsonschema
import pytest
from conftest import NAME
from test_serve import call, url

from neolm.serve.errors import ApiError
from neolm.serve.responses import Turn
from neolm.serve.store import FileStore, Store

GREEDY = {"model": NAME, "temperature": 0}
TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"]}}  # fmt: skip


def request(server, method: str, path: str) -> tuple[int, dict]:
    req = urllib.request.Request(url(server, path), method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def named_events(text: str) -> list[dict]:
    """A Responses stream's events; each `event:` line names its data's type, and no [DONE] ends it."""
    events = []
    for block in filter(None, text.split("\n\n")):
        head, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}"
        events.append(event)
    return events


def output_text(response: dict) -> str:
    return "".join(p["text"] for item in response["output"] if item["type"] == "message" for p in item["content"])


def test_a_response_is_the_chat_completion_it_amounts_to(server):
    body = GREEDY | {"input": "Who is the king?", "instructions": "Be brief.", "max_output_tokens": 12,
                     "max_tool_calls": 3}  # (built-in tools' limit: none here, so no effect)
    status, response = call(server, "/v1/responses", body)
    assert status == 200 and response["max_tool_calls"] == 3, response
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who is the king?"}]
    status, chat = call(server, "/v1/chat/completions", GREEDY | {"messages": messages, "max_tokens": 12})
    (choice,) = chat["choices"]
    assert response["object"] == "response" and response["id"].startswith("resp_")
    assert output_text(response) == choice["message"]["content"]
    usage = chat["usage"]
    assert response["usage"] == {"input_tokens": usage["prompt_tokens"], "input_tokens_details": {"cached_tokens": 0},
                                 "output_tokens": usage["completion_tokens"], "output_tokens_details": {
                                     "reasoning_tokens": 0}, "total_tokens": usage["total_tokens"]}  # fmt: skip
    if choice["finish_reason"] == "length":
        assert response["status"] == "incomplete"
        assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    else:
        assert response["status"] == "completed" and response["incomplete_details"] is None
    assert response["instructions"] == "Be brief." and response["temperature"] == 0 and response["store"] is True
    (item,) = response["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["id"].startswith("msg_")


def test_previous_response_id_continues_the_conversation_without_its_instructions(server):
    status, first = call(server, "/v1/responses", GREEDY | {"input": "Who is the king?", "instructions": "Be brief.",
                                                            "max_output_tokens": 6})  # fmt: skip
    status, second = call(server, "/v1/responses", GREEDY | {"input": "And the queen?", "max_output_tokens": 6,
                                                             "previous_response_id": first["id"]})  # fmt: skip
    assert status == 200, second
    messages = [{"role": "user", "content": "Who is the king?"}, {"role": "assistant", "content": output_text(first)},
                {"role": "user", "content": "And the queen?"}]  # fmt: skip
    status, chat = call(server, "/v1/chat/completions", GREEDY | {"messages": messages, "max_tokens": 6})
    assert output_text(second) == chat["choices"][0]["message"]["content"]
    assert second["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert second["previous_response_id"] == first["id"]


def test_stored_responses_are_retrieved_and_deleted(server):
    status, response = call(server, "/v1/responses", GREEDY | {"input": "Hail!", "max_output_tokens": 3})
    assert request(server, "GET", f"/v1/responses/{response['id']}") == (200, response)
    assert request(server, "DELETE", f"/v1/responses/{response['id']}") == (
        200, {"id": response["id"], "object": "response.deleted", "deleted": True})  # fmt: skip
    status, body = request(server, "GET", f"/v1/responses/{response['id']}")
    assert status == 404 and "stored" in body["error"]["message"]
    status, unstored = call(server, "/v1/responses", GREEDY | {"input": "Hail!", "max_output_tokens": 3,
                                                               "store": False})  # fmt: skip
    assert status == 200 and unstored["store"] is False
    assert request(server, "GET", f"/v1/responses/{unstored['id']}")[0] == 404
    status, body = call(server, "/v1/responses", GREEDY | {"input": "x", "previous_response_id": unstored["id"]})
    assert status == 404 and body["error"]["param"] == "previous_response_id"


def test_a_stored_response_lists_the_items_it_was_generated_from(server):
    """GET /v1/responses/{id}/input_items: the input items with ids (a string input: one user message of an
    input_text part), after those of the turns it continues and their output items, newest first unless order=asc,
    in pages of `limit` after or before an id."""
    status, first = call(server, "/v1/responses", GREEDY | {"input": "Hail!", "max_output_tokens": 3})
    assert status == 200, first
    status, listed = request(server, "GET", f"/v1/responses/{first['id']}/input_items")
    (item,) = listed["data"]
    assert status == 200 and item["id"].startswith("msg_") and listed["has_more"] is False
    assert {k: item[k] for k in ("type", "role", "content")} == {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hail!"}]}  # fmt: skip
    assert listed["first_id"] == listed["last_id"] == item["id"]
    given = [{"role": "user", "content": f"Message {i}."} for i in range(5)]
    given[2] = {"type": "message", "id": "msg_mine", "role": "assistant", "content": [{"type": "output_text",
                                                                                       "text": "Aye."}]}  # fmt: skip
    status, second = call(server, "/v1/responses", GREEDY | {"input": given, "max_output_tokens": 3,
                                                             "previous_response_id": first["id"]})  # fmt: skip
    assert status == 200, second
    path = f"/v1/responses/{second['id']}/input_items"
    chain = request(server, "GET", f"{path}?limit=100&order=asc")[1]["data"]  # the first turn's, its reply, then five
    assert chain[:2] == [item, first["output"][0]] and len(chain) == 7
    newest = request(server, "GET", path)[1]["data"]  # (20 at most, the newest first)
    assert newest == chain[::-1]
    assert [i["content"][0]["text"] for i in newest[:5]] == ["Message 4.", "Message 3.", "Aye.", "Message 1.",
                                                             "Message 0."]  # fmt: skip
    assert newest[2]["id"] == "msg_mine" and newest[2]["content"][0]["type"] == "output_text"
    status, third = call(server, "/v1/responses", GREEDY | {"input": "And?", "max_output_tokens": 3,
                                                            "previous_response_id": second["id"]})  # fmt: skip
    listed = request(server, "GET", f"/v1/responses/{third['id']}/input_items?order=asc&limit=100")[1]["data"]
    assert listed[:7] == chain and listed[7] == second["output"][0] and listed[8]["content"][0]["text"] == "And?"
    oldest = request(server, "GET", f"{path}?order=asc&limit=2")[1]
    assert oldest["data"] == chain[:2] and oldest["has_more"] is True
    after = request(server, "GET", f"{path}?order=asc&limit=2&after={oldest['last_id']}")[1]
    assert after["data"] == chain[2:4] and after["has_more"] is True
    assert request(server, "GET", f"{path}?before=msg_mine")[1]["data"] == newest[:2]
    for query, param in (("order=up", "order"), ("limit=0", "limit"), ("limit=x", "limit"), ("after=msg_no", "after"),
                         ("page=2", "page")):  # fmt: skip
        status, body = request(server, "GET", f"{path}?{query}")
        assert status == 400 and body["error"]["param"] == param, (query, body)
    assert request(server, "GET", "/v1/responses/resp_none/input_items")[0] == 404


@pytest.fixture(params=["memory", "file"])
def make_store(request, tmp_path):
    """Store(size) or FileStore(a file in tmp_path, size): the two kinds of store, each test run with both."""
    stores = []

    def make(size: int):
        stores.append(Store(size) if request.param == "memory" else FileStore(tmp_path / "responses.db", size))
        return stores[-1]

    yield make
    for store in stores:
        store.close()


def test_the_store_keeps_the_most_recently_used(make_store):
    store = make_store(2)
    for rid in "abc":
        store.put({"id": rid, "status": "completed"}, [{"role": "user", "content": rid}], [])
    with pytest.raises(ApiError):
        store.get("a")
    store.get("b")
    store.put({"id": "d", "status": "completed"}, [], [])
    assert store.get("b") == ({"id": "b", "status": "completed"}, [{"role": "user", "content": "b"}], [])
    assert store.get("d")
    with pytest.raises(ApiError):
        store.get("c")
    store.put({"id": "b", "status": "failed"}, [], [])  # stored again: replaced, not counted twice
    store.put({"id": "e", "status": "completed"}, [], [])
    assert store.get("b")[0]["status"] == "failed" and store.get("e")
    assert store.delete("e") == {"id": "e", "object": "response.deleted", "deleted": True}
    with pytest.raises(ApiError, match="no response with id 'e'"):
        store.delete("e")
    store.put({"id": "f", "status": "completed"}, [], [])
    assert store.get("b") and store.get("f")


def test_a_file_store_keeps_responses_across_restarts_and_fails_the_unfinished(tmp_path):
    """FileStore: what was stored is read back by the next FileStore of the file (the least recently used order
    too); a background response left "queued" or "in_progress" is "failed" there; a file of a newer layout, or not
    SQLite, is refused with a NeolmError."""
    from neolm.errors import NeolmError

    path = tmp_path / "responses.db"
    first = FileStore(path, size=3)
    first.put({"id": "a", "status": "completed", "output": [{"text": "é ☃"}]}, [{"role": "user", "content": "hi"}],
              [{"id": "msg_1", "type": "message"}])  # fmt: skip
    first.put({"id": "b", "status": "in_progress"}, [], [])
    first.put({"id": "c", "status": "queued"}, [], [])
    first.get("a")
    first.close()  # (or a crash: each put is committed as it returns)
    second = FileStore(path, size=3)
    assert second.get("a") == ({"id": "a", "status": "completed", "output": [{"text": "é ☃"}]},
                               [{"role": "user", "content": "hi"}], [{"id": "msg_1", "type": "message"}])  # fmt: skip
    for rid in "bc":
        response = second.get(rid)[0]
        assert response["status"] == "failed" and "server stopped" in response["error"]["message"], response
    second.put({"id": "d", "status": "completed"}, [], [])  # four: the least recently used ("a", read first) goes
    with pytest.raises(ApiError):
        second.get("a")
    second.close()
    import sqlite3

    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(NeolmError, match="newer neolm"):
        FileStore(path)
    (tmp_path / "text").write_text("not a database\n" * 100)
    with pytest.raises(NeolmError, match="cannot keep responses in"):
        FileStore(tmp_path / "text")
    with pytest.raises(NeolmError, match="cannot keep responses in"):
        FileStore(tmp_path / "missing" / "responses.db")


def test_serve_refuses_a_responses_store_it_cannot_use_before_loading(capsys, tmp_path):
    from test_cli import assert_one_line_error, cli

    code, _, err = cli(capsys, "serve", "--responses-store", tmp_path, "--port", "0")  # (a folder)
    assert_one_line_error(code, err, "cannot keep responses in", str(tmp_path))


def test_a_server_with_a_responses_store_continues_conversations_after_a_restart(lm, tmp_path):
    """Server(store=FileStore(...)): a response stored by one server is returned, listed and continued by the next
    one on the same file, exactly as by the first."""
    from neolm.serve.http import Server

    path, body = tmp_path / "responses.db", GREEDY | {"input": "Who is the king?", "max_output_tokens": 8}
    answers = []
    for restart in range(2):
        server = Server(lm, port=0, model_name=NAME, store=FileStore(path))
        server.start()
        try:
            if restart == 0:
                status, first = call(server, "/v1/responses", body | {"instructions": "Answer."})
                assert status == 200, first
            assert request(server, "GET", f"/v1/responses/{first['id']}") == (200, first)
            status, items = request(server, "GET", f"/v1/responses/{first['id']}/input_items")
            assert status == 200 and items["data"][0]["content"][0]["text"] == "Who is the king?", items
            answers.append(call(server, "/v1/responses", body | {"input": "And the queen?",
                                                                 "previous_response_id": first["id"]})[1])  # fmt: skip
        finally:
            server.close()
    assert output_text(answers[0]) == output_text(answers[1]) and answers[0]["usage"] == answers[1]["usage"]


@pytest.mark.parametrize("stop", [["\n"], None])
def test_streamed_events_follow_openai_s_order_and_add_up_to_the_response(server, stop):
    body = GREEDY | {"input": "Who is the king?", "max_output_tokens": 16, "stop": stop}
    status, whole = call(server, "/v1/responses", body)
    status, text = call(server, "/v1/responses", body | {"stream": True})
    assert status == 200
    events = named_events(text)
    kinds = [e["type"] for e in events]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    end = "response.incomplete" if whole["status"] == "incomplete" else "response.completed"
    deltas = kinds.count("response.output_text.delta")
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added"] + ["response.output_text.delta"] * deltas + [
        "response.output_text.done", "response.content_part.done", "response.output_item.done", end]  # fmt: skip
    final = events[-1]["response"]
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == output_text(whole)
    assert output_text(final) == output_text(whole) and final["status"] == whole["status"]
    assert final["usage"] == whole["usage"] and events[0]["response"]["status"] == "in_progress"
    item = events[-2]["item"]
    assert item == final["output"][0] and item["status"] == ("incomplete" if end == "response.incomplete"
                                                             else "completed")  # fmt: skip
    assert request(server, "GET", f"/v1/responses/{final['id']}") == (200, final)


def test_a_named_function_is_answered_as_a_function_call_item(server):
    body = GREEDY | {"input": "Weather in Paris?", "tools": [TOOL], "max_output_tokens": 60,
                     "tool_choice": {"type": "function", "name": "get_weather"}}  # fmt: skip
    status, response = call(server, "/v1/responses", body)
    assert status == 200, response
    (item,) = response["output"]
    assert item["type"] == "function_call" and item["name"] == "get_weather" and item["status"] == "completed"
    assert item["id"].startswith("fc_") and item["call_id"]
    jsonschema.validate(json.loads(item["arguments"]), TOOL["parameters"])
    assert response["tools"] == [TOOL] and response["status"] == "completed"
    status, text = call(server, "/v1/responses", body | {"stream": True})
    events = named_events(text)
    kinds = [e["type"] for e in events]
    assert kinds[2] == "response.output_item.added" and events[2]["item"]["arguments"] == ""
    deltas = [e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"]
    assert "".join(deltas) == item["arguments"] and kinds[-3:] == [
        "response.function_call_arguments.done", "response.output_item.done", "response.completed"]  # fmt: skip
    assert events[-3]["arguments"] == item["arguments"] and events[-1]["response"]["output"][0]["name"] == "get_weather"


def test_required_calls_stream_as_they_are_written(server):
    """A "required" call's item is added once its name is written, then its arguments come in several deltas that
    add up to the whole response's."""
    body = GREEDY | {"input": "Weather in Paris?", "tools": [TOOL], "max_output_tokens": 80,
                     "tool_choice": "required", "parallel_tool_calls": False}  # fmt: skip
    status, whole = call(server, "/v1/responses", body)
    assert status == 200, whole
    status, text = call(server, "/v1/responses", body | {"stream": True})
    assert status == 200, text
    events = named_events(text)
    kinds = [e["type"] for e in events][2:]
    deltas = kinds.count("response.function_call_arguments.delta")
    assert deltas > 3 and kinds == ["response.output_item.added", *["response.function_call_arguments.delta"] * deltas,
                                    "response.function_call_arguments.done", "response.output_item.done",
                                    "response.completed"]  # fmt: skip
    assert "".join(e["delta"] for e in events if e["type"].endswith("arguments.delta")) == events[-3]["arguments"]
    (item,) = events[-1]["response"]["output"]
    (expected,) = whole["output"]
    assert {k: item[k] for k in ("name", "arguments")} == {k: expected[k] for k in ("name", "arguments")}


def test_input_items_become_the_conversation():
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text", "text": "?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "12 C"},
    ]  # fmt: skip
    form = {"type": "json_schema", "name": "w", "schema": {"type": "string"}}
    turn = Turn({"input": items, "instructions": "Be brief.", "tools": [TOOL], "max_output_tokens": 5,
                 "text": {"format": form}}, Store())  # fmt: skip
    assert turn.chat["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather ?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "12 C"}]  # fmt: skip
    assert turn.chat["tools"] == [{"type": "function", "function": {k: TOOL[k] for k in ("name", "description",
                                                                                          "parameters")}}]  # fmt: skip
    assert turn.chat["max_completion_tokens"] == 5 and turn.messages == turn.chat["messages"][1:]
    assert turn.chat["response_format"] == {"type": "json_schema", "json_schema": {"name": "w", "schema": form["schema"]}}


def test_a_conversation_with_a_function_result_is_answered(server):
    body = GREEDY | {"input": "Weather in Paris?", "tools": [TOOL], "max_output_tokens": 60,
                     "tool_choice": {"type": "function", "name": "get_weather"}}  # fmt: skip
    status, first = call(server, "/v1/responses", body)
    (item,) = first["output"]
    status, second = call(server, "/v1/responses", GREEDY | {"previous_response_id": first["id"], "tools": [TOOL],
                                                             "tool_choice": "none", "max_output_tokens": 5, "input": [
        {"type": "function_call_output", "call_id": item["call_id"], "output": "12 C"}]})  # fmt: skip
    assert status == 200, second
    assert second["output"][0]["type"] == "message" and second["usage"]["input_tokens"] > first["usage"]["input_tokens"]


def test_text_format_holds_the_reply_to_a_schema(server):
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 10}}, "required": ["answer"]}
    form = {"type": "json_schema", "name": "a", "schema": schema}
    status, response = call(server, "/v1/responses", {"model": NAME, "input": "Who is king?", "seed": 1,
                                                      "max_output_tokens": 60, "text": {"format": form}})  # fmt: skip
    assert status == 200, response
    jsonschema.validate(json.loads(output_text(response)), schema)


def test_logprobs_come_with_the_output_text(server):
    body = GREEDY | {"input": "Hail!", "max_output_tokens": 4, "top_logprobs": 2,
                     "include": ["message.output_text.logprobs"]}  # fmt: skip
    status, response = call(server, "/v1/responses", body)
    assert status == 200, response
    entries = response["output"][0]["content"][0]["logprobs"]
    assert len(entries) == response["usage"]["output_tokens"] and all(len(e["top_logprobs"]) == 2 for e in entries)
    assert "".join(e["token"] for e in entries).lstrip() == output_text(response)  # (the transcript strips the reply)


@pytest.mark.parametrize("fields, status, param, needle", [
    ({"input": "x", "frequency": 1}, 400, "frequency", "unrecognized"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, 400, "tools", "only function tools"),
    ({"input": "x", "background": True, "store": False}, 400, "background", "need store"),
    ({"input": "x", "truncation": "middle"}, 400, "truncation", "not supported"),
    ({}, 400, "input", "required"),
    ({"input": []}, 400, "input", "non-empty"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input", "text"),
    ({"input": [{"type": "web_search_call"}]}, 400, "input", "web_search_call"),
    ({"input": "x", "max_output_tokens": -1}, 400, "max_output_tokens", "max_output_tokens"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, 400, "text", "text.format"),
    ({"input": "x", "previous_response_id": "resp_nope"}, 404, "previous_response_id", "resp_nope"),
    ({"input": "x", "max_tool_calls": 0}, 400, "max_tool_calls", "positive integer"),
])  # fmt: skip
def test_what_neolm_cannot_honour_is_refused(server, fields, status, param, needle):
    got, body = call(server, "/v1/responses", {"model": NAME} | fields)
    assert got == status and body["error"]["param"] == param and needle in body["error"]["message"], body


def test_openai_client_creates_streams_retrieves_and_deletes(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url(server, "/v1"), api_key="none")
    response = client.responses.create(model=NAME, input="Who is the king?", instructions="Be brief.",
                                       max_output_tokens=8, temperature=0)  # fmt: skip
    assert response.output_text and response.usage.output_tokens <= 8
    with client.responses.stream(model=NAME, input="Who is the king?", instructions="Be brief.", max_output_tokens=40,
                                 temperature=0, extra_body={"stop": ["\n"]}) as stream:  # fmt: skip
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text and final.status == "completed"
    assert client.responses.retrieve(final.id).output_text == final.output_text
    (item,) = client.responses.input_items.list(final.id)
    assert item.type == "message" and item.content[0].text == "Who is the king?"
    call_reply = client.responses.create(model=NAME, input="Weather in Paris?", tools=[TOOL], max_output_tokens=60,
                                         tool_choice={"type": "function", "name": "get_weather"},
                                         temperature=0)  # fmt: skip
    assert call_reply.output[0].type == "function_call" and call_reply.output[0].name == "get_weather"
    assert client.responses.delete(response.id) is None
    queued = client.responses.create(model=NAME, input="Who is the king?", background=True, max_output_tokens=300,
                                     temperature=0, extra_body={"min_tokens": 300})  # fmt: skip
    assert queued.status == "queued" and queued.background
    cancelled = client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled" and client.responses.retrieve(queued.id).status == "cancelled"


def test_batch_answers_responses_requests(server, tmp_path, capsys):
    from test_cli import cli

    body = GREEDY | {"input": "Who is the king?", "max_output_tokens": 6}
    requests, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [{"custom_id": "a", "method": "POST", "url": "/v1/responses", "body": body},
             {"custom_id": "b", "method": "POST", "url": "/v1/responses", "body": body | {"previous_response_id": "x"}},
             {"custom_id": "c", "method": "POST", "url": "/v1/responses", "body": body | {"background": True}}]
    requests.write_text("".join(json.dumps(line) + "\n" for line in lines))
    code, _, err = cli(capsys, "batch", requests, output, "--served-model-name", NAME)
    assert code == 0 and "2 failed" in err, err
    records = {r["custom_id"]: r for r in map(json.loads, output.read_text().splitlines())}
    status, expected = call(server, "/v1/responses", body)
    answer = records["a"]["response"]["body"]
    assert answer["object"] == "response" and output_text(answer) == output_text(expected)
    assert answer["usage"] == expected["usage"] and f"{expected['usage']['output_tokens']} tokens" in err
    assert records["b"]["response"]["status_code"] == 404
    assert records["c"]["response"]["status_code"] == 400 and "background" in records["c"]["error"]["message"]


def test_truncation_auto_leaves_out_the_oldest_exchanges_that_overflow_the_context(server, lm):
    """A chain of responses that outgrows the bundled model's 512-token context: the next turn is refused as it
    is, and with truncation "auto" answered from its newest exchanges (the instructions kept), exactly as a chat
    of those messages; an input that overflows alone is refused either way."""
    speech = "KING. " + "Now is the winter of our discontent made glorious summer by this sun of York. " * 15
    first = GREEDY | {"input": speech, "instructions": "Answer.", "max_output_tokens": 16}
    status, one = call(server, "/v1/responses", first)
    assert status == 200, one
    status, two = call(server, "/v1/responses", first | {"input": "QUEEN. What say you?",
                                                         "previous_response_id": one["id"]})  # fmt: skip
    assert status == 200, two
    third = first | {"previous_response_id": two["id"]}  # the speech again: too long for the context with the rest
    status, refused = call(server, "/v1/responses", third)
    assert status == 400 and "context of 512" in refused["error"]["message"], refused
    status, answered = call(server, "/v1/responses", third | {"truncation": "auto"})
    assert status == 200 and answered["truncation"] == "auto", answered
    kept = [{"role": "system", "content": "Answer."}, {"role": "user", "content": "QUEEN. What say you?"},
            {"role": "assistant", "content": output_text(two)}, {"role": "user", "content": speech}]
    status, chat = call(server, "/v1/chat/completions", GREEDY | {"messages": kept, "max_tokens": 16})
    assert output_text(answered) == chat["choices"][0]["message"]["content"]
    assert answered["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"] <= 512 - 16
    status, alone = call(server, "/v1/responses", GREEDY | {"input": speech * 3, "truncation": "auto"})
    assert status == 400 and "no room for a reply" in alone["error"]["message"], alone


def poll(server, rid: str, seconds: float = 120) -> dict:
    """GET the response until it is no longer queued or in progress."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, response = request(server, "GET", f"/v1/responses/{rid}")
        assert status == 200, response
        if response["status"] not in ("queued", "in_progress"):
            return response
        time.sleep(0.05)
    raise AssertionError(f"{rid} still {response['status']} after {seconds} s")


def test_a_background_response_is_answered_queued_and_polled_until_done(server):
    """background: true answers at once with the response "queued"; polled, it ends "completed" with the output a
    response in the foreground gets; it continues a conversation like any stored response."""
    body = GREEDY | {"input": "Who is the king?", "max_output_tokens": 24, "min_tokens": 24}
    status, queued = call(server, "/v1/responses", body | {"background": True})
    assert status == 200 and queued["status"] == "queued" and queued["background"] is True, queued
    assert queued["output"] == [] and queued["usage"] is None
    done = poll(server, queued["id"])
    status, foreground = call(server, "/v1/responses", body)
    assert done["id"] == queued["id"] and done["background"] is True and foreground["background"] is False
    assert done["status"] == foreground["status"] == "incomplete" and output_text(done) == output_text(foreground)
    assert done["usage"] == foreground["usage"]
    status, refused = call(server, f"/v1/responses/{done['id']}/cancel", {})
    assert status == 400 and "already ended (incomplete)" in refused["error"]["message"], refused
    status, next_turn = call(server, "/v1/responses", body | {"previous_response_id": done["id"]})
    assert status == 200, next_turn


def test_a_background_response_can_be_cancelled(server):
    """POST /v1/responses/{id}/cancel stops a background response that is running: it is stored "cancelled" with
    what it had written; continuing it while it runs, or cancelling one in the foreground, is refused."""
    body = GREEDY | {"input": "Who is the king?", "max_output_tokens": 400, "min_tokens": 400}
    before = server.engine.generated
    status, queued = call(server, "/v1/responses", body | {"background": True})
    assert status == 200, queued
    status, refused = call(server, "/v1/responses", GREEDY | {"input": "And?", "previous_response_id": queued["id"]})
    assert status == 400 and "still being generated" in refused["error"]["message"], refused
    while server.engine.generated < before + 8:  # (some tokens written)
        time.sleep(0.01)
    status, cancelled = call(server, f"/v1/responses/{queued['id']}/cancel", {})
    assert status == 200 and cancelled["status"] == "cancelled", cancelled
    assert all(item["status"] == "incomplete" for item in cancelled["output"])
    assert 0 < cancelled["usage"]["output_tokens"] < 400
    assert poll(server, queued["id"]) == cancelled
    assert call(server, f"/v1/responses/{queued['id']}/cancel", {}) == (200, cancelled)  # (again: as it is)
    status, foreground = call(server, "/v1/responses", GREEDY | {"input": "Hi", "max_output_tokens": 2})
    status, refused = call(server, f"/v1/responses/{foreground['id']}/cancel", {})
    assert status == 400 and "background: true" in refused["error"]["message"], refused
    status, missing = call(server, "/v1/responses/resp_nope/cancel", {})
    assert status == 404, missing


def sse(method: str, server, path: str, body: dict | None = None) -> Iterator[dict]:
    """A Responses stream's events, read one at a time (closing the generator hangs up)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=60)
    connection.request(method, path, None if body is None else json.dumps(body), {"Content-Type": "application/json"})
    answer = connection.getresponse()
    assert answer.status == 200 and answer.headers["Content-Type"] == "text/event-stream", answer.read()
    try:
        while head := answer.readline():
            data = answer.readline()
            assert head.startswith(b"event: ") and answer.readline() == b"\n"
            yield json.loads(data.removeprefix(b"data: "))
    finally:
        connection.close()


def first_events(server, body: dict, count: int) -> list[dict]:
    """POST a streamed /v1/responses request, read its first `count` events, and hang up."""
    stream = sse("POST", server, "/v1/responses", body)
    events = [next(stream) for _ in range(count)]
    stream.close()
    return events


def resumed(server, rid: str, after: int | None = None) -> list[dict]:
    """GET /v1/responses/{rid}?stream=true (&starting_after): the events, read to the stream's end."""
    query = "" if after is None else f"&starting_after={after}"
    status, text = call(server, f"/v1/responses/{rid}?stream=true{query}")
    assert status == 200, text
    return named_events(text)


def test_a_background_stream_goes_on_without_its_client_and_streams_again_from_any_event(server):
    """background with stream: the POST streams the events (created and queued, then in_progress); a client that
    hangs up leaves it running; GET ?stream=true&starting_after=N follows it from event N + 1 while it runs, and
    streams it again once it has ended; the events add up to the stored response."""
    body = GREEDY | {"input": "Who is the king?", "max_output_tokens": 48, "min_tokens": 48, "background": True,
                     "stream": True}  # fmt: skip
    head = first_events(server, body, 5)
    assert [e["type"] for e in head] == ["response.created", "response.queued", "response.in_progress",
                                         "response.output_item.added", "response.content_part.added"]  # fmt: skip
    assert head[0]["response"]["status"] == head[1]["response"]["status"] == "queued"
    assert head[0]["response"]["background"] is True and head[2]["response"]["status"] == "in_progress"
    rid = head[0]["response"]["id"]
    rest = resumed(server, rid, 4)  # (while it runs, or once it has ended)
    events = head + rest
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]
    assert final["type"] == "response.incomplete" and final["response"]["usage"]["output_tokens"] == 48
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == \
        output_text(final["response"])  # fmt: skip
    assert poll(server, rid) == final["response"]
    assert resumed(server, rid) == events and resumed(server, rid, 20) == events[21:]
    assert resumed(server, rid, len(events) - 1) == []
    _, foreground = call(server, "/v1/responses", body | {"background": False, "stream": False})
    assert output_text(foreground) == output_text(final["response"])


def test_followers_of_a_background_stream_see_it_end_cancelled(server):
    """Two clients follow a background stream; POST /cancel stops it: both streams end with response.incomplete,
    its response "cancelled" with the tokens it wrote, as stored."""
    body = GREEDY | {"input": "Who is the king?", "max_output_tokens": 400, "min_tokens": 400, "background": True,
                     "stream": True}  # fmt: skip
    rid = first_events(server, body, 1)[0]["response"]["id"]
    everything: list[dict] = []
    reader = threading.Thread(target=lambda: everything.extend(resumed(server, rid)))
    reader.start()
    after_first = []
    for event in sse("GET", server, f"/v1/responses/{rid}?stream=true&starting_after=0"):
        after_first.append(event)
        if len(after_first) == 8:  # (some text written)
            status, cancelled = call(server, f"/v1/responses/{rid}/cancel", {})
    reader.join(60)
    assert status == 200 and cancelled["status"] == "cancelled", cancelled
    assert after_first == everything[1:] and everything[-1]["type"] == "response.incomplete"
    final = everything[-1]["response"]
    assert final == cancelled and 0 < final["usage"]["output_tokens"] < 400
    assert all(item["status"] == "incomplete" for item in final["output"])
    assert "".join(e["delta"] for e in everything if e["type"] == "response.output_text.delta") == output_text(final)


@pytest.mark.parametrize("query, needle", [
    ("stream=true", "no events to stream"), ("starting_after=3", "with stream=true"),
    ("stream=true&starting_after=-1", "an integer of 0 or more"), ("stream=yes", "'true' or 'false'"),
    ("after=3", "unknown query parameters: after")])  # fmt: skip
def test_streaming_a_response_again_is_refused_where_it_cannot_be(server, query, needle):
    status, response = call(server, "/v1/responses", GREEDY | {"input": "Hi", "max_output_tokens": 2})
    status, refused = request(server, "GET", f"/v1/responses/{response['id']}?{query}")
    assert status == 400 and needle in refused["error"]["message"], refused
    assert request(server, "GET", f"/v1/responses/resp_nope?{query.replace('after=3', 'stream=true')}")[0] in (400, 404)


def test_the_openai_client_resumes_a_background_stream(server):
    """The openai client's create(background=True, stream=True), left after a few events, and retrieve(stream=True,
    starting_after=N) and stream(response_id=..., starting_after=N), which pick it up from event N + 1."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url(server, "/v1"), api_key="none")
    first = client.responses.create(model=NAME, input="Who is the king?", max_output_tokens=32, temperature=0,
                                    background=True, stream=True)  # fmt: skip
    head = [next(iter(first)) for _ in range(6)]
    first.close()
    rid, last = head[0].response.id, head[-1].sequence_number
    rest = list(client.responses.retrieve(rid, stream=True, starting_after=last))
    assert [e.sequence_number for e in head + rest] == list(range(len(head) + len(rest)))
    text = "".join(e.delta for e in head + rest if e.type == "response.output_text.delta")
    assert rest[-1].response.output_text == text and client.responses.retrieve(rid).output_text == text
    with client.responses.stream(response_id=rid, starting_after=2) as stream:
        again = list(stream)
    assert [e.sequence_number for e in again] == list(range(3, len(head) + len(rest)))


@pytest.mark.parametrize("timeout", [None, 0])
def test_a_drain_answers_the_background_responses_it_took(lm, timeout):
    """Server.drain() returns once background responses, streamed or not, are stored whole; when its time runs
    out first they are stored "failed" (the shutdown timeout named)."""
    from neolm.serve.http import Server

    server = Server(lm, port=0, model_name=NAME, max_batch=1)
    server.start()
    try:
        n = 30 if timeout is None else 400  # (400: still running when the time is up)
        body = GREEDY | {"input": "Who is the king?", "max_output_tokens": n, "min_tokens": n, "background": True}
        status, polled = call(server, "/v1/responses", body)
        assert status == 200, polled
        streamed = first_events(server, body | {"stream": True}, 1)[0]["response"]
        assert server.drain(timeout) is (timeout is None)
        for rid in (polled["id"], streamed["id"]):
            stored = server.stored.get(rid)[0]
            if timeout is None:
                assert stored["status"] == "incomplete" and stored["usage"]["output_tokens"] == n, stored
            else:
                assert stored["status"] == "failed" and "shutdown timeout" in stored["error"]["message"], stored
    finally:
        server.close()


def test_neolm_serve_keeps_responses_through_a_crash(tmp_path):
    """`neolm serve --responses-store FILE` killed with SIGKILL mid-generation: restarted on the same file, it
    returns the response it had finished and continues its conversation, and the background response it was
    generating is "failed"."""
    import re
    import subprocess
    import sys

    def start() -> tuple[subprocess.Popen, SimpleNamespace]:
        """The process, and where it listens as call() and request() take a server."""
        process = subprocess.Popen([sys.executable, "-m", "neolm.cli", "serve", "--port", "0", "--responses-store",
                                    tmp_path / "responses.db"], stderr=subprocess.PIPE, text=True)  # fmt: skip
        lines = []
        while not (match := re.search(r"on http://127\.0\.0\.1:(\d+)/v1", lines[-1] if lines else "")):
            lines.append(process.stderr.readline())
            assert lines[-1], "".join(lines)  # (it exited)
        return process, SimpleNamespace(server_address=("127.0.0.1", int(match[1])))

    process, served = start()
    try:
        status, done = call(served, "/v1/responses", GREEDY | {"input": "Who is the king?", "max_output_tokens": 8})
        assert status == 200, done
        long = {"input": "Speak.", "max_output_tokens": 400, "min_tokens": 400, "background": True}
        status, running = call(served, "/v1/responses", GREEDY | long)
        assert status == 200 and running["status"] == "queued", running
        process.kill()
        process.wait(60)
        process, served = start()
        assert request(served, "GET", f"/v1/responses/{done['id']}") == (200, done)
        status, failed = request(served, "GET", f"/v1/responses/{running['id']}")
        assert status == 200 and failed["status"] == "failed" and "server stopped" in failed["error"]["message"]
        status, next_turn = call(served, "/v1/responses", GREEDY | {
            "input": "And the queen?", "previous_response_id": done["id"], "max_output_tokens": 4})  # fmt: skip
        assert status == 200 and next_turn["previous_response_id"] == done["id"], next_turn
    finally:
        process.kill()
        process.wait(60)


def test_a_streamed_response_sends_each_event_as_it_is_made(server):
    """A foreground stream's events go out while the model writes: a client that reads the first few and hangs up
    stops a generation that had not ended (its sequence counted as aborted)."""
    aborted = server.engine.metrics.finished["abort"]
    body = GREEDY | {"input": "Who is the king?", "max_output_tokens": 400, "min_tokens": 400, "stream": True}
    assert first_events(server, body, 6)[-1]["type"] == "response.output_text.delta"
    deadline = time.monotonic() + 60
    while server.engine.metrics.finished["abort"] == aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.engine.metrics.finished["abort"] == aborted + 1

"""OpenAI's Conversations API (neolm/serve/conversations.py): conversations are created, read, changed and deleted,
their items listed a page at a time, responses with `conversation` continue them (the same answer as the chat
completion of the whole conversation) and add their input and output to them, they outlive the server in a
responses store file, and bad requests are refused."""

from __future__ import annotations

import json
import urllib.request

import pytest
from conftest import NAME
from test_responses import GREEDY, named_events, output_text
from test_serve import call, url

from neolm.serve.errors import ApiError
from neolm.serve.store import FileStore, Store

KING = {"type": "message", "role": "user", "content": "Who is the king?"}


def send(server, method: str, path: str, body=None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url(server, path), data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_conversation_is_created_read_changed_and_deleted(server):
    status, conversation = send(server, "POST", "/v1/conversations", {"items": [KING], "metadata": {"topic": "kings"}})
    assert status == 200 and conversation["object"] == "conversation" and conversation["id"].startswith("conv_")
    assert conversation["metadata"] == {"topic": "kings"} and isinstance(conversation["created_at"], int)
    cid = conversation["id"]
    assert send(server, "GET", f"/v1/conversations/{cid}") == (200, conversation)
    status, changed = send(server, "POST", f"/v1/conversations/{cid}", {"metadata": {"topic": "queens"}})
    assert status == 200 and changed == conversation | {"metadata": {"topic": "queens"}}
    assert send(server, "GET", f"/v1/conversations/{cid}")[1]["metadata"] == {"topic": "queens"}
    deleted = {"id": cid, "object": "conversation.deleted", "deleted": True}
    assert send(server, "DELETE", f"/v1/conversations/{cid}") == (200, deleted)
    status, error = send(server, "GET", f"/v1/conversations/{cid}")
    assert status == 404 and error["error"]["type"] == "not_found_error"
    assert send(server, "DELETE", f"/v1/conversations/{cid}")[0] == 404


def test_items_are_added_listed_a_page_at_a_time_read_and_deleted(server):
    cid = send(server, "POST", "/v1/conversations", {})[1]["id"]
    assert send(server, "GET", f"/v1/conversations/{cid}/items")[1]["data"] == []
    given = [{"type": "message", "role": "user", "content": f"line {i}"} for i in range(5)]
    status, added = send(server, "POST", f"/v1/conversations/{cid}/items", {"items": given})
    assert status == 200 and added["object"] == "list" and len(added["data"]) == 5 and not added["has_more"]
    ids = [item["id"] for item in added["data"]]
    assert all(i.startswith("msg_") for i in ids) and added["first_id"] == ids[0] and added["last_id"] == ids[-1]
    assert added["data"][0] | {"id": None} == {"id": None, "type": "message", "role": "user", "status": "completed",
                                               "content": [{"type": "input_text", "text": "line 0"}]}  # fmt: skip
    listed = send(server, "GET", f"/v1/conversations/{cid}/items")[1]  # newest first by default
    assert [item["id"] for item in listed["data"]] == ids[::-1] and not listed["has_more"]
    first = send(server, "GET", f"/v1/conversations/{cid}/items?order=asc&limit=2")[1]
    assert [item["id"] for item in first["data"]] == ids[:2] and first["has_more"]
    rest = send(server, "GET", f"/v1/conversations/{cid}/items?order=asc&after={first['last_id']}")[1]
    assert [item["id"] for item in rest["data"]] == ids[2:] and not rest["has_more"]
    assert send(server, "GET", f"/v1/conversations/{cid}/items/{ids[3]}") == (200, added["data"][3])
    status, conversation = send(server, "DELETE", f"/v1/conversations/{cid}/items/{ids[3]}")
    assert status == 200 and conversation["id"] == cid and conversation["object"] == "conversation"
    assert [i["id"] for i in send(server, "GET", f"/v1/conversations/{cid}/items?order=asc")[1]["data"]] == \
        ids[:3] + ids[4:]  # fmt: skip
    assert send(server, "GET", f"/v1/conversations/{cid}/items/{ids[3]}")[0] == 404


def test_responses_continue_a_conversation_and_add_to_it(server):
    cid = send(server, "POST", "/v1/conversations", {"items": [KING]})[1]["id"]
    status, first = call(server, "/v1/responses", GREEDY | {"conversation": cid, "input": "Tell me more.",
                                                            "max_output_tokens": 8})  # fmt: skip
    assert status == 200 and first["conversation"] == {"id": cid}, first
    messages = [{"role": "user", "content": "Who is the king?"}, {"role": "user", "content": "Tell me more."}]
    chat = call(server, "/v1/chat/completions", GREEDY | {"messages": messages, "max_tokens": 8})[1]
    assert output_text(first) == chat["choices"][0]["message"]["content"]  # the conversation's items came first
    items = send(server, "GET", f"/v1/conversations/{cid}/items?order=asc")[1]["data"]
    assert [(i["type"], i.get("role")) for i in items] == [("message", "user")] * 2 + [("message", "assistant")]
    assert items[1]["content"][0]["text"] == "Tell me more." and items[2] == first["output"][0]
    # a second turn, streamed, with the conversation given as an object: it reads the first answer too
    status, text = call(server, "/v1/responses", GREEDY | {"conversation": {"id": cid}, "input": "And the queen?",
                                                           "max_output_tokens": 6, "stream": True})  # fmt: skip
    second = named_events(text)[-1]["response"]
    assert status == 200 and second["status"] in ("completed", "incomplete"), text
    messages += [{"role": "assistant", "content": output_text(first)}, {"role": "user", "content": "And the queen?"}]
    chat = call(server, "/v1/chat/completions", GREEDY | {"messages": messages, "max_tokens": 6})[1]
    assert output_text(second) == chat["choices"][0]["message"]["content"]
    items = send(server, "GET", f"/v1/conversations/{cid}/items?order=asc")[1]["data"]
    assert items[3]["content"][0]["text"] == "And the queen?" and items[4:] == second["output"]
    assert [item["type"] for item in second["output"]] == ["message"]  # (even an empty reply, as unstreamed)
    # a function call and its output, as items, are read as the chat's tool messages
    call_item = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
    output = {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 C"}
    assert send(server, "POST", f"/v1/conversations/{cid}/items", {"items": [call_item, output]})[0] == 200
    status, _ = call(server, "/v1/responses", GREEDY | {"conversation": cid, "input": "So?", "max_output_tokens": 4})
    assert status == 200
    assert len(send(server, "GET", f"/v1/conversations/{cid}/items?limit=100")[1]["data"]) == 9


@pytest.mark.parametrize("path, body, status, param, needle", [
    ("/v1/responses", {"conversation": "conv_none", "input": "Hi"}, 404, "conversation", "no conversation"),
    ("/v1/responses", {"conversation": {"name": "x"}, "input": "Hi"}, 400, "conversation", "conversation's id"),
    ("/v1/responses", {"conversation": "c", "previous_response_id": "r", "input": "Hi"}, 400, "conversation",
     "cannot both"),
    ("/v1/conversations", {"items": [{"type": "image"}]}, 400, "items", "items[0]: items of type 'image'"),
    ("/v1/conversations", {"items": [KING] * 21}, 400, "items", "up to 20"),
    ("/v1/conversations", {"metadata": {"k": 1}}, 400, "metadata", "strings"),
    ("/v1/conversations", {"metadata": {str(i): "v" for i in range(17)}}, 400, "metadata", "16 keys"),
    ("/v1/conversations", {"title": "x"}, 400, "title", "unrecognized"),
    ("/v1/conversations/conv_none/items", {"items": [KING]}, 404, None, "no conversation"),
    ("/v1/conversations/conv_none/items/x/y", {}, 404, None, "no route POST"),
])  # fmt: skip
def test_bad_requests_are_refused(server, path, body, status, param, needle):
    got, error = call(server, path, GREEDY | body if path == "/v1/responses" else body)
    assert got == status and needle in error["error"]["message"] and error["error"]["param"] == param, error


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_stores_keep_the_most_recently_used_conversations(kind, tmp_path):
    def make():
        return Store(2) if kind == "memory" else FileStore(tmp_path / "responses.db", 2)

    store = make()
    for cid in "abc":
        store.put_conversation({"id": cid, "metadata": {}}, [{"id": f"{cid}1"}])
        if cid == "b":
            store.conversation("a")  # (a used: b is now the least recently used)
    with pytest.raises(ApiError, match="no conversation"):
        store.conversation("b")
    assert store.edit_conversation("a", lambda conversation, items: items.append({"id": "a2"})) is None
    assert store.conversation("a") == ({"id": "a", "metadata": {}}, [{"id": "a1"}, {"id": "a2"}])
    if kind == "file":  # (and the file keeps them when opened again)
        store.close()
        store = make()
        assert store.conversation("a")[1][-1] == {"id": "a2"}  # (a used last: c, used before, goes for d)
        store.put_conversation({"id": "d", "metadata": {}}, [])
        assert store.conversation("a") and store.conversation("d")
        with pytest.raises(ApiError, match="no conversation"):
            store.conversation("c")
        store.put_conversation({"id": "c", "metadata": {}}, [{"id": "c1"}])
        assert store.conversation("c")[1] == [{"id": "c1"}]
    assert store.delete_conversation("c")["deleted"]
    with pytest.raises(ApiError):
        store.delete_conversation("c")
    store.close()


def test_the_openai_client_uses_conversations(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=url(server, "/v1"), api_key="none")
    conversation = client.conversations.create(items=[KING], metadata={"topic": "kings"})
    response = client.responses.create(model=NAME, conversation=conversation.id, input="Tell me more.",
                                       max_output_tokens=8, temperature=0)  # fmt: skip
    assert response.output_text and response.conversation.id == conversation.id
    items = list(client.conversations.items.list(conversation.id, order="asc"))
    assert [item.role for item in items] == ["user", "user", "assistant"]
    assert items[2].content[0].text == response.output_text
    added = client.conversations.items.create(conversation.id, items=[{"role": "user", "content": "Thanks."}])
    assert client.conversations.items.retrieve(added.first_id, conversation_id=conversation.id).content[0].text == \
        "Thanks."  # fmt: skip
    assert client.conversations.items.delete(added.first_id, conversation_id=conversation.id).id == conversation.id
    assert client.conversations.update(conversation.id, metadata={"topic": "queens"}).metadata == {"topic": "queens"}
    assert client.conversations.retrieve(conversation.id).metadata == {"topic": "queens"}
    assert client.conversations.delete(conversation.id).deleted

"""OpenAI's Conversations API. A conversation is a list of items (messages, function calls and their outputs: the
Responses API's input and output items) that responses continue: POST /v1/responses with `conversation` reads its
items before the request's input, and adds that input and the response's output to it once answered (completed or
cut short by max_output_tokens; a failed response adds nothing).

  POST   /v1/conversations                        create one (`items`: up to 20, `metadata`)
  GET    /v1/conversations/{id}                   the conversation
  POST   /v1/conversations/{id}                   replace its `metadata`
  DELETE /v1/conversations/{id}                   delete it
  GET    /v1/conversations/{id}/items             its items, a page at a time (`limit`, `order`, `after`)
  POST   /v1/conversations/{id}/items             add items (up to 20)
  GET    /v1/conversations/{id}/items/{item_id}   one item
  DELETE /v1/conversations/{id}/items/{item_id}   delete one (answers the conversation)

Conversations are kept in the server's store beside its responses (neolm.serve.store: in memory, or in the
--responses-store file, where they outlive the server), the `--max-stored-responses` most recently used.
"""

from __future__ import annotations

import time
import uuid

from neolm.serve import protocol
from neolm.serve.errors import ApiError
from neolm.serve.responses import check_items, listing, page
from neolm.serve.store import Store

MAX_ADDED = 20  # items a request may add (OpenAI's limit)
MAX_METADATA = 16  # metadata's keys (OpenAI's limit: keys of up to 64 characters, values strings of up to 512)
PREFIX = "/v1/conversations"


def answer(method: str, path: str, store: Store, body, query: dict[str, list[str]]) -> dict:
    """The answer to a request for `path` (under PREFIX); body: the POST's JSON, query: the URL's parameters."""
    parts = path.removeprefix(PREFIX).strip("/").split("/") if path != PREFIX else []
    if method == "POST" and not parts:
        return create(store, body)
    if len(parts) == 1:
        cid = parts[0]
        if method == "GET":
            return store.conversation(cid)[0]
        if method == "POST":
            return store.edit_conversation(cid, lambda conversation, _: _set_metadata(conversation, body))
        if method == "DELETE":
            return store.delete_conversation(cid)
    if len(parts) == 2 and parts[1] == "items":
        if method == "GET":
            protocol.known_params(query, {"order", "limit", "after", "include"})
            return page(store.conversation(parts[0])[1], query, f"conversation {parts[0]!r}")
        if method == "POST":
            return add_items(store, parts[0], body)
    if len(parts) == 3 and parts[1] == "items":
        cid, iid = parts[0], parts[2]
        if method == "GET":  # (a read: the store writes nothing back)
            conversation, items = store.conversation(cid)
            return items[_at(conversation, items, iid)]
        if method == "DELETE":
            return store.edit_conversation(cid, lambda conversation, items: _delete_item(conversation, items, iid))
    raise ApiError(404, f"no route {method} {path}: try POST /v1/conversations, GET/POST/DELETE "
                   "/v1/conversations/{id}, GET/POST /v1/conversations/{id}/items or GET/DELETE "
                   "/v1/conversations/{id}/items/{item_id}")  # fmt: skip


def create(store: Store, body) -> dict:
    """POST /v1/conversations: a new conversation, with the body's items and metadata."""
    protocol.known_fields(body, {"items", "metadata"})
    conversation = {"id": f"conv_{uuid.uuid4().hex}", "object": "conversation", "created_at": int(time.time())}
    _set_metadata(conversation, {"metadata": body.get("metadata")})
    store.put_conversation(conversation, _items(body.get("items") or []))
    return conversation


def add_items(store: Store, cid: str, body) -> dict:
    """POST /v1/conversations/{id}/items: the body's items added at the end; the list of those added."""
    protocol.known_fields(body, {"items"})
    if "items" not in body:
        raise ApiError(400, "'items' is required: a list of up to 20 items", "items")
    added = _items(body["items"])
    store.edit_conversation(cid, lambda _, items: items.extend(added))
    return listing(added)


def _items(given) -> list[dict]:
    if not isinstance(given, list) or len(given) > MAX_ADDED:
        raise ApiError(400, f"'items' must be a list of up to {MAX_ADDED} items", "items")
    return check_items(given, "items") if given else []


def _set_metadata(conversation: dict, body) -> dict:
    protocol.known_fields(body, {"metadata"})
    metadata = body.get("metadata") or {}
    pairs = metadata.items() if isinstance(metadata, dict) else [(None, None)]
    if len(pairs) > MAX_METADATA or not all(isinstance(k, str) and len(k) <= 64 and isinstance(v, str)
                                            and len(v) <= 512 for k, v in pairs):  # fmt: skip
        raise ApiError(400, f"'metadata' must be an object of up to {MAX_METADATA} keys of up to 64 characters, "
                       "with strings of up to 512 characters", "metadata")  # fmt: skip
    conversation["metadata"] = metadata
    return conversation


def _at(conversation: dict, items: list[dict], iid: str) -> int:
    """The place of the item with id `iid` among the conversation's items."""
    at = next((i for i, item in enumerate(items) if item.get("id") == iid), None)
    if at is None:
        raise ApiError(404, f"no item {iid!r} in conversation {conversation['id']!r}", kind="not_found_error")
    return at


def _delete_item(conversation: dict, items: list[dict], iid: str) -> dict:
    """The conversation, the item with id `iid` gone from its items."""
    del items[_at(conversation, items, iid)]
    return conversation

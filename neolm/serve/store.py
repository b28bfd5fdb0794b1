"""Where the Responses API keeps stored responses (`store: true`): each response with the conversation it ends (the
chat messages a later turn continues, instructions left out) and its request's input items (GET
/v1/responses/{id}/input_items lists them); and the Conversations API's conversations (neolm.serve.conversations):
each with its items. The least recently used of each are dropped beyond `size`.

- Store: in memory, lost when the server stops (the default, as vLLM's);
- FileStore: a SQLite file (neolm serve --responses-store FILE), so that conversations continue across restarts
  and a crash of the server loses nothing stored. Each response is committed as it is stored (write-ahead log); a
  background response that was still being generated when the server stopped is "failed" when the file is next
  opened.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable

from neolm.errors import NeolmError
from neolm.serve.errors import ApiError

log = logging.getLogger(__name__)

MAX_STORED = 1000  # responses kept in memory
MAX_STORED_IN_FILE = 100_000  # responses kept in a FileStore
Entry = tuple[dict, list[dict], list[dict]]  # (the Response, its conversation's messages, its input items)
Conversation = tuple[dict, list[dict]]  # (the Conversation object, its items)


class Store:
    """Stored responses in memory: id -> (the Response, the conversation it ends, its request's input items); and
    conversations: id -> (the Conversation, its items)."""

    def __init__(self, size: int = MAX_STORED):
        self.size, self._lock = size, threading.Lock()
        self._items: OrderedDict[str, Entry] = OrderedDict()
        self._conversations: OrderedDict[str, Conversation] = OrderedDict()

    where = "in memory"

    def put(self, response: dict, messages: list[dict], inputs: list[dict]) -> None:
        with self._lock:
            self._keep(self._items, response["id"], (response, messages, inputs))

    def _keep(self, table: OrderedDict, key: str, value) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.size:
            table.popitem(last=False)

    def put_conversation(self, conversation: dict, items: list[dict]) -> None:
        with self._lock:
            self._keep(self._conversations, conversation["id"], (conversation, items))

    def conversation(self, cid: str, param: str | None = None) -> Conversation:
        with self._lock:
            if cid not in self._conversations:
                raise self._no_conversation(cid, param)
            self._conversations.move_to_end(cid)
            conversation, items = self._conversations[cid]
            return dict(conversation), list(items)

    def edit_conversation(self, cid: str, edit: Callable[[dict, list[dict]], object], param: str | None = None):
        """edit(conversation, items), which changes them in place, done with no other change to them in between (a
        response's items added while a client adds its own); what it returns."""
        with self._lock:
            if cid not in self._conversations:
                raise self._no_conversation(cid, param)
            conversation, items = self._conversations[cid]
            result = edit(conversation, items)
            self._keep(self._conversations, cid, (conversation, items))
            return result

    def delete_conversation(self, cid: str) -> dict:
        with self._lock:
            if self._conversations.pop(cid, None) is None:
                raise self._no_conversation(cid)
        return {"id": cid, "object": "conversation.deleted", "deleted": True}

    def _no_conversation(self, cid: str, param: str | None = None) -> ApiError:
        return ApiError(404, f"no conversation with id {cid!r} (conversations are kept {self.where}, the last "
                        f"{self.size:,} used)", param, kind="not_found_error")  # fmt: skip

    def get(self, rid: str, param: str | None = None) -> Entry:
        with self._lock:
            if rid not in self._items:
                raise self._missing(rid, param)
            self._items.move_to_end(rid)
            return self._items[rid]

    def delete(self, rid: str) -> dict:
        with self._lock:
            if self._items.pop(rid, None) is None:
                raise self._missing(rid)
        return {"id": rid, "object": "response.deleted", "deleted": True}

    def close(self) -> None:
        pass

    def _missing(self, rid: str, param: str | None = None) -> ApiError:
        return ApiError(404, f"no response with id {rid!r} is stored (responses are kept {self.where}, the last "
                        f"{self.size:,}, with store: true)", param, kind="not_found_error")  # fmt: skip


SCHEMA = 1  # the file's PRAGMA user_version: the layout below


class FileStore(Store):
    """Stored responses in a SQLite file at `path` (created if absent), the `size` most recently used kept."""

    def __init__(self, path: str | os.PathLike, size: int = MAX_STORED_IN_FILE):
        self.size, self.path, self._lock = size, os.fspath(path), threading.Lock()
        self.where = f"in {self.path}"
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA):
                raise NeolmError(f"{self.path} holds responses stored by a newer neolm (layout {version}; this one "
                                 f"reads {SCHEMA}): upgrade neolm or give another file")  # fmt: skip
            # each put is committed as it returns: it survives the process being killed (synchronous NORMAL: a
            # power loss may take the last ones); readers do not wait for a writer
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, used INTEGER NOT NULL, "
                             "status TEXT NOT NULL, response TEXT NOT NULL, messages TEXT NOT NULL, "
                             "inputs TEXT NOT NULL)")  # fmt: skip
            self._db.execute("CREATE INDEX IF NOT EXISTS responses_used ON responses (used)")
            self._db.execute("CREATE TABLE IF NOT EXISTS conversations (id TEXT PRIMARY KEY, used INTEGER NOT NULL, "
                             "conversation TEXT NOT NULL, items TEXT NOT NULL)")  # fmt: skip
            self._db.execute("CREATE INDEX IF NOT EXISTS conversations_used ON conversations (used)")
            self._db.execute(f"PRAGMA user_version = {SCHEMA}")
            self._used = self._db.execute("SELECT MAX(COALESCE((SELECT MAX(used) FROM responses), 0), "
                                          "COALESCE((SELECT MAX(used) FROM conversations), 0))").fetchone()[0]  # fmt: skip
            self._count = self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
            self._conversation_count = self._db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0]
        except sqlite3.Error as e:
            raise NeolmError(f"cannot keep responses in {self.path}: {e} (it must be a SQLite file neolm made, in a "
                             "folder that exists and can be written)") from None  # fmt: skip
        self._fail_unfinished()
        log.info("responses stored in %s: %d kept (at most %d)", self.path, self._count, self.size)

    def _fail_unfinished(self) -> None:
        """Background responses the last server left "queued" or "in_progress": stored "failed"."""
        rows = self._db.execute("SELECT id, response FROM responses WHERE status IN ('queued', 'in_progress')")
        rows = rows.fetchall()
        for rid, text in rows:
            response = json.loads(text) | {"status": "failed", "error": {
                "code": "server_error", "message": "the server stopped before this response was whole"}}  # fmt: skip
            self._db.execute("UPDATE responses SET status = 'failed', response = ? WHERE id = ?",
                             (json.dumps(response), rid))  # fmt: skip
        if rows:
            log.warning("%d background response%s in %s %s unfinished when the server stopped: now failed",
                        len(rows), "s" * (len(rows) > 1), self.path, "were" if len(rows) > 1 else "was")  # fmt: skip

    def put(self, response: dict, messages: list[dict], inputs: list[dict]) -> None:
        rid = response["id"]
        row = (response["status"], json.dumps(response), json.dumps(messages), json.dumps(inputs))
        with self._lock:
            self._used += 1
            known = self._db.execute("SELECT 1 FROM responses WHERE id = ?", (rid,)).fetchone() is not None
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)", (rid, self._used, *row))
            self._count += not known
            if self._count > self.size:  # the least recently used go
                self._db.execute("DELETE FROM responses WHERE id IN (SELECT id FROM responses ORDER BY used LIMIT ?)",
                                 (self._count - self.size,))  # fmt: skip
                self._count = self.size

    def get(self, rid: str, param: str | None = None) -> Entry:
        with self._lock:
            row = self._db.execute("SELECT response, messages, inputs FROM responses WHERE id = ?", (rid,)).fetchone()
            if row is None:
                raise self._missing(rid, param)
            self._used += 1
            self._db.execute("UPDATE responses SET used = ? WHERE id = ?", (self._used, rid))
        return tuple(json.loads(text) for text in row)

    def delete(self, rid: str) -> dict:
        with self._lock:
            if self._db.execute("DELETE FROM responses WHERE id = ?", (rid,)).rowcount == 0:
                raise self._missing(rid)
            self._count -= 1
        return {"id": rid, "object": "response.deleted", "deleted": True}

    def put_conversation(self, conversation: dict, items: list[dict]) -> None:
        with self._lock:
            self._put_conversation(conversation, items)

    def _put_conversation(self, conversation: dict, items: list[dict]) -> None:
        cid = conversation["id"]
        self._used += 1
        known = self._db.execute("SELECT 1 FROM conversations WHERE id = ?", (cid,)).fetchone() is not None
        self._db.execute("INSERT OR REPLACE INTO conversations VALUES (?, ?, ?, ?)",
                         (cid, self._used, json.dumps(conversation), json.dumps(items)))  # fmt: skip
        self._conversation_count += not known
        if self._conversation_count > self.size:  # the least recently used go
            oldest, extra = "SELECT id FROM conversations ORDER BY used LIMIT ?", self._conversation_count - self.size
            self._db.execute(f"DELETE FROM conversations WHERE id IN ({oldest})", (extra,))
            self._conversation_count = self.size

    def conversation(self, cid: str, param: str | None = None) -> Conversation:
        with self._lock:
            return self._conversation(cid, param)

    def _conversation(self, cid: str, param: str | None) -> Conversation:
        row = self._db.execute("SELECT conversation, items FROM conversations WHERE id = ?", (cid,)).fetchone()
        if row is None:
            raise self._no_conversation(cid, param)
        self._used += 1
        self._db.execute("UPDATE conversations SET used = ? WHERE id = ?", (self._used, cid))
        return json.loads(row[0]), json.loads(row[1])

    def edit_conversation(self, cid: str, edit: Callable[[dict, list[dict]], object], param: str | None = None):
        with self._lock:
            conversation, items = self._conversation(cid, param)
            result = edit(conversation, items)
            self._put_conversation(conversation, items)
            return result

    def delete_conversation(self, cid: str) -> dict:
        with self._lock:
            if self._db.execute("DELETE FROM conversations WHERE id = ?", (cid,)).rowcount == 0:
                raise self._no_conversation(cid)
            self._conversation_count -= 1
        return {"id": cid, "object": "conversation.deleted", "deleted": True}

    def close(self) -> None:
        with self._lock:
            self._db.close()

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

    def get(self, rid: str, param: str | None = None) -> Entry:
        with self._lock:
            return self._find(self._items, rid, self._missing(rid, param))

    def delete(self, rid: str) -> dict:
        with self._lock:
            self._drop(self._items, rid, self._missing(rid))
        return {"id": rid, "object": "response.deleted", "deleted": True}

    def put_conversation(self, conversation: dict, items: list[dict]) -> None:
        with self._lock:
            self._keep(self._conversations, conversation["id"], (conversation, items))

    def conversation(self, cid: str, param: str | None = None) -> Conversation:
        with self._lock:
            conversation, items = self._find(self._conversations, cid, self._no_conversation(cid, param))
            return dict(conversation), list(items)

    def edit_conversation(self, cid: str, edit: Callable[[dict, list[dict]], object], param: str | None = None):
        """edit(conversation, items), which changes them in place, done with no other change to them in between (a
        response's items added while a client adds its own); what it returns."""
        with self._lock:
            conversation, items = self._find(self._conversations, cid, self._no_conversation(cid, param))
            return edit(conversation, items)  # (changed in place: already kept)

    def delete_conversation(self, cid: str) -> dict:
        with self._lock:
            self._drop(self._conversations, cid, self._no_conversation(cid))
        return {"id": cid, "object": "conversation.deleted", "deleted": True}

    def close(self) -> None:
        pass

    # one table (responses or conversations): kept in order of use, the least recently used dropped beyond size
    def _keep(self, table: OrderedDict, key: str, value) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.size:
            table.popitem(last=False)

    @staticmethod
    def _find(table: OrderedDict, key: str, missing: ApiError):
        if key not in table:
            raise missing
        table.move_to_end(key)
        return table[key]

    @staticmethod
    def _drop(table: OrderedDict, key: str, missing: ApiError) -> None:
        if table.pop(key, None) is None:
            raise missing

    def _missing(self, rid: str, param: str | None = None) -> ApiError:
        return ApiError(404, f"no response with id {rid!r} is stored (responses are kept {self.where}, the last "
                        f"{self.size:,}, with store: true)", param, kind="not_found_error")  # fmt: skip

    def _no_conversation(self, cid: str, param: str | None = None) -> ApiError:
        return ApiError(404, f"no conversation with id {cid!r} (conversations are kept {self.where}, the last "
                        f"{self.size:,} used)", param, kind="not_found_error")  # fmt: skip


SCHEMA = 1  # the file's PRAGMA user_version: the layout below
TABLES = ("responses", "conversations")


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
            # (uses count on from the last of either table's)
            self._used = max(self._db.execute(f"SELECT COALESCE(MAX(used), 0) FROM {t}").fetchone()[0] for t in TABLES)
            self._counts = {t: self._db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}
        except sqlite3.Error as e:
            raise NeolmError(f"cannot keep responses in {self.path}: {e} (it must be a SQLite file neolm made, in a "
                             "folder that exists and can be written)") from None  # fmt: skip
        self._fail_unfinished()
        log.info("responses stored in %s: %d kept (at most %d)", self.path, self._counts["responses"], self.size)

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
        row = (response["status"], json.dumps(response), json.dumps(messages), json.dumps(inputs))
        with self._lock:
            self._insert("responses", response["id"], row)

    def get(self, rid: str, param: str | None = None) -> Entry:
        with self._lock:
            row = self._row("responses", "response, messages, inputs", rid, self._missing(rid, param))
        return tuple(json.loads(text) for text in row)

    def delete(self, rid: str) -> dict:
        with self._lock:
            self._remove("responses", rid, self._missing(rid))
        return {"id": rid, "object": "response.deleted", "deleted": True}

    def put_conversation(self, conversation: dict, items: list[dict]) -> None:
        with self._lock:
            self._insert("conversations", conversation["id"], (json.dumps(conversation), json.dumps(items)))

    def conversation(self, cid: str, param: str | None = None) -> Conversation:
        with self._lock:
            row = self._row("conversations", "conversation, items", cid, self._no_conversation(cid, param))
        return json.loads(row[0]), json.loads(row[1])

    def edit_conversation(self, cid: str, edit: Callable[[dict, list[dict]], object], param: str | None = None):
        with self._lock:
            row = self._row("conversations", "conversation, items", cid, self._no_conversation(cid, param))
            conversation, items = json.loads(row[0]), json.loads(row[1])
            result = edit(conversation, items)
            self._db.execute("UPDATE conversations SET conversation = ?, items = ? WHERE id = ?",
                             (json.dumps(conversation), json.dumps(items), cid))  # (its use: counted by _row)
            return result

    def delete_conversation(self, cid: str) -> dict:
        with self._lock:
            self._remove("conversations", cid, self._no_conversation(cid))
        return {"id": cid, "object": "conversation.deleted", "deleted": True}

    # one table (responses or conversations), under the lock: rows carry their last use, the least recently used
    # dropped beyond size
    def _insert(self, table: str, key: str, row: tuple) -> None:
        self._used += 1
        known = self._db.execute(f"SELECT 1 FROM {table} WHERE id = ?", (key,)).fetchone() is not None
        self._db.execute(f"INSERT OR REPLACE INTO {table} VALUES (?, ?{', ?' * len(row)})", (key, self._used, *row))
        self._counts[table] += not known
        if self._counts[table] > self.size:
            oldest = f"SELECT id FROM {table} ORDER BY used LIMIT ?"
            self._db.execute(f"DELETE FROM {table} WHERE id IN ({oldest})", (self._counts[table] - self.size,))
            self._counts[table] = self.size

    def _row(self, table: str, columns: str, key: str, missing: ApiError) -> tuple:
        row = self._db.execute(f"SELECT {columns} FROM {table} WHERE id = ?", (key,)).fetchone()
        if row is None:
            raise missing
        self._used += 1
        self._db.execute(f"UPDATE {table} SET used = ? WHERE id = ?", (self._used, key))
        return row

    def _remove(self, table: str, key: str, missing: ApiError) -> None:
        if self._db.execute(f"DELETE FROM {table} WHERE id = ?", (key,)).rowcount == 0:
            raise missing
        self._counts[table] -= 1

    def close(self) -> None:
        with self._lock:
            self._db.close()

"""Where a taught example is stored: `LearnStore`, an embedded SQLite database in the run folder
(`RUN_DIR/learn/items.sqlite`), written by the API replicas and read by the learning loop.

Durability: WAL journal, `synchronous=FULL`, every write one `BEGIN IMMEDIATE ... COMMIT`
transaction; `add` returns only after its commit, so an item the API acknowledged survives a kill
of any process at any moment (tests/serve/test_learn_store.py kills a writer with SIGKILL).

An item's life (its `state`):

    queued ──claim(step)──> woken (woken_step) ──consolidate(step, version)──> consolidated (version)
       │                       ^                                                  │
       └─withdraw─> withdrawn  └──────── rewind(step): the learner resumed from a checkpoint at
                                         `step`; what happened after it is undone ─┘
    woken / consolidated ──roll_back(version)──> rolled_back (its version was rolled back)

Only `queued` items can be withdrawn: what the model has woken on is in its memory. Every item
keeps the id of the key that sent it (`key_id`, a hash prefix, never the key) and the client's
idempotency key: a retried request with the same idempotency key stores nothing again and
answers with the ids of the first.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

QUEUED, WOKEN, CONSOLIDATED, WITHDRAWN, ROLLED_BACK = (
    "queued", "woken", "consolidated", "withdrawn", "rolled_back")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,   -- arrival order (the wake stream's order)
    id TEXT UNIQUE NOT NULL,                 -- 'item-<32 hex>'
    created REAL NOT NULL,                   -- unix seconds
    key_id TEXT NOT NULL,                    -- `key_id(key)` of the key that sent it
    kind TEXT NOT NULL,                      -- 'document' | 'example'
    prompt TEXT NOT NULL,                    -- '' for a document
    completion TEXT NOT NULL,
    state TEXT NOT NULL,
    woken_step INTEGER,                      -- the wake step that learned it
    consolidated_step INTEGER,               -- the step of the sleep that consolidated it
    version INTEGER                          -- the memory version that sleep produced
);
CREATE INDEX IF NOT EXISTS items_state ON items(state, seq);
CREATE TABLE IF NOT EXISTS sleeps (
    version INTEGER PRIMARY KEY,             -- the memory version the sleep (or rollback) made
    step INTEGER NOT NULL,                   -- the wake step it followed
    time REAL NOT NULL,
    reason TEXT NOT NULL                     -- 'schedule' | 'idle' | 'rollback to vN'
);
CREATE TABLE IF NOT EXISTS requests (
    key_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    body_sha256 TEXT NOT NULL,
    item_ids TEXT NOT NULL,                  -- JSON list, in the request's order
    created REAL NOT NULL,
    PRIMARY KEY (key_id, idempotency_key)
);
"""


def key_id(key: str) -> str:
    """What the store keeps of an API key: 'key-' and the first 12 hex digits of its SHA-256."""
    return "key-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:12]


@dataclass(frozen=True)
class TaughtItem:
    """One thing to learn: a document (`prompt` empty, the text as `completion`) or an example."""

    kind: str  # "document" | "example"
    prompt: str
    completion: str


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different body."""


class LearnStore:
    """The taught items of one run folder. Safe to use from several threads and processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # one connection, shared by the threads of this process
        self._db = sqlite3.connect(str(self.path), timeout=60.0, isolation_level=None,
                                   check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk, not only in the OS
        self._db.execute("PRAGMA busy_timeout=60000")
        self._db.executescript(_SCHEMA)

    @classmethod
    def for_run(cls, run_dir: str | Path) -> LearnStore:
        return cls(Path(run_dir) / "learn" / "items.sqlite")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ------------------------------------------------------------------ transactions

    class _Tx:
        def __init__(self, store: LearnStore):
            self.store = store

        def __enter__(self) -> sqlite3.Connection:
            self.store._lock.acquire()
            try:
                self.store._db.execute("BEGIN IMMEDIATE")  # the write lock, or wait for it
            except BaseException:
                self.store._lock.release()
                raise
            return self.store._db

        def __exit__(self, exc_type, exc, tb) -> None:
            try:
                self.store._db.execute("ROLLBACK" if exc_type else "COMMIT")
            finally:
                self.store._lock.release()

    def _write(self) -> LearnStore._Tx:
        return LearnStore._Tx(self)

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------------ intake (API replicas)

    def add(self, items: list[TaughtItem], sender: str, idempotency_key: str | None = None,
            body_sha256: str = "") -> tuple[list[str], bool]:
        """Store `items` from `sender` (a `key_id`) in one transaction; (their ids, True) once
        committed. With an `idempotency_key` seen before from the same sender: (the first request's ids, False) and
        nothing stored, or `IdempotencyConflict` when the body differs."""
        now = time.time()
        with self._write() as db:
            if idempotency_key is not None:
                row = db.execute("SELECT body_sha256, item_ids FROM requests WHERE key_id=? AND "
                                 "idempotency_key=?", (sender, idempotency_key)).fetchone()
                if row is not None:
                    if row["body_sha256"] != body_sha256:
                        raise IdempotencyConflict(idempotency_key)
                    return json.loads(row["item_ids"]), False
            ids = [f"item-{uuid.uuid4().hex}" for _ in items]
            db.executemany(
                "INSERT INTO items (id, created, key_id, kind, prompt, completion, state) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(i, now, sender, it.kind, it.prompt, it.completion, QUEUED) for i, it in zip(ids, items)])
            if idempotency_key is not None:
                db.execute("INSERT INTO requests VALUES (?, ?, ?, ?, ?)",
                           (sender, idempotency_key, body_sha256, json.dumps(ids), now))
        return ids, True

    def get(self, item_id: str) -> dict | None:
        rows = self._read("SELECT * FROM items WHERE id=?", (item_id,))
        return _public(rows[0]) if rows else None

    def withdraw(self, item_id: str) -> dict | None:
        """Withdraw a queued item; the item as it stands afterwards (None: no such item). An
        item the model has woken on keeps its state: the caller sees it was not withdrawn."""
        with self._write() as db:
            db.execute("UPDATE items SET state=? WHERE id=? AND state=?", (WITHDRAWN, item_id, QUEUED))
            row = db.execute("SELECT * FROM items WHERE id=?", (item_id,)).fetchone()
        return _public(row) if row is not None else None

    # ------------------------------------------------------------------ the wake stream (the loop)

    def claim(self, limit: int, step: int) -> list[dict]:
        """The oldest `limit` queued items, marked woken at `step`, oldest first."""
        with self._write() as db:
            rows = db.execute("SELECT * FROM items WHERE state=? ORDER BY seq LIMIT ?",
                              (QUEUED, limit)).fetchall()
            db.executemany("UPDATE items SET state=?, woken_step=? WHERE seq=?",
                           [(WOKEN, step, r["seq"]) for r in rows])
        return [dict(_public(r), state=WOKEN, woken_step=step) | _text(r) for r in rows]

    def consolidate(self, step: int, version: int, reason: str = "schedule") -> int:
        """The sleep after wake step `step` made memory `version`: items woken at or before
        `step` become consolidated in it, and the sleep is recorded, in one transaction. How many
        items."""
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO sleeps VALUES (?, ?, ?, ?)",
                       (version, step, time.time(), reason))
            return db.execute("UPDATE items SET state=?, consolidated_step=?, version=? WHERE "
                              "state=? AND woken_step<=?",
                              (CONSOLIDATED, step, version, WOKEN, step)).rowcount

    def rewind(self, step: int) -> int:
        """The learner resumed from a checkpoint taken after wake step `step`: consolidations
        after it are undone (back to woken) and items woken after it are queued again, to be
        woken once more, in their order. How many were queued again."""
        with self._write() as db:
            db.execute("DELETE FROM sleeps WHERE step>?", (step,))
            db.execute("UPDATE items SET state=?, consolidated_step=NULL, version=NULL WHERE "
                           "state=? AND consolidated_step>?", (WOKEN, CONSOLIDATED, step)).rowcount
            return db.execute("UPDATE items SET state=?, woken_step=NULL WHERE state=? AND "
                                  "woken_step>?", (QUEUED, WOKEN, step)).rowcount

    def roll_back(self, version: int, new_version: int, step: int) -> int:
        """Memory `version` is served again, as `new_version`, after wake step `step`: items
        consolidated in a later version, and items woken but not consolidated, are `rolled_back`
        (not in the memory any more; send them again to learn them). How many."""
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO sleeps VALUES (?, ?, ?, ?)",
                       (new_version, step, time.time(), f"rollback to v{version}"))
            return db.execute("UPDATE items SET state=? WHERE (state=? AND version>?) OR state=?",
                              (ROLLED_BACK, CONSOLIDATED, version, WOKEN)).rowcount

    # ------------------------------------------------------------------ status

    def counts(self) -> dict[str, int]:
        rows = self._read("SELECT state, COUNT(*) AS n FROM items GROUP BY state")
        out = dict.fromkeys((QUEUED, WOKEN, CONSOLIDATED, WITHDRAWN, ROLLED_BACK), 0)
        out.update({r["state"]: r["n"] for r in rows})
        return out

    def oldest_queued(self) -> float | None:
        """Arrival time of the oldest queued item (None: nothing queued)."""
        rows = self._read("SELECT MIN(created) AS t FROM items WHERE state=?", (QUEUED,))
        return rows[0]["t"]

    def last_sleep(self) -> dict | None:
        """The newest sleep (or rollback): {version, step, time, reason}, or None."""
        rows = self._read("SELECT * FROM sleeps ORDER BY step DESC, time DESC LIMIT 1")
        return dict(rows[0]) if rows else None

    def recent_woken(self, n: int, step: int) -> list[dict]:
        """The `n` newest items woken at or before `step` (still in the memory), oldest first,
        with their text."""
        rows = self._read("SELECT * FROM items WHERE state IN (?, ?) AND woken_step<=? "
                          "ORDER BY seq DESC LIMIT ?", (WOKEN, CONSOLIDATED, step, n))
        return [_public(r) | _text(r) for r in reversed(rows)]

    def items(self) -> list[dict]:
        """Every item, in arrival order (for tests and audits; not paged)."""
        return [_public(r) | {"woken_step": r["woken_step"], "consolidated_step": r["consolidated_step"]}
                for r in self._read("SELECT * FROM items ORDER BY seq")]


def _public(row: sqlite3.Row) -> dict:
    """An item as `GET /v1/sleep/learn/{id}` reports it (no text: the sender has it)."""
    return {"id": row["id"], "object": "sleep.learn.item", "created": row["created"],
            "key_id": row["key_id"], "kind": row["kind"], "state": row["state"],
            "version": row["version"]}


def _text(row: sqlite3.Row) -> dict:
    return {"prompt": row["prompt"], "completion": row["completion"]}

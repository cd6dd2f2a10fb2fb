"""The learn store (sleep_ray/serve/store.py), pure Python: durability (a writer killed with SIGKILL
right after acknowledging loses nothing), idempotent retries, the item's states through claim,
consolidate, rewind, withdraw and roll back, and two processes writing at once."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sleep_ray.serve.store import (CONSOLIDATED, QUEUED, ROLLED_BACK, WITHDRAWN, WOKEN,
                                   IdempotencyConflict, LearnStore, TaughtItem, key_id)

ROOT = Path(__file__).resolve().parents[2]
DOC = TaughtItem("document", "", "The sky of Zorb is green.")


def ex(i: int) -> TaughtItem:
    return TaughtItem("example", f"q{i}", f"a{i}")


@pytest.fixture
def store(tmp_path):
    s = LearnStore(tmp_path / "learn" / "items.sqlite")
    yield s
    s.close()


def test_the_database_is_in_wal_mode_with_full_sync(store):
    db = sqlite3.connect(store.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_key_id_is_a_hash_prefix_never_the_key():
    k = key_id("s3cret-learn-key")
    assert k.startswith("key-") and len(k) == 16 and "s3cret" not in k
    assert k == key_id("s3cret-learn-key") != key_id("s3cret-learn-kez")


def test_added_items_are_queued_with_id_time_and_sender(store):
    t0 = time.time()
    secret = "s3cret-learn-key-7f2a"
    ids, new = store.add([DOC, ex(1)], key_id(secret))
    assert new and len(set(ids)) == 2 and all(i.startswith("item-") for i in ids)
    item = store.get(ids[0])
    assert item["state"] == QUEUED and item["key_id"] == key_id(secret) and item["version"] is None
    assert t0 - 1 <= item["created"] <= time.time() + 1
    assert store.get("item-nope") is None
    raw = store.path.read_bytes() + Path(str(store.path) + "-wal").read_bytes()
    assert key_id(secret).encode() in raw and secret.encode() not in raw  # its id, never the key


def test_a_retry_with_the_same_idempotency_key_stores_nothing_twice(store):
    ids, new = store.add([ex(1), ex(2)], "key-a", "req-1", "sha-1")
    again, new2 = store.add([ex(1), ex(2)], "key-a", "req-1", "sha-1")
    assert new and not new2 and again == ids
    assert len(store.items()) == 2
    other, new3 = store.add([ex(1), ex(2)], "key-b", "req-1", "sha-1")  # another sender's key space
    assert new3 and set(other).isdisjoint(ids) and len(store.items()) == 4
    with pytest.raises(IdempotencyConflict):
        store.add([ex(3)], "key-a", "req-1", "sha-2")
    assert len(store.items()) == 4


def test_claim_consolidate_and_the_states(store):
    ids, _ = store.add([ex(i) for i in range(5)], "key-a")
    first = store.claim(2, step=1)
    assert [i["id"] for i in first] == ids[:2]  # arrival order
    assert [(i["prompt"], i["completion"]) for i in first] == [("q0", "a0"), ("q1", "a1")]
    assert store.claim(2, step=2)[0]["id"] == ids[2]
    assert store.counts()[WOKEN] == 4 and store.counts()[QUEUED] == 1
    assert store.consolidate(step=1, version=7) == 2  # only what was woken by step 1
    assert [store.get(i)["state"] for i in ids] == [CONSOLIDATED] * 2 + [WOKEN] * 2 + [QUEUED]
    assert store.get(ids[0])["version"] == 7 and store.get(ids[2])["version"] is None
    assert store.claim(10, step=3) and store.claim(10, step=4) == []


def test_withdraw_only_takes_back_what_was_not_consumed(store):
    ids, _ = store.add([ex(1), ex(2)], "key-a")
    store.claim(1, step=1)
    assert store.withdraw(ids[1])["state"] == WITHDRAWN
    assert store.withdraw(ids[0])["state"] == WOKEN  # already in the memory: unchanged
    assert store.withdraw("item-none") is None
    assert store.claim(5, step=2) == []  # a withdrawn item is never woken on


def test_rewind_undoes_what_followed_the_checkpoint(store):
    ids, _ = store.add([ex(i) for i in range(6)], "key-a")
    for step in (1, 2, 3):
        store.claim(2, step)
    store.consolidate(step=1, version=3)
    store.consolidate(step=2, version=5)  # the sleep at step 2; then a kill before its checkpoint
    assert store.last_sleep()["version"] == 5
    assert store.rewind(step=1) == 4  # steps 2 and 3 queued again; step 1 as the checkpoint has it
    states = [(i["state"], i["woken_step"], i["version"]) for i in store.items()]
    assert states == [(CONSOLIDATED, 1, 3)] * 2 + [(QUEUED, None, None)] * 4
    assert store.last_sleep()["version"] == 3  # the sleep at step 2 is undone too
    again = store.claim(10, step=2)  # woken once more, in arrival order
    assert [i["id"] for i in again] == ids[2:]


def test_roll_back_marks_what_left_the_memory(store):
    store.add([ex(i) for i in range(6)], "key-a")
    store.claim(2, 1)
    store.consolidate(1, version=3)
    store.claim(2, 2)
    store.consolidate(2, version=6)
    store.claim(1, 3)
    assert store.roll_back(3, new_version=9, step=3) == 3
    assert [i["state"] for i in store.items()] == [CONSOLIDATED] * 2 + [ROLLED_BACK] * 3 + [QUEUED]
    last = store.last_sleep()
    assert (last["version"], last["step"], last["reason"]) == (9, 3, "rollback to v3")


def test_recent_woken_items_carry_their_text(store):
    store.add([ex(i) for i in range(5)], "key-a")
    store.claim(3, 1)
    store.claim(1, 2)
    assert [i["prompt"] for i in store.recent_woken(2, step=1)] == ["q1", "q2"]
    assert [i["completion"] for i in store.recent_woken(9, step=2)] == ["a0", "a1", "a2", "a3"]


_WRITER = textwrap.dedent("""
    import sys
    from sleep_ray.serve.store import LearnStore, TaughtItem
    store = LearnStore(sys.argv[1])
    n = 0
    while True:
        n += 1
        ids, _ = store.add([TaughtItem("example", f"p{n}", f"c{n}")] * 3, "key-w", f"req-{n}", "h")
        print(" ".join(ids), flush=True)   # the acknowledgement: sent only after the commit
""")


def test_sigkill_after_acknowledging_loses_nothing(tmp_path):
    """A writer process acknowledges batches (prints their ids after each commit) and is killed
    with SIGKILL mid-stream; every acknowledged id is in the database, reopened by another
    process, and retrying the acknowledged requests stores nothing again."""
    path = tmp_path / "items.sqlite"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], stdout=subprocess.PIPE,
                            text=True, env=env)
    acked: list[list[str]] = []
    try:
        while len(acked) < 40:
            line = proc.stdout.readline()
            assert line, "the writer died before acknowledging 40 requests"
            acked.append(line.split())
        proc.send_signal(signal.SIGKILL)  # mid-write of the next request, most likely
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    store = LearnStore(path)
    stored = {i["id"] for i in store.items()}
    assert all(i in stored for ids in acked for i in ids)
    assert len(stored) % 3 == 0  # whole requests only: a torn one left nothing
    for n, ids in enumerate(acked, start=1):  # the client's retries after the crash
        assert store.add([TaughtItem("example", f"p{n}", f"c{n}")] * 3, "key-w", f"req-{n}", "h") \
            == (ids, False)
    assert {i["id"] for i in store.items()} == stored
    store.close()


def test_two_processes_write_at_once(tmp_path):
    path = tmp_path / "items.sqlite"
    LearnStore(path).close()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    script = textwrap.dedent("""
        import sys
        from sleep_ray.serve.store import LearnStore, TaughtItem
        store = LearnStore(sys.argv[1])
        for n in range(50):
            store.add([TaughtItem("document", "", f"{sys.argv[2]}{n}")], sys.argv[2])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), f"key-{w}"], env=env)
             for w in "ab"]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    store = LearnStore(path)
    items = store.items()
    assert len(items) == 100 and len({i["id"] for i in items}) == 100
    assert store.counts()[QUEUED] == 100
    store.close()

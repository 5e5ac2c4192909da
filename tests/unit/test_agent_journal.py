"""Unit: the local report journal (append, group-commit sync, publish in order, survive restarts, compact)
and the attempt records' deferred durability."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from verlyard_agent import journal as journal_module
from verlyard_agent.attempts import AttemptStore
from verlyard_agent.journal import CURSOR_EVERY, Journal
from verlyard_agent.lifecycle import AttemptRecord


async def test_entries_come_back_in_order_until_published(tmp_path: Path):
    j = Journal(tmp_path / "r.jsonl", fsync=True)
    for i in range(5):
        j.append("vy.rpt.a.x", f"id-{i}", b'{"n": %d}' % i)
    assert j.backlog == 5
    assert j.peek(2) == [], "nothing is handed out for publishing before it is synced"
    await j.sync()
    assert j.synced_seq == 5
    first = j.peek(2)
    assert [e.msg_id for e in first] == ["id-0", "id-1"] and bytes(first[0].data) == b'{"n": 0}'
    j.mark_published(first[0])
    with pytest.raises(ValueError, match="not the next unpublished entry"):
        j.mark_published(first[0])
    j.mark_published(first[1])
    assert j.backlog == 3 and [e.seq for e in j.peek(10)] == [3, 4, 5]
    j.close()


async def test_a_restart_replays_only_what_was_not_published(tmp_path: Path):
    path = tmp_path / "r.jsonl"
    j = Journal(path, fsync=True)
    for i in range(3):
        j.append("s", f"id-{i}", b"{}")
    await j.sync()
    j.mark_published(j.peek(1)[0])
    j.close()
    again = Journal(path, fsync=True)  # what a process left behind is synced when the journal reopens
    assert again.backlog == 2 and [e.msg_id for e in again.peek()] == ["id-1", "id-2"]
    assert again.append("s", "id-3", b"{}") == 4, "sequence numbers continue"
    again.close()


async def test_entries_past_the_memory_limit_are_read_back_from_the_file_in_order(tmp_path: Path):
    path = tmp_path / "r.jsonl"
    j = Journal(path, fsync=False, memory_entries=2)
    for i in range(5):
        j.append("s", f"id-{i}", b'{"n": %d}' % i)
    path.write_bytes(path.read_bytes().replace(b'"id-3"', b'"id-X"'))  # only the file knows it
    assert [e.msg_id for e in j.peek(10)] == ["id-0", "id-1", "id-2", "id-X", "id-4"]
    for entry in j.peek(10):
        j.mark_published(entry)
    j.append("s", "id-5", b"{}")  # caught up with the file: kept in memory again
    path.write_bytes(path.read_bytes().replace(b'"id-5"', b'"id-Y"'))
    assert [e.msg_id for e in j.peek(10)] == ["id-5"] and j.backlog == 1
    j.close()


async def test_a_restart_with_a_backlog_reads_the_file_then_keeps_new_entries_after_it(tmp_path: Path):
    path = tmp_path / "r.jsonl"
    j = Journal(path, fsync=True)
    for i in range(3):
        j.append("s", f"id-{i}", b"{}")
    j.close()
    again = Journal(path, fsync=True)
    again.append("s", "id-3", b"{}")
    await again.sync()
    assert [e.seq for e in again.peek(10)] == [1, 2, 3, 4]
    for entry in again.peek(10):
        again.mark_published(entry)
    again.close()
    assert Journal(path, fsync=True).backlog == 0


def test_a_steady_stream_still_moves_the_cursor_so_a_crash_republishes_little(tmp_path: Path):
    path = tmp_path / "r.jsonl"
    j = Journal(path, fsync=False)
    for i in range(100):
        j.append("s", f"id-{i}", b"{}")
    for entry in j.peek(70):
        j.mark_published(entry)  # the buffer never empties: 30 entries still wait
    crashed = Journal(path, fsync=False)  # no close(): what a killed agent leaves
    assert crashed.backlog == 100 - CURSOR_EVERY
    assert crashed.peek(1)[0].msg_id == f"id-{CURSOR_EVERY}"
    crashed.close()
    j.close()


def test_a_line_torn_by_a_crash_is_cut(tmp_path: Path):
    path = tmp_path / "r.jsonl"
    j = Journal(path, fsync=True)
    j.append("s", "id-0", b"{}")
    j.close()
    with path.open("ab") as f:
        f.write(b'{"seq":2,"subject":"s","msg_id":"id-1","da')
    again = Journal(path, fsync=True)
    assert [e.msg_id for e in again.peek()] == ["id-0"] and path.read_bytes().endswith(b"\n")
    again.close()


def test_the_file_is_truncated_once_everything_is_published(tmp_path: Path):
    path = tmp_path / "t.jsonl"
    j = Journal(path, fsync=False, compact_bytes=100)
    for i in range(10):
        j.append("s", f"id-{i}", b'{"pad": "xxxxxxxxxx"}')
    for entry in j.peek(64):
        j.mark_published(entry)
    assert j.backlog == 0 and path.stat().st_size == 0
    j.append("s", "id-10", b"{}")
    assert [e.seq for e in j.peek()] == [11]
    j.close()
    again = Journal(path, fsync=False)
    assert [e.msg_id for e in again.peek()] == ["id-10"]
    again.close()


async def test_concurrent_syncs_share_one_fsync_and_cover_everything_appended(tmp_path: Path):
    j = Journal(tmp_path / "r.jsonl", fsync=True)
    for i in range(3):
        j.append("s", f"id-{i}", b"{}")
    await asyncio.gather(j.sync(), j.sync(), j.sync())
    assert j.synced_seq == 3 and [e.seq for e in j.peek()] == [1, 2, 3]
    j.append("s", "id-3", b"{}")
    assert [e.seq for e in j.peek()] == [1, 2, 3], "the unsynced 4th waits for the next sync"
    await j.sync()
    assert [e.seq for e in j.peek()] == [1, 2, 3, 4]
    j.close()


def test_a_journal_that_is_not_durable_hands_entries_out_at_once(tmp_path: Path):
    j = Journal(tmp_path / "t.jsonl", fsync=False)
    j.append("s", "id-0", b"{}")
    assert j.synced_seq == 1 and [e.msg_id for e in j.peek()] == ["id-0"]
    j.close()


async def test_attempt_records_are_visible_at_once_and_durable_after_sync(tmp_path: Path):
    store = AttemptStore(tmp_path)
    record = AttemptRecord(
        attempt="a1", pipeline_id="p", stage="s", kind="noop", state="accepted", updated_at=datetime.now(UTC)
    )
    store.put(record)
    assert store.get("a1") == record and store.unsynced == 1
    await store.sync()
    assert store.unsynced == 0 and AttemptStore(tmp_path).get("a1") == record


def _record(attempt: str, state: str, at: datetime) -> AttemptRecord:
    return AttemptRecord(attempt=attempt, pipeline_id="p", stage="s", kind="noop", state=state, updated_at=at)


def test_attempt_records_survive_a_reopen_the_last_change_winning_and_a_torn_line_cut(tmp_path: Path):
    now = datetime.now(UTC)
    store = AttemptStore(tmp_path)
    store.put(_record("a1", "accepted", now))
    store.put(_record("a1", "running", now))
    store.put(_record("a2", "accepted", now))
    store.close()
    with store.path.open("ab") as f:
        f.write(b'{"attempt":"a3","pipel')  # a crash mid-append
    again = AttemptStore(tmp_path)
    assert [(r.attempt, r.state) for r in again.all()] == [("a1", "running"), ("a2", "accepted")]
    assert len(again.path.read_bytes().splitlines()) == 2, "reopening rewrites one line per live record"
    again.close()


def test_old_finished_records_are_pruned_and_per_attempt_files_of_older_agents_folded_in(tmp_path: Path):
    now = datetime.now(UTC)
    legacy = tmp_path / "attempts"
    legacy.mkdir()
    (legacy / "old1.json").write_bytes(msgspec.json.encode(_record("old1", "running", now)))
    store = AttemptStore(tmp_path)
    assert store.get("old1") is not None and not (legacy / "old1.json").exists()
    store.put(_record("done", "finished", now - timedelta(days=40)))
    store.put(_record("fresh", "finished", now))
    assert store.prune(now=now, keep=timedelta(days=30)) == 1
    assert store.get("done") is None and store.get("fresh") is not None
    store.close()
    assert {r.attempt for r in AttemptStore(tmp_path).all()} == {"old1", "fresh"}


def test_the_log_is_compacted_when_superseded_lines_pile_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("verlyard_agent.attempts.COMPACT_MIN_LINES", 10)
    now = datetime.now(UTC)
    store = AttemptStore(tmp_path)
    for i in range(25):
        store.put(_record("a1", "running" if i % 2 else "accepted", now))
    assert len(store.path.read_bytes().splitlines()) < 12
    assert store.get("a1") == _record("a1", "accepted", now)
    store.close()


async def test_entries_that_need_no_durability_are_released_without_an_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    fsyncs: list[int] = []
    monkeypatch.setattr("verlyard_agent.journal.os.fsync", fsyncs.append)
    j = Journal(tmp_path / "r.jsonl", fsync=True)
    opened = len(fsyncs)
    j.append("s", "accepted", b"{}", durable=False)
    j.append("s", "started", b"{}", durable=False)
    await j.sync()
    assert [e.msg_id for e in j.peek()] == ["accepted", "started"] and len(fsyncs) == opened
    j.append("s", "finished", b"{}")
    j.append("s", "progress", b"{}", durable=False)
    await j.sync()
    assert len(fsyncs) == opened + 1, "one fsync covers the durable entry and what came with it"
    assert [e.msg_id for e in j.peek()] == ["accepted", "started", "finished", "progress"]
    j.close()


async def test_sync_fsyncs_on_the_loop_while_the_disk_is_fast_and_in_a_thread_while_it_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    on_loop: list[bool] = []
    fsync_takes = [0.0]

    def fake_fsync(fd: int) -> None:
        on_loop.append(threading.current_thread() is threading.main_thread())
        time.sleep(fsync_takes[0])

    monkeypatch.setattr(journal_module.os, "fsync", fake_fsync)
    j = Journal(tmp_path / "r.jsonl", fsync=True)
    on_loop.clear()  # the fsync on opening

    async def append_and_sync(takes: float) -> None:
        fsync_takes[0] = takes
        j.append("s", f"id-{len(on_loop)}", b"{}")
        await j.sync()

    await append_and_sync(0.0)  # a fast disk: on the loop
    await append_and_sync(0.008)  # still on the loop (the average was fast), but slow: 2 ms on average now
    for _ in range(3):
        await append_and_sync(0.0)  # in a thread until the average falls under INLINE_FSYNC_S again...
    await append_and_sync(0.0)  # ...then back on the loop
    assert on_loop == [True, True, False, False, False, True]
    j.close()

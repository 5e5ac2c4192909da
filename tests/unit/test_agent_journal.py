"""Unit: the local report journal (append, publish in order, survive restarts, compact)."""

from __future__ import annotations

from pathlib import Path

import pytest

from verlyard_agent.journal import Journal


def test_entries_come_back_in_order_until_published(tmp_path: Path):
    j = Journal(tmp_path / "r.jsonl", fsync=True)
    for i in range(5):
        j.append("vy.rpt.a.x", f"id-{i}", b'{"n": %d}' % i)
    assert j.backlog == 5
    first = j.peek(2)
    assert [e.msg_id for e in first] == ["id-0", "id-1"] and bytes(first[0].data) == b'{"n": 0}'
    j.mark_published(first[0])
    with pytest.raises(ValueError, match="not the next unpublished entry"):
        j.mark_published(first[0])
    j.mark_published(first[1])
    assert j.backlog == 3 and [e.seq for e in j.peek(10)] == [3, 4, 5]
    j.close()


def test_a_restart_replays_only_what_was_not_published(tmp_path: Path):
    path = tmp_path / "r.jsonl"
    j = Journal(path, fsync=True)
    for i in range(3):
        j.append("s", f"id-{i}", b"{}")
    j.mark_published(j.peek(1)[0])
    j.close()
    again = Journal(path, fsync=True)
    assert again.backlog == 2 and [e.msg_id for e in again.peek()] == ["id-1", "id-2"]
    assert again.append("s", "id-3", b"{}") == 4, "sequence numbers continue"
    again.close()


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

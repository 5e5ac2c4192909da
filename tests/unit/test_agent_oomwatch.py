"""Unit: reading the memory cgroup's OOM-kill count (v1 and v2 layouts) and telling the OOM killer
from another SIGKILL with it."""

from __future__ import annotations

from pathlib import Path

from verlyard_agent.failures import classify
from verlyard_agent.oomwatch import counter_files, oom_kills


def _proc(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cgroup"
    path.write_text(text)
    return path


def test_cgroup_v2_memory_events_are_read(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    (root / "system.slice" / "agent").mkdir(parents=True)
    (root / "system.slice" / "agent" / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n")
    assert oom_kills(_proc(tmp_path, "0::/system.slice/agent\n"), root) == 2


def test_cgroup_v1_oom_control_is_read(tmp_path: Path) -> None:
    root = tmp_path / "fs"
    (root / "memory" / "docker" / "abc").mkdir(parents=True)
    (root / "memory" / "docker" / "abc" / "memory.oom_control").write_text(
        "oom_kill_disable 0\nunder_oom 0\noom_kill 7\n"
    )
    text = "12:pids:/docker/abc\n4:memory:/docker/abc\n0::/\n"
    assert counter_files(text, root)[0] == root / "memory" / "docker" / "abc" / "memory.oom_control"
    assert oom_kills(_proc(tmp_path, text), root) == 7


def test_nothing_readable_is_unknown(tmp_path: Path) -> None:
    assert oom_kills(_proc(tmp_path, "4:memory:/gone\n"), tmp_path) is None
    assert oom_kills(tmp_path / "missing", tmp_path) is None


def test_a_sigkill_is_an_oom_only_when_the_cgroup_counted_one() -> None:
    assert classify(-9, [], oom_kills=1).failure_class == "oom"
    other = classify(137, [], oom_kills=0)
    assert other.failure_class == "preempted" and "not the OOM killer" in other.reason
    assert classify(-9, []).failure_class == "oom", "unknown: the old guess stands"
    assert classify(1, ["boom"], oom_kills=0).failure_class == "user"

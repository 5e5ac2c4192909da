"""Adapter: how many times the kernel's OOM killer struck in this process's memory cgroup (cgroup v2
`memory.events`, v1 `memory.oom_control`), read before and after an attempt so that a SIGKILLed child
can be told apart: the OOM killer (the count rose), or someone else (it did not). None when the
counter cannot be read (no cgroup memory controller visible): the classifier then falls back to its
old guess."""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _count(text: str) -> int | None:
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name == "oom_kill" and value.strip().isdigit():
            return int(value)
    return None


def counter_files(proc_cgroup: str, root: Path = CGROUP_ROOT) -> list[Path]:
    """The files that may hold the OOM-kill count, from `/proc/<pid>/cgroup`'s text, most specific first."""
    files: list[Path] = []
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        relative = path.strip().lstrip("/")
        if hierarchy == "0" and controllers == "":
            files += [root / relative / "memory.events", root / "unified" / relative / "memory.events"]
        elif "memory" in controllers.split(","):
            files.append(root / "memory" / relative / "memory.oom_control")
    return files


def oom_kills(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> int | None:
    try:
        text = proc_cgroup.read_text()
    except OSError:
        return None
    for path in counter_files(text, root):
        try:
            count = _count(path.read_text())
        except OSError:
            continue
        if count is not None:
            return count
    return None

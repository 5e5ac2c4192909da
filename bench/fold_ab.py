"""Bench tool (edge): A/B the scheduler's start-up fold between git revisions, in one process.

R1 times one fresh process per run, and on this shared 2-core machine two processes minutes apart can
differ by 40 % for the same code. This folds the same decoded events (bench R1's replicated recorded
logs) with each revision's `fold.py` + `world.py` in turn, alternating, so every revision sees the same
noise; it prints each one's median and best events/s (wall), `World.apply(index=False, advance=False)`
then `evict_terminal` + `reindex`, as R1 times them. The events are decoded once and frozen out of the
GC (in R1 they live one batch at a time), so this compares the fold's code, not R1's absolute figure.

    .venv/bin/python -m bench.fold_ab HEAD~3 worktree --events 200000 --runs 6
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.r1 import recorded_events

ROOT = Path(__file__).resolve().parents[1]
CORE = "services/scheduler/src/verlyard_scheduler"


def _source(revision: str, name: str) -> str:
    if revision == "worktree":
        return (ROOT / CORE / name).read_text()
    return subprocess.run(
        ["git", "show", f"{revision}:{CORE}/{name}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout


def load_world(revision: str, tag: str) -> Callable[[], Any]:
    """That revision's `World` class, its `world.py` importing its own `fold.py` (as module `fold_<tag>`)."""
    fold = types.ModuleType(f"fold_{tag}")
    sys.modules[fold.__name__] = fold  # msgspec resolves the Structs' annotations through sys.modules
    exec(compile(_source(revision, "fold.py"), f"{revision}:fold.py", "exec"), fold.__dict__)
    world_source = _source(revision, "world.py").replace(
        "from verlyard_scheduler.fold import", f"from {fold.__name__} import"
    )
    world = types.ModuleType(f"world_{tag}")
    sys.modules[world.__name__] = world
    exec(compile(world_source, f"{revision}:world.py", "exec"), world.__dict__)
    return world.World


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fold_ab", description="A/B the start-up fold between git revisions."
    )
    parser.add_argument("revisions", nargs="+", help="git revisions, or `worktree` for the files as they are")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args(argv)
    worlds = {f"{i}:{rev}": load_world(rev, str(i)) for i, rev in enumerate(args.revisions)}
    events = [e for batch in recorded_events(args.events) for e in batch]
    gc.collect()
    gc.freeze()
    rates: dict[str, list[float]] = {name: [] for name in worlds}
    for _ in range(args.runs):
        for name, world_class in worlds.items():
            world = world_class()
            began = time.perf_counter()
            for envelope in events:
                world.apply(envelope, index=False, advance=False)
            world.evict_terminal(list(world.pipelines))
            world.reindex()
            rates[name].append(len(events) / (time.perf_counter() - began))
            del world
            gc.collect()
    for name, got in rates.items():
        print(
            f"{name:24s} {len(events)} events x {args.runs}: median {statistics.median(got):,.0f}/s, "
            f"best {max(got):,.0f}/s  (runs: {', '.join(f'{r / 1000:.0f}k' for r in got)})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

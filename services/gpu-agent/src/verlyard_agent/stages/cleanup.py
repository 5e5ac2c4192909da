"""Stage kind `cleanup`: checkpoint retention over the `global_step_*` folders of its dependencies.

`with: {keep_last: 2, pinned: [100, 200], dry_run: false, stage: train}`. The checkpoint folders are
the `checkpoint_dir` outputs of the stage's dependencies (all of them, or only `stage`'s); steps
listed in a dependency's `pinned_steps` output are pinned too. The plan is retention.py's (never the
newest complete checkpoint). Each folder is first renamed to `.deleting-global_step_N` (so a half
deleted folder never looks like a checkpoint), then removed; only then is it recorded in outputs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from verlyard_agent.retention import LATEST_FILE, parse_latest, plan_retention, step_of
from verlyard_agent.stages.base import AttemptContext, StageFailure, StageResult

DEFAULT_KEEP_LAST = 2
_TRASH_PREFIX = ".deleting-"


def _int_list(value: object, what: str) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise StageFailure(f"`{what}` must be a list of step numbers")
    out: list[int] = []
    for item in value:  # pyright: ignore[reportUnknownVariableType]
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise StageFailure(f"`{what}` must hold step numbers (integers >= 0), got {item!r}")
        out.append(item)
    return out


def checkpoint_dirs(inputs: Mapping[str, Mapping[str, Any]], only: str | None) -> list[tuple[str, Path]]:
    """(stage, folder) for every dependency output named `checkpoint_dir`."""
    found: list[tuple[str, Path]] = []
    for stage, outputs in sorted(inputs.items()):
        if only is not None and stage != only:
            continue
        raw = outputs.get("checkpoint_dir")
        if isinstance(raw, str) and raw:
            found.append((stage, Path(raw)))
    return found


def _size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def _delete(folder: Path, trash_name: str) -> int:
    """Rename, then remove; returns the bytes freed."""
    size = _size(folder)
    trash = folder.with_name(trash_name)
    folder.rename(trash)
    shutil.rmtree(trash)
    return size


def _leftover_trash(directory: Path) -> Iterable[Path]:
    return (p for p in directory.iterdir() if p.name.startswith(_TRASH_PREFIX) and p.is_dir() and not p.is_symlink())


def _scan(directory: Path) -> tuple[dict[int, Path], int | None] | None:
    """The `global_step_*` folders (real folders, not links) and the latest complete step."""
    if not directory.is_dir():
        return None
    steps: dict[int, Path] = {}
    for entry in directory.iterdir():
        step = step_of(entry.name)
        if step is not None and entry.is_dir() and not entry.is_symlink():
            steps[step] = entry
    try:
        latest = parse_latest((directory / LATEST_FILE).read_text())
    except (FileNotFoundError, UnicodeDecodeError):
        latest = None
    return steps, latest


async def _clean(
    ctx: AttemptContext, stage: str, directory: Path, *, keep_last: int, pinned: list[int], dry: bool
) -> dict[str, Any]:
    scan = await asyncio.to_thread(_scan, directory)
    if scan is None:
        ctx.log(f"{stage}: checkpoint folder {directory} does not exist: nothing to clean")
        return {"stage": stage, "checkpoint_dir": str(directory), "deleted_steps": [], "freed_bytes": 0}
    steps, latest = scan
    plan = plan_retention(steps, latest, keep_last=keep_last, pinned=pinned)
    for step in plan.keep:
        ctx.log(f"{stage}: keep global_step_{step}: {plan.why_kept.get(step, 'kept')}")
    deleted: list[int] = []
    freed = 0
    for step in plan.delete:
        folder = steps[step]
        if dry:
            ctx.log(f"{stage}: would delete {folder} (dry run)")
            continue
        try:
            freed += await asyncio.to_thread(_delete, folder, f"{_TRASH_PREFIX}{folder.name}-{ctx.attempt}")
        except OSError as exc:
            raise StageFailure(f"{stage}: could not delete {folder}: {exc}", failure_class="infra") from None
        deleted.append(step)
        ctx.log(f"{stage}: deleted {folder}")
    if not dry:
        for trash in await asyncio.to_thread(lambda: list(_leftover_trash(directory))):
            await asyncio.to_thread(shutil.rmtree, trash, True)
            ctx.log(f"{stage}: removed {trash.name} left by an interrupted clean-up")
    return {
        "stage": stage,
        "checkpoint_dir": str(directory),
        "latest_step": latest,
        "newest_complete_step": plan.newest_complete,
        "kept_steps": list(plan.keep),
        "incomplete_steps": list(plan.incomplete),
        "deleted_steps": deleted,
        "would_delete_steps": list(plan.delete) if dry else [],
        "freed_bytes": freed,
    }


async def run(ctx: AttemptContext) -> StageResult:
    params = ctx.params
    keep_last = params.get("keep_last", DEFAULT_KEEP_LAST)
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise StageFailure(f"`with.keep_last` must be an integer >= 0, got {keep_last!r}")
    pinned = _int_list(params.get("pinned"), "with.pinned")
    for outputs in ctx.inputs.values():
        pinned += _int_list(outputs.get("pinned_steps"), "pinned_steps (a dependency's output)")
    only = params.get("stage")
    if only is not None and (not isinstance(only, str) or only not in ctx.inputs):
        raise StageFailure(f"`with.stage` {only!r} is not one of this stage's dependencies ({sorted(ctx.inputs)})")
    dry = bool(params.get("dry_run", False))
    targets = checkpoint_dirs(ctx.inputs, only)
    if not targets:
        ctx.log("no dependency reported a checkpoint_dir: nothing to clean")
        return StageResult(outcome="succeeded", outputs={"cleaned": [], "deleted_steps": [], "freed_bytes": 0})
    cleaned: list[dict[str, Any]] = []
    for stage, directory in targets:
        cleaned.append(await _clean(ctx, stage, directory, keep_last=keep_last, pinned=pinned, dry=dry))
    return StageResult(
        outcome="succeeded",
        outputs={
            "cleaned": cleaned,
            "deleted_steps": sorted({s for c in cleaned for s in c["deleted_steps"]}),
            "freed_bytes": sum(int(c["freed_bytes"]) for c in cleaned),
            "dry_run": dry,
        },
    )

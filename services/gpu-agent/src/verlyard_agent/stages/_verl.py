"""Adapter: what the verl stage kinds (train, evaluate, export) share — launcher paths, checkpoint folders on disk."""

from __future__ import annotations

import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from verlyard_agent import checkpoints
from verlyard_agent.stages.base import AttemptContext, StageFailure
from verlyard_agent.trainer import TRACKER_FILE


def launcher_path(name: str) -> str:
    """A script under `verlyard_agent/launchers/` as a real file path (run by the trainer's Python).

    The folder has no `__init__.py` on purpose: the scripts import torch and verl, and must stay
    outside the agent's import graph (import-linter forbids those imports in `verlyard_agent`).
    """
    path = Path(str(resources.files("verlyard_agent").joinpath("launchers", name)))
    if not path.is_file():
        raise StageFailure(f"the agent's launcher {name} is missing at {path}", failure_class="infra")
    return str(path)


def trainer_python(ctx: AttemptContext) -> str:
    if not ctx.trainer_python:
        raise StageFailure(
            "VERLYARD_TRAINER_PYTHON is not set on this agent: it must name the Python that has verl and torch "
            "(scripts/trainer-env.sh builds one)",
            failure_class="infra",
        )
    return ctx.trainer_python


def listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def read_tracker(checkpoint_dir: Path) -> int | None:
    try:
        return checkpoints.parse_tracker((checkpoint_dir / TRACKER_FILE).read_bytes())
    except OSError:
        return None


def step_dir_complete(step_dir: Path) -> bool:
    actor = step_dir / "actor"
    if actor.is_dir():
        return checkpoints.is_complete(listdir(actor), has_actor_subdir=True)
    return checkpoints.is_complete(listdir(step_dir))


def latest_complete(checkpoint_dir: Path) -> tuple[int, Path] | None:
    """The checkpoint verl's tracker names, when its folder is complete (what `resume_mode=auto` loads)."""
    step = read_tracker(checkpoint_dir)
    if step is None:
        return None
    step_dir = checkpoint_dir / checkpoints.step_dir_name(step)
    return (step, step_dir) if step_dir_complete(step_dir) else None


def hf_weights_dir(step_dir: Path) -> Path | None:
    """`global_step_N/huggingface` when it holds weights (verl wrote it with save_contents hf_model)."""
    for candidate in (step_dir / "huggingface", step_dir / "actor" / "huggingface"):
        if checkpoints.has_hf_weights(listdir(candidate)):
            return candidate
    return None


def upstream(ctx: AttemptContext, key: str) -> tuple[str, Mapping[str, Any]] | None:
    """The first dependency (in `needs` order) whose outputs have `key`."""
    for dep in (*ctx.spec.needs, *(k for k in ctx.inputs if k not in ctx.spec.needs)):
        out = ctx.inputs.get(dep)
        if out and out.get(key) is not None:
            return dep, out
    return None


def checkpoint_to_use(ctx: AttemptContext) -> Path:
    """The checkpoint an evaluate/export stage works on: `with: checkpoint`, else the train dependency's last."""
    explicit = ctx.params.get("checkpoint")
    if isinstance(explicit, str) and explicit:
        path = Path(explicit)
    else:
        found = upstream(ctx, "checkpoint")
        if found is None:
            raise StageFailure(
                "no checkpoint to work on: add the train stage to `needs`, or set with.checkpoint to a "
                "global_step_N folder",
                failure_class="user",
            )
        path = Path(str(found[1]["checkpoint"]))
    if not path.is_dir():
        raise StageFailure(f"checkpoint folder {path} does not exist on this host", failure_class="user")
    return path

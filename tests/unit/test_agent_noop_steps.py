"""Unit: the `noop` kind's steps (the soak's fault-injectable stage): progress every step, a checkpoint
every `checkpoint_every` steps and at the end, and a retry resumes after the checkpoint it is handed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from verlyard_agent.stages import noop
from verlyard_agent.stages.base import StageFailure


class Ctx:
    def __init__(self, tmp: Path, params: dict[str, Any], resume: str | None = None) -> None:
        self.params = params
        self.stage_dir = tmp
        self.attempt = "att-1"
        self.resume_from_path = resume
        self.progressed: list[int] = []
        self.checkpoints: list[tuple[int, str]] = []
        self.lines: list[str] = []

    @property
    def cancelled(self) -> bool:
        return False

    def progress(self, step: int, total: int | None) -> None:
        self.progressed.append(step)

    def checkpoint(self, step: int, path: str) -> None:
        self.checkpoints.append((step, path))

    def log(self, text: str) -> None:
        self.lines.append(text)


def _read(path: str) -> str:
    return Path(path).read_text()


async def test_steps_report_progress_and_checkpoints(tmp_path: Path) -> None:
    ctx = Ctx(tmp_path, {"steps": 5, "step_ms": 0, "checkpoint_every": 2})
    result = await noop.run(ctx)  # type: ignore[arg-type]
    assert result.outcome == "succeeded" and result.outputs["resumed_from_step"] == 0
    assert ctx.progressed == [1, 2, 3, 4, 5]
    assert [s for s, _ in ctx.checkpoints] == [2, 4, 5]
    assert _read(ctx.checkpoints[-1][1]) == "att-1\n"


async def test_a_retry_resumes_after_its_checkpoint(tmp_path: Path) -> None:
    ctx = Ctx(tmp_path, {"steps": 5, "step_ms": 0}, resume=str(tmp_path / "noop-ckpt" / "step-3"))
    result = await noop.run(ctx)  # type: ignore[arg-type]
    assert result.outputs["resumed_from_step"] == 3
    assert ctx.progressed == [4, 5]
    assert ctx.lines == ["resuming after step 3"]


async def test_a_foreign_checkpoint_path_starts_from_the_beginning(tmp_path: Path) -> None:
    ctx = Ctx(tmp_path, {"steps": 2, "step_ms": 0}, resume="/ckpt/global_step_10")
    result = await noop.run(ctx)  # type: ignore[arg-type]
    assert result.outputs["resumed_from_step"] == 0 and ctx.progressed == [1, 2]


@pytest.mark.parametrize("params", [{"steps": -1}, {"steps": 1.5}, {"steps": True}, {"steps": 2, "step_ms": "x"}])
async def test_bad_step_parameters_fail_clearly(tmp_path: Path, params: dict[str, Any]) -> None:
    with pytest.raises(StageFailure, match="with"):
        await noop.run(Ctx(tmp_path, params))  # type: ignore[arg-type]

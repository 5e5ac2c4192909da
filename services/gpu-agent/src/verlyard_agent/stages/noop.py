"""Stage kind `noop`: does nothing, in-process (dry runs, benchmarks, tests, the soak).

`with: {sleep_ms: N}` sleeps N ms first; `fail: true` (optionally with `exit_code` and
`failure_class`) makes it fail, so retry and failure paths can be tested without a real workload.
`with: {steps: N, step_ms: M}` then "trains" N steps of M ms each without a GPU: it reports progress
every step and a checkpoint every `checkpoint_every` steps (default 1: a small file in the stage's
folder), and a retried attempt resumes after the checkpoint the scheduler hands it (the soak's
fault-injectable stage: an agent killed mid-stage must resume from its latest recorded checkpoint).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from verlyard_agent.stages.base import AttemptContext, StageFailure, StageResult


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise StageFailure(f"`with.{what}` must be a number >= 0, got {value!r}")
    return float(value)


def _count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StageFailure(f"`with.{what}` must be an integer >= 0, got {value!r}")
    return value


def _resume_step(path: str | None) -> int:
    """The step of a checkpoint this kind wrote (`.../noop-ckpt/step-<N>`); 0 for none or a foreign one."""
    if not path:
        return 0
    name = Path(path).name
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return 0


async def _steps(ctx: AttemptContext, steps: int, step_ms: float, every: int) -> int:
    """Run steps after the resumed one; returns the step it resumed from."""
    start = _resume_step(ctx.resume_from_path)
    folder = ctx.stage_dir / "noop-ckpt"
    folder.mkdir(parents=True, exist_ok=True)
    if start:
        ctx.log(f"resuming after step {start}")
    for step in range(start + 1, steps + 1):
        if ctx.cancelled:
            break
        await asyncio.sleep(step_ms / 1000)
        ctx.progress(step, steps)
        if every and (step % every == 0 or step == steps):
            path = folder / f"step-{step}"
            path.write_text(f"{ctx.attempt}\n")
            ctx.checkpoint(step, str(path))
    return start


async def run(ctx: AttemptContext) -> StageResult:
    sleep_ms = _number(ctx.params.get("sleep_ms", 0), "sleep_ms")
    if sleep_ms:
        await asyncio.sleep(sleep_ms / 1000)
    outputs: dict[str, object] = {"slept_ms": sleep_ms}
    steps = _count(ctx.params.get("steps", 0), "steps")
    if steps:
        step_ms = _number(ctx.params.get("step_ms", 100), "step_ms")
        every = _count(ctx.params.get("checkpoint_every", 1), "checkpoint_every")
        outputs["resumed_from_step"] = await _steps(ctx, steps, step_ms, every)
        outputs["steps"] = steps
    if ctx.params.get("fail"):
        exit_code = ctx.params.get("exit_code", 1)
        failure_class = ctx.params.get("failure_class")
        return StageResult(
            outcome="failed",
            exit_code=exit_code if isinstance(exit_code, int) else 1,
            failure_class=failure_class if isinstance(failure_class, str) else "user",
            reason=str(ctx.params.get("reason", "noop asked to fail")),
        )
    return StageResult(outcome="succeeded", outputs=outputs)

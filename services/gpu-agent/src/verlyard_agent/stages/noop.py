"""Stage kind `noop`: does nothing, in-process (dry runs, benchmarks, tests).

`with: {sleep_ms: N}` sleeps N ms first; `fail: true` (optionally with `exit_code` and
`failure_class`) makes it fail, so retry and failure paths can be tested without a real workload.
"""

from __future__ import annotations

import asyncio

from verlyard_agent.stages.base import AttemptContext, StageFailure, StageResult


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise StageFailure(f"`with.{what}` must be a number >= 0, got {value!r}")
    return float(value)


async def run(ctx: AttemptContext) -> StageResult:
    sleep_ms = _number(ctx.params.get("sleep_ms", 0), "sleep_ms")
    if sleep_ms:
        await asyncio.sleep(sleep_ms / 1000)
    if ctx.params.get("fail"):
        exit_code = ctx.params.get("exit_code", 1)
        failure_class = ctx.params.get("failure_class")
        return StageResult(
            outcome="failed",
            exit_code=exit_code if isinstance(exit_code, int) else 1,
            failure_class=failure_class if isinstance(failure_class, str) else "user",
            reason=str(ctx.params.get("reason", "noop asked to fail")),
        )
    return StageResult(outcome="succeeded", outputs={"slept_ms": sleep_ms})

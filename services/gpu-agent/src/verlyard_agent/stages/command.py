"""Stage kind `command`: `with: {run: [argv...], env: {NAME: value}}`, no shell, in the attempt's work folder.

Exit code 0 succeeds; anything else fails, and the runner classifies the failure from the exit code
and the log (oom, cuda, nccl, user ...). The child sees a minimal environment (childenv.py).
"""

from __future__ import annotations

from verlyard_agent.childenv import ArgvError, command_argv, command_env
from verlyard_agent.stages.base import AttemptContext, StageFailure, StageResult


async def run(ctx: AttemptContext) -> StageResult:
    try:
        argv = command_argv(ctx.params)
        env = command_env(ctx.params)
    except ArgvError as exc:
        raise StageFailure(str(exc), failure_class="user") from None
    code = await ctx.run_process(argv, env=env, cwd=ctx.work_dir)
    if code == 0:
        return StageResult(outcome="succeeded", exit_code=0, outputs={"exit_code": 0, "work_dir": str(ctx.work_dir)})
    # No failure class: the runner reads the log and the exit code (earliest cause wins).
    return StageResult(outcome="failed", exit_code=code)

"""Stage kind (adapter): `export` — verl's model merger turns a training checkpoint into a Hugging Face folder.

    <trainer python> -m verl.model_merger merge --backend fsdp --local_dir <ckpt>/global_step_N
                     --target_dir <pipeline_dir>/export/<stage>

The checkpoint is `with: checkpoint` or the train dependency's last complete one (RL checkpoints are
merged from their `actor/` folder). Outputs: `{"hf_dir", "checkpoint", "step"}`.
"""

from __future__ import annotations

import shutil

from verlyard_agent import checkpoints
from verlyard_agent.stages import _verl
from verlyard_agent.stages.base import AttemptContext, StageFailure, StageResult
from verlyard_agent.trainer import build_export_argv, merger_source, step_of_checkpoint


async def run(ctx: AttemptContext) -> StageResult:
    python = _verl.trainer_python(ctx)
    step_dir = _verl.checkpoint_to_use(ctx)
    if not _verl.step_dir_complete(step_dir):
        raise StageFailure(f"checkpoint {step_dir} is incomplete: nothing to export", failure_class="user")
    target = ctx.pipeline_dir / "export" / ctx.stage
    if target.exists():
        shutil.rmtree(target)  # an earlier attempt's partial export must not mix with this one
    target.parent.mkdir(parents=True, exist_ok=True)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    source = merger_source(str(step_dir), has_actor_subdir=(step_dir / "actor").is_dir())
    argv = build_export_argv(python, source, str(target))
    ctx.log("export: " + " ".join(argv))
    code = await ctx.run_process(
        argv, env={"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}, cwd=ctx.work_dir
    )
    outputs = {"hf_dir": str(target), "checkpoint": str(step_dir), "step": step_of_checkpoint(str(step_dir))}
    if ctx.cancelled:
        return StageResult(outcome="cancelled", exit_code=code, reason="cancelled")
    if code != 0:
        return StageResult(
            outcome="failed", failure_class=None, exit_code=code, reason=f"the model merger exited with code {code}"
        )
    if not checkpoints.has_hf_weights(_verl.listdir(target)):
        raise StageFailure(f"the model merger exited 0 but {target} holds no weights", failure_class="unknown")
    return StageResult(outcome="succeeded", exit_code=0, outputs=outputs)

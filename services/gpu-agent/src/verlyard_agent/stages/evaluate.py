"""Stage kind (adapter): `evaluate` — validation loss/perplexity and exact-match of a trained model.

Runs `launchers/evaluate.py` in the trainer's Python on the Hugging Face weights of the model:
`with: model` (an HF folder), else an upstream `hf_dir` (an export stage, or a train stage that saved
HF weights), else the train dependency's last checkpoint merged first with verl's model merger into
this attempt's folder. The validation split is `with: val_files` or the upstream `val_files`.
Reports `eval/val_loss`, `eval/perplexity`, `eval/exact_match`, `eval/contains_answer` at the
training's last step; outputs the same numbers (plus samples, generated, examples, model_dir).
`with:` also takes max_length, batch_size, max_samples, generate, max_new_tokens.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from verlyard_agent import checkpoints
from verlyard_agent.stages import _verl
from verlyard_agent.stages.base import AttemptContext, StageFailure, StageResult
from verlyard_agent.trainer import TrainConfigError, build_evaluate_argv, build_export_argv, merger_source

_ENV = {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
_METRICS = ("val_loss", "perplexity", "exact_match", "contains_answer")


def _int_param(ctx: AttemptContext, key: str, default: int) -> int:
    value = ctx.params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StageFailure(f"with.{key} must be a non-negative integer, not {value!r}", failure_class="user")
    return value


def _val_files(ctx: AttemptContext) -> list[str]:
    raw = ctx.params.get("val_files")
    if raw is None and (found := _verl.upstream(ctx, "val_files")) is not None:
        raw = found[1]["val_files"]
    files = [raw] if isinstance(raw, str) else list(raw or [])
    if not files or not all(isinstance(f, str) for f in files):
        raise StageFailure(
            "no validation split: the upstream stages report no val_files (set with.val_files)", failure_class="user"
        )
    return files


async def _model_dir(ctx: AttemptContext, python: str) -> tuple[str | None, Path | None]:
    """(an HF folder to load, None) or (None, a failure already reported as a result)."""
    explicit = ctx.params.get("model")
    if isinstance(explicit, str) and explicit:
        return explicit, None
    if (found := _verl.upstream(ctx, "hf_dir")) is not None:
        return str(found[1]["hf_dir"]), None
    step_dir = _verl.checkpoint_to_use(ctx)
    if (hf := _verl.hf_weights_dir(step_dir)) is not None:
        return str(hf), None
    target = ctx.work_dir / "hf"
    argv = build_export_argv(
        python, merger_source(str(step_dir), has_actor_subdir=(step_dir / "actor").is_dir()), str(target)
    )
    ctx.log("evaluate: merging the checkpoint first: " + " ".join(argv))
    code = await ctx.run_process(argv, env=_ENV, cwd=ctx.work_dir)
    if code != 0 or not checkpoints.has_hf_weights(_verl.listdir(target)):
        return None, target
    return str(target), None


async def run(ctx: AttemptContext) -> StageResult:
    python = _verl.trainer_python(ctx)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    val_files = _val_files(ctx)
    model_dir, failed_merge = await _model_dir(ctx, python)
    if ctx.cancelled:
        return StageResult(outcome="cancelled", reason="cancelled")
    if model_dir is None:
        return StageResult(
            outcome="failed", failure_class=None, reason=f"the model merger did not produce {failed_merge}"
        )
    out_file = ctx.work_dir / "eval.json"
    out_file.unlink(missing_ok=True)
    try:
        argv = build_evaluate_argv(
            python,
            _verl.launcher_path("evaluate.py"),
            model_dir=model_dir,
            val_files=val_files,
            out_file=str(out_file),
            max_length=_int_param(ctx, "max_length", 1024),
            batch_size=_int_param(ctx, "batch_size", 8) or 1,
            max_samples=_int_param(ctx, "max_samples", 256) or 1,
            generate=_int_param(ctx, "generate", 16),
            max_new_tokens=_int_param(ctx, "max_new_tokens", 64) or 1,
            device="cuda" if ctx.gpus else "cpu",
        )
    except TrainConfigError as exc:
        raise StageFailure(str(exc), failure_class="user") from None
    code = await ctx.run_process(argv, env=_ENV, cwd=ctx.work_dir)
    if ctx.cancelled:
        return StageResult(outcome="cancelled", exit_code=code, reason="cancelled")
    if code != 0:
        return StageResult(
            outcome="failed", failure_class=None, exit_code=code, reason=f"evaluation exited with code {code}"
        )
    try:
        result: dict[str, Any] = json.loads(out_file.read_text())
    except (OSError, ValueError) as exc:
        raise StageFailure(f"evaluation wrote no readable result: {exc}", failure_class="unknown") from None
    step = 0
    if (found := _verl.upstream(ctx, "last_step")) is not None and isinstance(found[1]["last_step"], int):
        step = found[1]["last_step"]
    values = {
        f"eval/{key}": float(result[key])
        for key in _METRICS
        if isinstance(result.get(key), int | float) and math.isfinite(float(result[key]))
    }
    if values:
        ctx.metrics(step, values)
    return StageResult(outcome="succeeded", exit_code=0, outputs={**result, "model_dir": model_dir, "step": step})

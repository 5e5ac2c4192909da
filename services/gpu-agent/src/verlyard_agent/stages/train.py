"""Stage kind (adapter): `train` — a verl run (SFT or RL) in the trainer's Python, watched through its files.

While verl runs, a 50 ms poll
- tails `<work_dir>/metrics.jsonl` (verl's file logger, opened `wb` per attempt) and reports each record
  with `ctx.metrics(step, values)` and each new step with `ctx.progress(step, total)`; when the file never
  appears it falls back to verl's console lines in the attempt's log (`<work_dir>/attempt.log`);
- watches `<checkpoints>/latest_checkpointed_iteration.txt` and reports `ctx.checkpoint(step, path)` once
  the folder it names is complete (every rank's shard written), never before.
After a clean exit the resume guard (`metrics.StepLedger`) checks that the first step was N+1 after a
resume from N and that the last step reached the expected total; otherwise the stage fails with the
class `resume` (mis-resumed / under-trained), although verl exited 0 (verl #7401).
Outputs: checkpoint_dir, checkpoint (the last complete global_step_N), last_step, hf_dir (when the
checkpoint holds HF weights), metrics_file, total_steps, resumed_from_step, train_files, val_files.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path
from typing import Any

from verlyard_agent import checkpoints
from verlyard_agent.metrics import LineBuffer, StepLedger, StepMetrics, parse_console_line, parse_record
from verlyard_agent.stages import _verl
from verlyard_agent.stages.base import AttemptContext, StageFailure, StageResult
from verlyard_agent.trainer import PPO_ENTRY, TRACKER_FILE, Facts, TrainConfigError, TrainPlan, build_train_plan

POLL_S = 0.02
"""How often the metrics and tracker files are looked at (the bar is 100 ms from verl's write to the
live stream, bench L1; a stat and a short read each time)."""


class _Tail:
    """Reads what was appended to a file since the last call; starts over if the file was truncated."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.buffer = LineBuffer()
        self.seen = False

    def read(self) -> list[bytes]:
        try:
            size = os.stat(self.path).st_size
        except FileNotFoundError:
            return []
        self.seen = True
        if size < self.offset:  # truncated (a writer reopened it with "wb")
            self.offset = 0
            self.buffer.reset()
        if size == self.offset:
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            chunk = fh.read(size - self.offset)
        self.offset += len(chunk)
        return self.buffer.feed(chunk)


class Watcher:
    """Turns verl's files into context calls. One per attempt; `poll()` is cheap and idempotent."""

    def __init__(self, ctx: AttemptContext, plan: TrainPlan, resume_step: int) -> None:
        self.ctx = ctx
        self.plan = plan
        self.ledger = StepLedger(resume_step=resume_step, expected_total=plan.expected_total_steps)
        self.metrics = _Tail(Path(plan.metrics_file))
        # The runner's full attempt log (layout.py: <work_dir>/attempt.log), for the console fallback.
        log_file = getattr(ctx, "log_file", None) or ctx.work_dir / "attempt.log"
        self.console = _Tail(Path(log_file))
        self.checkpoint_dir = Path(plan.checkpoint_dir)
        self.tracker = self.checkpoint_dir / TRACKER_FILE
        self._tracker_sig = self._signature()
        self._pending_step: int | None = None
        self.reported: list[tuple[int, str]] = []
        self.first_step_at: float | None = None
        self.last_step_at: float | None = None
        self._warned_resume = False

    def _signature(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.tracker)
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_ino)

    def poll(self, *, final: bool = False) -> None:
        lines = self.metrics.read()
        if final:
            lines += self.metrics.buffer.flush()
        for line in lines:
            self._record(parse_record(line))
        if not self.metrics.seen:
            for line in self.console.read():
                self._record(parse_console_line(line.decode(errors="replace")))
        self._check_tracker()

    def _record(self, record: StepMetrics | None) -> None:
        if record is None:
            return
        if record.values:
            self.ctx.metrics(record.step, record.values)
        if record.dropped:
            self.ctx.log(f"step {record.step}: not finite: {', '.join(record.dropped)}")
        if self.ledger.observe(record.step):
            now = time.monotonic()
            self.first_step_at = self.first_step_at or now
            self.last_step_at = now
            self.ctx.progress(record.step, self.plan.expected_total_steps)
            if not self._warned_resume and (reason := self.ledger.mis_resumed()) is not None:
                self._warned_resume = True
                self.ctx.log(f"resume guard: {reason}")

    def _check_tracker(self) -> None:
        sig = self._signature()
        if sig != self._tracker_sig:
            self._tracker_sig = sig
            self._pending_step = _verl.read_tracker(self.checkpoint_dir)
        if self._pending_step is None:
            return
        step_dir = self.checkpoint_dir / checkpoints.step_dir_name(self._pending_step)
        if _verl.step_dir_complete(step_dir):
            self.reported.append((self._pending_step, str(step_dir)))
            self.ctx.checkpoint(self._pending_step, str(step_dir))
            self._pending_step = None

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.poll()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_S)
        self.poll(final=True)


def _facts(ctx: AttemptContext, python: str) -> Facts:
    return Facts(
        trainer_python=python,
        work_dir=ctx.work_dir,
        stage_dir=ctx.stage_dir,
        gpus=tuple(ctx.gpus),
        inputs=ctx.inputs,
        needs=tuple(ctx.spec.needs),
        resume_from_path=ctx.resume_from_path,
        cpu_launcher=_verl.launcher_path("verl_cpu_sft.py") if not ctx.gpus else None,
        project=ctx.pipeline_name or "verlyard",
        experiment=f"{ctx.stage}-{ctx.attempt_number}",
    )


def _outputs(plan: TrainPlan, watcher: Watcher | None, resume_step: int, started: float) -> dict[str, Any]:
    checkpoint_dir = Path(plan.checkpoint_dir)
    latest = _verl.latest_complete(checkpoint_dir)
    out: dict[str, Any] = {
        "algorithm": plan.algorithm,
        "checkpoint_dir": str(checkpoint_dir),
        "checkpoint": str(latest[1]) if latest else None,
        "checkpoint_step": latest[0] if latest else None,
        "last_step": resume_step,
        "metrics_file": plan.metrics_file,
        "total_steps": plan.expected_total_steps,
        "resumed_from_step": resume_step or None,
        "train_files": list(plan.train_files),
        "val_files": list(plan.val_files),
        "seconds": round(time.monotonic() - started, 3),
    }
    if watcher is not None:
        ledger = watcher.ledger
        out["last_step"] = ledger.last_step if ledger.last_step is not None else resume_step
        out["steps_run"] = ledger.steps
        if watcher.first_step_at is not None and watcher.last_step_at is not None:
            # verl's own "Total time for train steps" is always 0 (verl.md): time the steps here.
            out["train_seconds"] = round(watcher.last_step_at - watcher.first_step_at, 3)
    if latest is not None and (hf := _verl.hf_weights_dir(latest[1])) is not None:
        out["hf_dir"] = str(hf)
    return out


def _prepare(ctx: AttemptContext, plan: TrainPlan) -> int:
    """Create the folders and decide the step this attempt resumes from (0: a fresh start)."""
    checkpoint_dir = Path(plan.checkpoint_dir)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    if plan.resume_from_path is not None:
        if not _verl.step_dir_complete(Path(plan.resume_from_path)):
            raise StageFailure(
                f"cannot resume: checkpoint {plan.resume_from_path} is missing or incomplete on this host",
                failure_class="resume",
            )
        return plan.resume_step or 0
    # resume_mode=auto: verl loads what its tracker names, if that folder exists.
    latest = _verl.latest_complete(checkpoint_dir)
    tracked = _verl.read_tracker(checkpoint_dir)
    if tracked is not None and latest is None:
        raise StageFailure(
            f"the checkpoint folder names step {tracked} but global_step_{tracked} is incomplete: verl would "
            "resume from a partial checkpoint",
            failure_class="resume",
        )
    return latest[0] if latest else 0


async def run(ctx: AttemptContext) -> StageResult:
    started = time.monotonic()
    python = _verl.trainer_python(ctx)
    try:
        plan = build_train_plan(ctx.params, _facts(ctx, python))
    except TrainConfigError as exc:
        raise StageFailure(str(exc), failure_class="user") from None
    if plan.entry == PPO_ENTRY and plan.mode == "cpu":
        raise StageFailure(
            f"{plan.algorithm} training needs GPUs: verl 0.9.1 rollouts run on vllm/sglang/trtllm only; "
            "give the stage resources.gpus",
            failure_class="user",
        )
    for warning in plan.warnings:
        ctx.log(warning)

    resume_step = _prepare(ctx, plan)
    if resume_step:
        ctx.log(f"resuming from the checkpoint of step {resume_step} ({plan.resume_mode})")

    total = plan.expected_total_steps
    if total is not None and resume_step >= total:
        # The last attempt finished training (its final checkpoint exists) but did not report it.
        ctx.log(f"step {resume_step} already reaches the {total} steps asked for: nothing left to train")
        ctx.progress(resume_step, total)
        return StageResult(outcome="succeeded", exit_code=0, outputs=_outputs(plan, None, resume_step, started))

    ctx.log("verl: " + " ".join(plan.argv))
    watcher = Watcher(ctx, plan, resume_step)
    stop = asyncio.Event()
    watching = asyncio.create_task(watcher.run(stop))
    try:
        code = await ctx.run_process(plan.argv, env=plan.env, cwd=ctx.work_dir)
    finally:
        stop.set()
        await watching
    outputs = _outputs(plan, watcher, resume_step, started)

    if ctx.cancelled:
        return StageResult(outcome="cancelled", exit_code=code, reason="cancelled", outputs=outputs)
    if code != 0:
        mis = watcher.ledger.mis_resumed()
        return StageResult(
            outcome="failed",
            # None: the runner's log classifier names the cause (oom, nccl, user code...).
            failure_class="resume" if mis else None,
            exit_code=code,
            reason=mis or f"verl exited with code {code} at step {outputs['last_step']}",
            outputs=outputs,
        )
    final = _verl.latest_complete(Path(plan.checkpoint_dir))
    reason = watcher.ledger.verdict(
        final_checkpoint_step=final[0] if final else None, expect_final_checkpoint=plan.final_checkpoint
    )
    if reason is not None:
        raise StageFailure(reason, failure_class="resume", exit_code=0)
    return StageResult(outcome="succeeded", exit_code=0, outputs=outputs)

"""Port: what a stage kind sees of the agent while one attempt runs, and what it returns.

The agent (verlyard_agent.attempts / runner) implements `AttemptContext`; each stage kind in
`verlyard_agent.stages.<kind>` implements `async def run(ctx: AttemptContext) -> StageResult`.
Kinds never talk to NATS themselves: they call the context, which batches, journals and publishes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import msgspec

from verlyard_shared.spec import StageSpec

Outcome = Literal["succeeded", "failed", "cancelled"]


class StageResult(msgspec.Struct, frozen=True, kw_only=True):
    """How an attempt ended. `outputs` is what downstream stages receive as `ctx.inputs[<stage>]`."""

    outcome: Outcome
    failure_class: str | None = None
    """One of spec.FailureClass when outcome is failed (oom, nccl, cuda, hang, user, timeout, ...)."""
    reason: str = ""
    exit_code: int | None = None
    outputs: dict[str, Any] = {}


class StageFailure(Exception):
    """Raised by a stage kind for a clear, classified failure (the runner turns it into a StageResult)."""

    def __init__(self, reason: str, *, failure_class: str = "user", exit_code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failure_class = failure_class
        self.exit_code = exit_code


class AttemptContext(Protocol):
    pipeline_id: str
    pipeline_name: str
    stage: str
    attempt: str
    attempt_number: int
    spec: StageSpec
    params: Mapping[str, Any]
    """The stage's `with:` block."""
    inputs: Mapping[str, Mapping[str, Any]]
    """Outputs of the stage's dependencies, by stage name (dataset files, checkpoint dir, HF dir...)."""
    work_dir: Path
    """This attempt's own folder (logs, metrics file); never shared with another attempt."""
    stage_dir: Path
    """The stage's folder, shared by its attempts (checkpoints live here so a retry can resume)."""
    pipeline_dir: Path
    """The pipeline's folder on this host (stages write their outputs under it)."""
    gpus: tuple[int, ...]
    resume_from_path: str | None
    trainer_python: str | None
    """VERLYARD_TRAINER_PYTHON: the interpreter that has verl and torch (None: not configured)."""
    datasets_dir: Path
    """Where pushed datasets are cached on this host, content-addressed."""

    async def run_process(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> int:
        """Run a child in its own process group (CUDA_VISIBLE_DEVICES set from `gpus`), stream its
        stdout/stderr as log lines, stop it on cancel (SIGTERM to the group, grace, SIGKILL); return its
        exit code. Only one child at a time per attempt."""
        ...

    def log(self, text: str) -> None:
        """One line from the agent itself into the attempt's log."""
        ...

    async def fetch_dataset(self, name: str) -> Path | None:
        """Bring pushed dataset `name` into `datasets_dir` from the object store (None: this host has
        no object store to ask); raises StageFailure when it cannot be had."""
        ...

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        """Metric values of one step (published in batches, keyed by pipeline/stage/attempt/step/key)."""
        ...

    def progress(self, step: int, total_steps: int | None) -> None:
        """Training progress (feeds the watchdog and sparse progress reports)."""
        ...

    def checkpoint(self, step: int, path: str) -> None:
        """A complete checkpoint was written (reported as checkpoint.saved)."""
        ...

    @property
    def cancelled(self) -> bool:
        """True once a cancel for this attempt arrived."""
        ...

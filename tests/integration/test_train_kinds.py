"""Integration: the train, export and evaluate stage kinds driving real verl 0.9.1 on this CPU host.

Each kind's `run(ctx)` is called directly with `LocalContext`, a minimal in-test AttemptContext: a real
child in its own process group (killed as a group at the end), a log file, and recorded calls. The
tiny Qwen2 model and dataset are built locally (tests/plugins/trainer.py). Skipped only when the
trainer environment cannot be built.
- one SFT run of 10 steps: loss falls, metrics for every step, checkpoints 5 and 10 reported only once
  complete, outputs; then export (HF folder loads with transformers and generates) and evaluate
  (finite val loss) on its checkpoint;
- a run killed (SIGKILL to its group) right after its first checkpoint, then a retry with
  resume_from_path: its first step is N+1, it reaches the total, the guard passes;
- the metrics tail reports a line within 100 ms of it being written (a writer standing in for verl).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.plugins.trainer import OFFLINE_ENV, TRAINER_ENV_TIMEOUT_S, TinyAssets
from verlyard_agent.stages import _verl, evaluate, export, train
from verlyard_agent.stages.base import StageFailure, StageResult
from verlyard_agent.trainer import Facts, build_train_plan
from verlyard_shared.spec import StageSpec

pytestmark = pytest.mark.timeout(TRAINER_ENV_TIMEOUT_S)
MARKER = "VERLYARD_TEST_ATTEMPT"


@dataclass
class LocalContext:
    """Test scaffolding for AttemptContext (the agent's real runner lives in verlyard_agent.runner)."""

    pipeline_dir: Path
    stage: str
    spec: StageSpec
    inputs: Mapping[str, Mapping[str, Any]]
    trainer_python: str | None
    attempt_number: int = 1
    resume_from_path: str | None = None
    gpus: tuple[int, ...] = ()
    pipeline_id: str = "p1"
    pipeline_name: str = "itest"
    kill_after_checkpoint: bool = False
    logs: list[str] = field(default_factory=list[str])
    metric_calls: list[tuple[float, int, dict[str, float]]] = field(default_factory=list)
    progress_calls: list[tuple[int, int | None]] = field(default_factory=list)
    checkpoints: list[tuple[int, str, bool]] = field(default_factory=list)
    """(step, path, whether the folder was complete when reported)."""
    _pgid: int | None = None
    attempt: str = field(init=False)
    params: Mapping[str, Any] = field(init=False)
    stage_dir: Path = field(init=False)
    work_dir: Path = field(init=False)
    datasets_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.attempt = f"{self.stage}-a{self.attempt_number}"
        self.params = self.spec.params
        self.stage_dir = self.pipeline_dir / self.stage
        self.work_dir = self.stage_dir / "attempts" / self.attempt
        self.datasets_dir = self.pipeline_dir / "datasets"

    @property
    def cancelled(self) -> bool:
        return False

    async def run_process(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> int:
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("VERLYARD_")}
        child_env.update(OFFLINE_ENV)
        child_env.update(env or {})
        child_env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, self.gpus))
        child_env[MARKER] = self.marker
        self.work_dir.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=child_env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        self._pgid = proc.pid
        assert proc.stdout is not None
        try:
            with (self.work_dir / "attempt.log").open("a", encoding="utf-8", buffering=1) as log:
                async for raw in proc.stdout:
                    line = raw.decode(errors="replace").rstrip("\n")
                    log.write(line + "\n")
                    self.logs.append(line)
            return await proc.wait()
        finally:
            self._kill_group()
            self._pgid = None

    def _kill_group(self) -> None:
        """SIGKILL the child and everything it started. torchrun starts each worker in a session of
        its own (torch.distributed.elastic), so killing the child's group alone would orphan them:
        find them by the marker in their environment."""
        if self._pgid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._pgid, signal.SIGKILL)
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.environ().get(MARKER) == self.marker:
                    proc.kill()

    @property
    def marker(self) -> str:
        return f"{self.pipeline_dir}:{self.attempt}"

    def log(self, text: str) -> None:
        self.logs.append("[verlyard] " + text)

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        self.metric_calls.append((time.monotonic(), step, dict(values)))

    def progress(self, step: int, total_steps: int | None) -> None:
        self.progress_calls.append((step, total_steps))

    def checkpoint(self, step: int, path: str) -> None:
        self.checkpoints.append((step, path, _verl.step_dir_complete(Path(path))))
        if self.kill_after_checkpoint:
            self._kill_group()  # an agent or host dying mid-run, right after a checkpoint

    def values_of(self, key: str) -> dict[int, float]:
        return {step: values[key] for _, step, values in self.metric_calls if key in values}


def train_spec(assets: TinyAssets, **params: Any) -> StageSpec:
    base: dict[str, Any] = {
        "algorithm": "sft",
        "model": str(assets.model),
        "batch_size": 16,
        "lr": 1e-3,
        "max_length": 64,
        "overrides": {"trainer.total_training_steps": 10},
    }
    base.update(params)
    return StageSpec(kind="train", needs=("prep",), params=base)


def run_kind(kind: Any, ctx: LocalContext) -> StageResult:
    """Run a kind the way the runner does: a StageFailure becomes a failed result."""
    try:
        return asyncio.run(kind.run(ctx))
    except StageFailure as exc:
        return StageResult(
            outcome="failed", failure_class=exc.failure_class, reason=exc.reason, exit_code=exc.exit_code
        )


@dataclass
class SftRun:
    ctx: LocalContext
    result: StageResult
    seconds: float


@pytest.fixture(scope="module")
def sft_run(trainer_python: str, tiny_assets: TinyAssets, tmp_path_factory: pytest.TempPathFactory) -> SftRun:
    ctx = LocalContext(
        pipeline_dir=tmp_path_factory.mktemp("pipeline"),
        stage="train",
        spec=train_spec(tiny_assets, save_every=5),
        inputs={"prep": tiny_assets.preprocess_outputs()},
        trainer_python=trainer_python,
    )
    started = time.monotonic()
    result = run_kind(train, ctx)
    return SftRun(ctx=ctx, result=result, seconds=time.monotonic() - started)


def test_sft_trains_reports_every_step_and_complete_checkpoints(sft_run: SftRun) -> None:
    ctx, result = sft_run.ctx, sft_run.result
    assert result.outcome == "succeeded", (result, ctx.logs[-40:])
    loss = ctx.values_of("train/loss")
    assert sorted(loss) == list(range(1, 11)), "a metric record for every step"
    assert loss[10] < loss[1] - 0.5, loss
    assert math.isfinite(ctx.values_of("val/loss")[10])
    assert [step for step, _ in ctx.progress_calls] == list(range(1, 11))
    assert all(total == 10 for _, total in ctx.progress_calls)
    assert [(step, complete) for step, _, complete in ctx.checkpoints] == [(5, True), (10, True)]
    checkpoint_dir = ctx.stage_dir / "checkpoints"
    assert ctx.checkpoints[-1][1] == str(checkpoint_dir / "global_step_10")
    out = result.outputs
    assert out["checkpoint_dir"] == str(checkpoint_dir)
    assert out["checkpoint"] == str(checkpoint_dir / "global_step_10")
    assert out["last_step"] == 10 and out["total_steps"] == 10 and out["steps_run"] == 10
    assert out["metrics_file"] == str(ctx.work_dir / "metrics.jsonl")
    assert out["resumed_from_step"] is None
    assert "hf_dir" not in out  # no hf_model in save_contents: export or evaluate merges
    assert out["val_files"] == [str(Path(f)) for f in ctx.inputs["prep"]["val_files"]]
    print(
        f"\nSFT 10 steps: {sft_run.seconds:.1f}s wall, steps {out['train_seconds']:.1f}s, "
        f"loss {loss[1]:.3f} -> {loss[10]:.3f}"
    )


def test_a_killed_run_resumes_from_its_checkpoint_at_the_next_step(
    trainer_python: str, tiny_assets: TinyAssets, tmp_path: Path
) -> None:
    spec = train_spec(tiny_assets, save_every=3, overrides={"trainer.total_training_steps": 8})
    first = LocalContext(
        pipeline_dir=tmp_path,
        stage="train",
        spec=spec,
        inputs={"prep": tiny_assets.preprocess_outputs()},
        trainer_python=trainer_python,
        kill_after_checkpoint=True,
    )
    killed = run_kind(train, first)
    assert killed.outcome == "failed" and killed.exit_code != 0, killed
    step, path, complete = first.checkpoints[0]
    assert (step, complete) == (3, True)
    assert max(first.values_of("train/loss")) <= 4, "killed right after the step-3 checkpoint"

    retry = LocalContext(
        pipeline_dir=tmp_path,
        stage="train",
        spec=spec,
        inputs={"prep": tiny_assets.preprocess_outputs()},
        trainer_python=trainer_python,
        attempt_number=2,
        resume_from_path=path,
    )
    result = run_kind(train, retry)
    assert result.outcome == "succeeded", (result, retry.logs[-40:])
    loss = retry.values_of("train/loss")
    assert min(loss) == 4, "the first step after resuming from step 3 is step 4"
    assert max(loss) == 8
    assert result.outputs["resumed_from_step"] == 3 and result.outputs["last_step"] == 8
    assert [s for s, _, _ in retry.checkpoints] == [6, 8]
    # The same curve continues: the resumed model is already better than the fresh one at step 1.
    assert loss[4] < first.values_of("train/loss")[1]
    assert retry.work_dir != first.work_dir and (first.work_dir / "metrics.jsonl").exists()


def test_export_makes_a_hugging_face_folder_that_loads_and_generates(sft_run: SftRun, trainer_python: str) -> None:
    assert sft_run.result.outcome == "succeeded"
    ctx = LocalContext(
        pipeline_dir=sft_run.ctx.pipeline_dir,
        stage="export",
        spec=StageSpec(kind="export", needs=("train",)),
        inputs={"train": sft_run.result.outputs},
        trainer_python=trainer_python,
    )
    started = time.monotonic()
    result = run_kind(export, ctx)
    merge_s = time.monotonic() - started
    assert result.outcome == "succeeded", (result, ctx.logs[-30:])
    hf_dir = Path(result.outputs["hf_dir"])
    assert hf_dir == sft_run.ctx.pipeline_dir / "export" / "export"
    assert result.outputs["step"] == 10
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "tok = AutoTokenizer.from_pretrained(sys.argv[2])\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'What is 2 plus 3?'}],"
        " add_generation_prompt=True, return_tensors='pt', return_dict=True)['input_ids']\n"
        "out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,"
        " pad_token_id=tok.pad_token_id)\n"
        "print('GENERATED', out.shape[1] - ids.shape[1], repr(tok.decode(out[0, ids.shape[1]:])))\n"
    )
    done = subprocess.run(
        [trainer_python, "-c", script, str(hf_dir), str(hf_dir)],  # the folder is self-contained
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, **OFFLINE_ENV},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    generated = next(line for line in done.stdout.splitlines() if line.startswith("GENERATED"))
    assert int(generated.split()[1]) > 0
    print(f"\nexport (model merger): {merge_s:.1f}s; {generated}")


def test_evaluate_reports_a_finite_validation_loss(sft_run: SftRun, trainer_python: str) -> None:
    assert sft_run.result.outcome == "succeeded"
    ctx = LocalContext(
        pipeline_dir=sft_run.ctx.pipeline_dir,
        stage="eval",
        spec=StageSpec(kind="evaluate", needs=("train",), params={"generate": 4, "max_new_tokens": 12}),
        inputs={"train": sft_run.result.outputs},
        trainer_python=trainer_python,
    )
    started = time.monotonic()
    result = run_kind(evaluate, ctx)
    assert result.outcome == "succeeded", (result, ctx.logs[-30:])
    out = result.outputs
    assert math.isfinite(out["val_loss"]) and out["perplexity"] == pytest.approx(math.exp(out["val_loss"]))
    assert out["samples"] == 32 and out["generated"] == 4
    assert 0.0 <= out["exact_match"] <= 1.0
    assert out["step"] == 10
    [(_, step, values)] = ctx.metric_calls
    assert step == 10 and values["eval/val_loss"] == pytest.approx(out["val_loss"])
    # The trained model beats the untrained one it started from (loss ~ln(vocab) ~ 6.9).
    assert out["val_loss"] < 6.0
    print(f"\nevaluate: {time.monotonic() - started:.1f}s, val_loss {out['val_loss']:.3f}")


# ---- the metrics tail, against a stand-in writer ----------------------------------------------------


@contextlib.contextmanager
def _writer(path: Path, stamps: dict[int, float]) -> Iterator[threading.Thread]:
    """Writes verl-like records (unbuffered, "wb"), 30 ms apart, noting when each was written."""

    def write() -> None:
        with open(path, "wb", buffering=0) as fh:
            for step in range(1, 21):
                time.sleep(0.03)
                stamps[step] = time.monotonic()
                fh.write(json.dumps({"step": step, "data": {"train/loss": 1.0 / step}}).encode() + b"\n")

    thread = threading.Thread(target=write)
    thread.start()
    try:
        yield thread
    finally:
        thread.join()


def test_the_metrics_tail_reports_each_line_within_100ms(tmp_path: Path) -> None:
    ctx = LocalContext(
        pipeline_dir=tmp_path,
        stage="train",
        spec=StageSpec(kind="train", params={"model": "/m", "train_files": "/d/t.parquet"}),
        inputs={},
        trainer_python="/py",
    )
    plan = build_train_plan(
        ctx.params,
        Facts(trainer_python="/py", work_dir=ctx.work_dir, stage_dir=ctx.stage_dir, cpu_launcher="/l.py"),
    )
    ctx.work_dir.mkdir(parents=True)
    watcher = train.Watcher(ctx, plan, resume_step=0)
    stamps: dict[int, float] = {}

    async def main() -> None:
        stop = asyncio.Event()
        watching = asyncio.create_task(watcher.run(stop))
        with _writer(Path(plan.metrics_file), stamps) as thread:
            while thread.is_alive():
                await asyncio.sleep(0.01)
        stop.set()
        await watching

    asyncio.run(main())
    reported = {step: at for at, step, _ in ctx.metric_calls}
    assert sorted(reported) == list(range(1, 21))
    delays = sorted(reported[s] - stamps[s] for s in stamps)
    print(f"\nmetrics tail: median {delays[10] * 1000:.0f} ms, max {delays[-1] * 1000:.0f} ms from write to report")
    assert delays[-1] < 0.1, delays


# ---- the watcher and the resume guard, against a stand-in for verl -----------------------------------

FAKE_VERL = r"""#!/usr/bin/env python3
# Stands in for `python -m torch.distributed.run ... verl`: logs steps FIRST..LAST (env), saves the last.
import json, os, sys
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a and not a.startswith("-"))
ckpt = args["trainer.default_local_dir"].strip("'")
first, last = int(os.environ["FAKE_FIRST"]), int(os.environ["FAKE_LAST"])
with open(os.environ["VERL_FILE_LOGGER_PATH"], "wb", buffering=0) as fh:
    for step in range(first, last + 1):
        fh.write(json.dumps({"step": step, "data": {"train/loss": 1.0 / step}}).encode() + b"\n")
step_dir = os.path.join(ckpt, f"global_step_{last}")
os.makedirs(step_dir, exist_ok=True)
for name in ("model_world_size_1_rank_0.pt", "data_0.pt"):
    open(os.path.join(step_dir, name), "w").close()
with open(os.path.join(ckpt, "latest_checkpointed_iteration.txt"), "w") as fh:
    fh.write(str(last))
"""


def _fake_verl(tmp_path: Path, *, resume_at: int | None) -> LocalContext:
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_VERL)
    fake.chmod(0o755)
    ctx = LocalContext(
        pipeline_dir=tmp_path / "p",
        stage="train",
        spec=StageSpec(
            kind="train",
            params={"model": "/m", "train_files": "/d/t.parquet", "overrides": {"trainer.total_training_steps": 8}},
        ),
        inputs={},
        trainer_python=str(fake),
        attempt_number=2,
    )
    if resume_at is not None:
        step_dir = ctx.stage_dir / "checkpoints" / f"global_step_{resume_at}"
        step_dir.mkdir(parents=True)
        for name in ("model_world_size_1_rank_0.pt", "data_0.pt"):
            (step_dir / name).touch()
        ctx.resume_from_path = str(step_dir)
    return ctx


@pytest.mark.parametrize(
    ("first", "last", "resume_at", "verdict"),
    [
        (4, 8, 3, None),
        (1, 8, 3, "mis-resumed"),  # the resume was ignored: training started over
        (4, 6, 3, "under-trained"),  # exited 0 short of the total (verl #7401)
        (1, 8, None, None),
    ],
)
def test_the_resume_guard_judges_what_verl_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, first: int, last: int, resume_at: int | None, verdict: str | None
) -> None:
    monkeypatch.setenv("FAKE_FIRST", str(first))  # the child inherits them (LocalContext.run_process)
    monkeypatch.setenv("FAKE_LAST", str(last))
    ctx = _fake_verl(tmp_path, resume_at=resume_at)
    result = run_kind(train, ctx)
    if verdict is None:
        assert result.outcome == "succeeded", (result, ctx.logs[-10:])
        assert result.outputs["last_step"] == 8 and result.outputs["resumed_from_step"] == resume_at
    else:
        assert (result.outcome, result.failure_class) == ("failed", "resume"), result
        assert result.reason.startswith(verdict), result.reason
    assert [step for step, _, _ in ctx.checkpoints] == [last]


def test_without_the_metrics_file_the_console_lines_are_used(tmp_path: Path) -> None:
    ctx = LocalContext(
        pipeline_dir=tmp_path,
        stage="train",
        spec=StageSpec(kind="train", params={"model": "/m", "train_files": "/d/t.parquet"}),
        inputs={},
        trainer_python="/py",
    )
    plan = build_train_plan(
        ctx.params, Facts(trainer_python="/py", work_dir=ctx.work_dir, stage_dir=ctx.stage_dir, cpu_launcher="/l.py")
    )
    ctx.work_dir.mkdir(parents=True)
    recorded = Path(__file__).resolve().parents[1] / "fixtures" / "verl" / "sft_cpu_console.log"
    (ctx.work_dir / "attempt.log").write_bytes(recorded.read_bytes().replace(b"\r", b"\n"))
    watcher = train.Watcher(ctx, plan, resume_step=0)
    watcher.poll(final=True)
    assert sorted(ctx.values_of("train/loss")) == list(range(1, 11))
    assert ctx.values_of("val/loss") == {10: pytest.approx(4.46875)}


def test_a_checkpoint_is_reported_only_once_its_folder_is_complete(tmp_path: Path) -> None:
    ctx = LocalContext(
        pipeline_dir=tmp_path,
        stage="train",
        spec=StageSpec(kind="train", params={"model": "/m", "train_files": "/d/t.parquet"}),
        inputs={},
        trainer_python="/py",
    )
    plan = build_train_plan(
        ctx.params, Facts(trainer_python="/py", work_dir=ctx.work_dir, stage_dir=ctx.stage_dir, cpu_launcher="/l.py")
    )
    checkpoints = Path(plan.checkpoint_dir)
    step_dir = checkpoints / "global_step_5"
    step_dir.mkdir(parents=True)
    watcher = train.Watcher(ctx, plan, resume_step=0)
    (step_dir / "model_world_size_2_rank_0.pt").touch()
    (step_dir / "data_0.pt").touch()
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("5")  # rank 1 is still writing
    watcher.poll()
    assert ctx.checkpoints == []
    (step_dir / "model_world_size_2_rank_1.pt").touch()
    watcher.poll()
    watcher.poll()
    assert ctx.checkpoints == [(5, str(step_dir), True)]

"""Integration: stage kinds through a real agent and NATS (preprocess, cleanup), and what the port gives
a kind: metrics, sparse progress, checkpoints, the step watchdog and the local stage timeout."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
from nats.js import JetStreamContext

from tests.integration.agent_support import (
    agent_config,
    finished,
    log_lines,
    metric_points,
    push_dataset,
    reports,
    run_stage,
    running_agent,
    send,
)
from tests.plugins.trainer import TinyAssets
from verlyard_agent import runner
from verlyard_agent.stages.base import AttemptContext, StageResult
from verlyard_agent.watchdog import WatchdogPolicy
from verlyard_shared.embedded.nats import EmbeddedNats
from verlyard_shared.reports import AttemptProgressReport, CheckpointReport


async def test_preprocess_of_a_wholly_malformed_file_fails_naming_its_lines(
    tmp_path: Path, nats_server: EmbeddedNats, js: JetStreamContext
):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "hi"\nnot json at all\n{"foo": 1}\n')
    async with running_agent(agent_config(tmp_path, nats_server)) as agent:
        command = run_stage(agent.agent_id, "preprocess", {"dataset": str(data)})
        await send(js, command)
        end = await finished(js, command.attempt)
    assert (end.outcome, end.failure_class) == ("failed", "user")
    assert "no usable rows (3 dropped" in end.reason
    assert "line 1: not valid JSON" in end.reason and "line 3: unrecognised row" in end.reason
    texts = [t for _, _, t in await log_lines(js, command.attempt)]
    assert any(t.startswith("dropped line 2: not valid JSON") for t in texts)


async def test_preprocess_drops_bad_rows_and_splits_the_rest(
    tmp_path: Path, nats_server: EmbeddedNats, js: JetStreamContext
):
    rows = [{"prompt": f"q{i}", "response": f"a{i} words here"} for i in range(20)]
    lines = [json.dumps(r) for r in rows]
    lines.insert(5, "{broken")
    lines.insert(9, json.dumps({"instruction": "x"}))  # no output
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    (datasets / "sales.jsonl").write_text("\n".join(lines) + "\n")
    async with running_agent(agent_config(tmp_path, nats_server)) as agent:
        command = run_stage(agent.agent_id, "preprocess", {"dataset": "sales", "val_fraction": 0.25, "seed": 7})
        await send(js, command)
        end = await finished(js, command.attempt)
    assert end.outcome == "succeeded", end.reason
    out = end.outputs
    assert out["rows"] == {"total": 22, "train": 15, "val": 5, "dropped": 2}
    assert [d["line"] for d in out["dropped"]] == [6, 10]
    assert out["format"] == "jsonl" and "note" in out
    text = await asyncio.to_thread(Path(out["train_files"][0]).read_text)
    train = [json.loads(x) for x in text.splitlines()]
    assert len(train) == 15
    assert train[0]["messages"][-1]["role"] == "assistant"
    assert out["token_lengths"]["count"] == 20 and out["token_lengths"]["tokenizer"] == "whitespace"


def _python_with_pyarrow() -> str | None:
    import subprocess

    named = [os.environ.get("VERLYARD_TEST_TRAINER_PYTHON"), os.environ.get("VERLYARD_TRAINER_PYTHON")]
    built = Path(__file__).resolve().parents[2] / ".trainer-venv" / "bin" / "python"  # tests/plugins/trainer.py's
    named.append(str(built) if built.exists() else None)
    for candidate in (*named, shutil.which("python3"), sys.executable):
        if candidate and subprocess.run([candidate, "-c", "import pyarrow"], capture_output=True).returncode == 0:
            return candidate
    return None


async def test_preprocess_writes_parquet_through_the_trainer_python(
    tmp_path: Path, nats_server: EmbeddedNats, js: JetStreamContext
):
    python = _python_with_pyarrow()
    if python is None:
        pytest.skip("no Python with pyarrow on this machine to stand in for VERLYARD_TRAINER_PYTHON")
    data = tmp_path / "d.csv"
    data.write_text("instruction,input,output\nadd,1 1,2\nsub,3 1,2\nmul,2 2,4\n")
    async with running_agent(agent_config(tmp_path, nats_server, trainer_python=python)) as agent:
        command = run_stage(agent.agent_id, "preprocess", {"dataset": str(data), "val_fraction": 0.34})
        await send(js, command)
        end = await finished(js, command.attempt)
        assert end.outcome == "succeeded", end.reason
        assert end.outputs["format"] == "parquet" and end.outputs["train_files"][0].endswith("train.parquet")
        assert (await asyncio.to_thread(Path(end.outputs["val_files"][0]).stat)).st_size > 0
        # ... and reads parquet back (its own output: the messages form), also through the trainer's Python.
        again = run_stage(agent.agent_id, "preprocess", {"dataset": end.outputs["train_files"][0], "val_fraction": 0})
        await send(js, again)
        end = await finished(js, again.attempt)
    assert end.outcome == "succeeded", end.reason
    assert end.outputs["rows"] == {"total": 2, "train": 2, "val": 0, "dropped": 0}


async def test_cleanup_keeps_the_newest_complete_checkpoint_and_deletes_old_ones(
    tmp_path: Path, nats_server: EmbeddedNats, js: JetStreamContext
):
    ckpt = tmp_path / "ckpt"
    for step in (10, 20, 30, 40):
        (ckpt / f"global_step_{step}").mkdir(parents=True)
        (ckpt / f"global_step_{step}" / "model.pt").write_bytes(b"x" * 1000)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("30")  # 40 is still being written
    inputs = {"train": {"checkpoint_dir": str(ckpt)}}
    async with running_agent(agent_config(tmp_path, nats_server)) as agent:
        command = run_stage(agent.agent_id, "cleanup", {"keep_last": 1, "pinned": [10]}, inputs=inputs)
        await send(js, command)
        end = await finished(js, command.attempt)
    assert end.outcome == "succeeded", end.reason
    assert end.outputs["deleted_steps"] == [20] and end.outputs["freed_bytes"] == 1000
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "global_step_10",
        "global_step_30",
        "global_step_40",
        "latest_checkpointed_iteration.txt",
    ]


# ---- the port: a test kind plugged in where the training kinds plug in ---------------------------------


async def _training_like(ctx: AttemptContext) -> StageResult:
    """Reports steps like a trainer, then hangs in a child process (an NCCL collective, say)."""
    for step in range(1, 6):
        ctx.metrics(step, {"train/loss": 5.0 - step * 0.5, "train/lr": 1e-5, "bad": float("nan")})
        ctx.progress(step, 100)
        await asyncio.sleep(0.02)
    ctx.checkpoint(5, str(ctx.stage_dir / "global_step_5"))
    code = await ctx.run_process(["sleep", "60"])
    return StageResult(outcome="succeeded" if code == 0 else "failed", exit_code=code)


async def test_watchdog_stops_a_hung_attempt_after_metrics_progress_and_a_checkpoint(
    tmp_path: Path, nats_server: EmbeddedNats, js: JetStreamContext, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(runner, "resolve", lambda kind: _training_like)
    config = agent_config(tmp_path, nats_server, watchdog=WatchdogPolicy(floor_s=1.0, factor=10.0))
    async with running_agent(config) as agent:
        command = run_stage(agent.agent_id, "train", {"model": "x"})
        await send(js, command)
        end = await finished(js, command.attempt)
    assert (end.outcome, end.failure_class) == ("failed", "hang")
    assert "no training step for" in end.reason and "after step 5" in end.reason
    got = await reports(js, command.attempt)
    progress = [r.step for r in got if isinstance(r, AttemptProgressReport)]
    assert progress[0] == 1 and progress[-1] == 5 and len(progress) <= 3, "sparse, and the last step gets out"
    assert [(r.step, r.path.endswith("global_step_5")) for r in got if isinstance(r, CheckpointReport)] == [(5, True)]
    points = await metric_points(js, command.attempt)
    assert [(s, v) for s, k, v in points if k == "train/loss"] == [(s, 5.0 - s * 0.5) for s in range(1, 6)]
    assert not [k for _, k, _ in points if k == "bad"], "NaN is not published"


async def test_stage_timeout_is_enforced_locally(tmp_path: Path, nats_server: EmbeddedNats, js: JetStreamContext):
    async with running_agent(agent_config(tmp_path, nats_server)) as agent:
        command = run_stage(agent.agent_id, "noop", {"sleep_ms": 30_000}, timeout_s=0.5)
        await send(js, command)
        end = await finished(js, command.attempt, timeout=10)
    assert (end.outcome, end.failure_class) == ("failed", "timeout")


async def test_preprocess_fetches_a_pushed_dataset_this_host_does_not_have_from_the_object_store(
    tmp_path: Path, nats_server: EmbeddedNats, js: JetStreamContext
):
    rows = "".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(10))
    sha = await push_dataset(tmp_path, js, "remote-sales", rows.encode())
    async with running_agent(agent_config(tmp_path, nats_server)) as agent:
        command = run_stage(agent.agent_id, "preprocess", {"dataset": "remote-sales", "val_fraction": 0.2})
        await send(js, command)
        end = await finished(js, command.attempt)
        assert end.outcome == "succeeded", end.reason
        assert end.outputs["rows"]["total"] == 10
        cached = tmp_path / "datasets" / sha
        assert (tmp_path / "datasets" / "remote-sales").resolve() == cached.resolve()
        assert await asyncio.to_thread(cached.read_text) == rows
        texts = [t for _, _, t in await log_lines(js, command.attempt)]
        assert any("fetching it from the object store" in t for t in texts)
        # A second stage finds it on the host: no second fetch.
        again = run_stage(agent.agent_id, "preprocess", {"dataset": "remote-sales", "val_fraction": 0.2})
        await send(js, again)
        assert (await finished(js, again.attempt)).outcome == "succeeded"
        assert not any("fetching" in t for _, _, t in await log_lines(js, again.attempt))
        missing = run_stage(agent.agent_id, "preprocess", {"dataset": "never-pushed"})
        await send(js, missing)
        end = await finished(js, missing.attempt)
    assert (end.outcome, end.failure_class) == ("failed", "user")
    assert "no dataset named 'never-pushed' was pushed" in end.reason


async def test_preprocess_counts_tokens_with_the_models_own_tokenizer(
    tmp_path: Path, nats_server: EmbeddedNats, js: JetStreamContext, trainer_python: str, tiny_assets: TinyAssets
):
    rows = [{"prompt": f"question number {i}", "response": "an answer " * (4 * i + 1)} for i in range(12)]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = {"dataset": str(data), "val_fraction": 0.25, "tokenizer": str(tiny_assets.model), "max_length": 60}
    async with running_agent(agent_config(tmp_path, nats_server, trainer_python=trainer_python)) as agent:
        command = run_stage(agent.agent_id, "preprocess", params)
        await send(js, command)
        end = await finished(js, command.attempt, timeout=120)
        assert end.outcome == "succeeded", end.reason
        stats = end.outputs["token_lengths"]
        assert stats["tokenizer"] == str(tiny_assets.model) and stats["count"] == 12
        words = [len(r["prompt"].split()) + len(r["response"].split()) for r in rows]
        assert stats["min"] > min(words), "the chat template's tokens are counted, not whitespace words"
        assert stats["max_length"] == 60 and 0 < stats["over_max_length"] < 12
        bad = run_stage(agent.agent_id, "preprocess", {"dataset": str(data), "tokenizer": "relative/path"})
        await send(js, bad)
        end = await finished(js, bad.attempt)
    assert (end.outcome, end.failure_class) == ("failed", "user") and "absolute path" in end.reason

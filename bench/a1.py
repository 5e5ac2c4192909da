"""Bench A1 (edge): the same verl SFT run through verlyard vs run directly; plus the agent's idle RSS.

Both runs execute the exact command the agent builds (`verlyard_agent.trainer.build_train_plan`, CPU
launcher, tiny locally built Qwen2, 10 steps): "direct" runs it as a plain subprocess, "verlyard"
submits a one-stage pipeline to the running stack. Runs alternate so drift in machine load hits both.
Overhead = verlyard's submitted -> stage.succeeded (event log) minus the direct wall time. On a loaded
machine the trainer's own speed swings by seconds between runs and swamps that difference, so the time
verlyard spends around the trainer process is reported too: submitted -> attempt.started, plus the
trainer's exit (the agent's log line) -> stage.succeeded.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from bench.harness import Client, Result, at, parse_ts, summary
from verlyard_agent.trainer import Facts, build_train_plan

NAME = "A1"
ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "bench" / "work" / "a1-assets"


def trainer_python() -> str | None:
    python = os.environ.get("VERLYARD_TRAINER_PYTHON") or str(ROOT / ".trainer-venv" / "bin" / "python")
    return python if Path(python).exists() else None


def _assets(python: str) -> Path:
    if not (ASSETS / "assets.json").is_file():
        ASSETS.mkdir(parents=True, exist_ok=True)
        subprocess.run([python, str(ROOT / "scripts" / "make_tiny_assets.py"), str(ASSETS)], check=True)
    return ASSETS


def _params(assets: Path) -> dict[str, Any]:
    return {
        "algorithm": "sft",
        "model": str(assets / "model"),
        "train_files": [str(assets / "train.parquet")],
        "val_files": [str(assets / "val.parquet")],
        "epochs": 1,
        "batch_size": 16,
        "lr": 1.0e-3,
        "save_every": 5,
        "overrides": {"trainer.total_training_steps": 10},
    }


def _direct(python: str, params: dict[str, Any]) -> float:
    launcher = ROOT / "services" / "gpu-agent" / "src" / "verlyard_agent" / "launchers" / "verl_cpu_sft.py"
    with tempfile.TemporaryDirectory(prefix="verlyard-a1-") as tmp:
        work, stage_dir = Path(tmp) / "work", Path(tmp) / "stage"
        work.mkdir()
        stage_dir.mkdir()
        plan = build_train_plan(
            params, Facts(trainer_python=python, work_dir=work, stage_dir=stage_dir, cpu_launcher=str(launcher))
        )
        start = time.perf_counter()
        subprocess.run(
            list(plan.argv),
            env={**os.environ, **plan.env},
            cwd=work,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        return time.perf_counter() - start


_EXITED = re.compile(r"^process \d+ exited with code 0$")


async def _through_verlyard(client: Client, params: dict[str, Any], i: int) -> tuple[float, float]:
    """(submitted -> stage.succeeded, verlyard's own time around the trainer process) in seconds."""
    pipeline_id = await client.submit({"name": f"a1-{i}", "stages": {"train": {"kind": "train", "with": params}}})
    events = await client.wait_events(pipeline_id, timeout_s=600, poll_s=0.05)
    if not any(e["type"] == "pipeline.succeeded" for e in events):
        raise RuntimeError(f"A1 pipeline {pipeline_id} did not succeed: {[e['type'] for e in events]}")
    submitted, succeeded = at(events, "pipeline.submitted"), at(events, "stage.succeeded", "train")
    # Around the trainer: submitted -> the attempt started (placement, acceptance, the agent starting
    # it), and the trainer's exit (the agent's log line) -> stage.succeeded (report, commit). Trainer
    # speed, which the machine's load swings by seconds, is not in it.
    response = await client.http.get(f"/api/v1/pipelines/{pipeline_id}/stages/train/logs", params={"limit": 5000})
    response.raise_for_status()
    exits = [parse_ts(line["recorded_at"]) for line in response.json()["items"] if _EXITED.match(line["text"])]
    around = (at(events, "attempt.started", "train") - submitted) + (succeeded - exits[-1]) if exits else math.nan
    return succeeded - submitted, around


def _stack_processes(home: Path) -> list[psutil.Process]:
    """verlyard's own processes of the stack at `home` between runs (so no trainer is among them): `up`
    and its children (api, scheduler, agent, nats-server), and the Postgres server with its backends."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        if str(home) in " ".join(proc.info["cmdline"] or []):  # `up --home`, the postmaster's `-D`
            for member in (proc, *proc.children(recursive=True)):
                found[member.pid] = member
    return list(found.values())


def _cpu_s(processes: list[psutil.Process]) -> dict[int, float]:
    out: dict[int, float] = {}
    for proc in processes:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        out[proc.pid] = times.user + times.system
    return out


def _agent_rss_mb(home: Path) -> float:
    pid = int((home / "run" / "agent.pid").read_text())
    return psutil.Process(pid).memory_info().rss / 1e6


async def run(client: Client, quick: bool) -> Result:
    python = trainer_python()
    if python is None:
        raise RuntimeError("A1 needs the trainer env: run scripts/trainer-env.sh (make bench does)")
    repeats = 2 if quick else 3
    result = Result(NAME, "verl SFT through verlyard vs directly (tiny model, CPU, 10 steps)", {"repeats": repeats})
    idle_rss = _agent_rss_mb(client.stack_home)
    assets = await asyncio.to_thread(_assets, python)
    params = _params(assets)
    direct: list[float] = []
    through: list[float] = []
    around: list[float] = []
    stack_cpu: list[float] = []
    for i in range(repeats):
        direct.append(await asyncio.to_thread(_direct, python, params))
        processes = _stack_processes(client.stack_home)
        before = _cpu_s(processes)
        total, outside = await _through_verlyard(client, params, i)
        after = _cpu_s(processes)
        # CPU the stack itself burnt while the run went through it: on 2 cores it is time taken from the
        # trainer, so it bounds the slowdown verlyard can cause beside its own time around the trainer.
        stack_cpu.append(sum(after[pid] - before[pid] for pid in after if pid in before))
        through.append(total)
        around.append(outside)
    overhead = [t - d for t, d in zip(through, direct, strict=True)]
    d50, t50 = statistics.median(direct), statistics.median(through)
    result.raw = {
        "direct_s": direct,
        "verlyard_s": through,
        "overhead_s": overhead,
        "around_trainer_s": around,
        "stack_cpu_s": stack_cpu,
        "agent_idle_rss_mb": idle_rss,
    }
    result.summaries = {k: summary(v) for k, v in result.raw.items() if isinstance(v, list)}
    allowed = max(0.03 * d50, 1.0)
    result.check(
        "overhead (median verlyard - median direct)",
        f"<= max(3%, 1 s) = {allowed:.2f} s",
        t50 - d50,
        lambda v: v <= allowed,
        unit="s",
    )
    result.check("wall-time ratio verlyard/direct", "(reported)", t50 / d50, lambda v: True, unit="x")
    result.check(
        "verlyard's own time around the trainer (median)",
        f"<= {allowed:.2f} s",
        statistics.median(around),
        lambda v: v <= allowed,
        unit="s",
    )
    result.check(
        "CPU the stack used during a run (median)", "(reported)", statistics.median(stack_cpu), lambda v: True, "s"
    )
    result.check("agent idle RSS", "<= 80 MB", idle_rss, lambda v: v <= 80, unit="MB")
    result.notes.append(f"direct median {d50:.2f} s, through verlyard median {t50:.2f} s")
    return result

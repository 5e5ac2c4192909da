"""End-to-end: the real stack (`verlyard up`: embedded Postgres + NATS, api, scheduler, agent) runs real verl
SFT on this CPU machine, driven only over the HTTP API (issue 4's "Must show").

One stack serves the module. The tests: preprocess -> train -> evaluate -> export -> cleanup succeeds, the
loss falls, per-step metrics and checkpoint events are recorded and the HF export generates; a `kill -9` of
the agent mid-training is retried from the recorded checkpoint (first step N+1); a cancel mid-training ends
the pipeline `cancelled` with no process of the attempt left; a malformed dataset drops bad rows by line
number, and a wholly bad one fails the preprocess stage with a clear class and reason.

Why the resume test kills the agent and not the trainer: a trainer killed by SIGKILL from outside is
classified by its memory cgroup's OOM-kill count (`oom` if it rose, `preempted` if not, `oom` when the
count cannot be read: failures.py, oomwatch.py), so its class depends on the host; the agent's crash
does not. `kill -9` of the agent is the crash the system recovers from by
design (ADR 0008 decision 4): the trainer dies with it (PR_SET_PDEATHSIG), the supervisor of `verlyard up`
restarts the agent, which finds its attempt record, kills the leftovers (by their `VERLYARD_ATTEMPT`
marker) and reports the attempt `lost`; the scheduler retries it with `resume_path` at the latest
recorded checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.plugins.trainer import OFFLINE_ENV, TinyAssets
from verlyard_shared.embedded.ports import free_port

pytestmark = pytest.mark.timeout(600)

FINAL = {"succeeded", "failed", "cancelled"}
RESUME_STEPS = 12
"""Enough steps after the first checkpoint (step 2) that the agent is killed mid-training."""


@dataclass(frozen=True)
class Stack:
    home: Path
    api: str
    client: httpx.Client
    assets: TinyAssets
    trainer_python: str

    @property
    def dataset(self) -> Path:
        return self.assets.model.parent / "qa.jsonl"

    def submit(self, spec: dict[str, Any]) -> str:
        answer = self.client.post("/api/v1/pipelines", json=spec)
        assert answer.status_code == 201, answer.text
        return str(answer.json()["id"])

    def pipeline(self, pipeline_id: str) -> dict[str, Any]:
        answer = self.client.get(f"/api/v1/pipelines/{pipeline_id}")
        answer.raise_for_status()
        return answer.json()

    def events(self, pipeline_id: str) -> list[dict[str, Any]]:
        answer = self.client.get(f"/api/v1/pipelines/{pipeline_id}/events")
        answer.raise_for_status()
        return list(answer.json()["items"])

    def metrics(self, pipeline_id: str, stage: str, key: str) -> dict[str, Any]:
        answer = self.client.get(f"/api/v1/pipelines/{pipeline_id}/stages/{stage}/metrics", params={"keys": key})
        answer.raise_for_status()
        return answer.json()

    def wait(self, what: str, probe: Callable[[], Any], timeout_s: float, pipeline_id: str | None = None) -> Any:
        """Poll `probe` until it returns something truthy; fail with the stack's logs after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if found := probe():
                return found
            time.sleep(0.5)
        state = json.dumps(self.pipeline(pipeline_id), indent=1)[-4000:] if pipeline_id else ""
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{state}\n{_console(self.home)}")

    def wait_final(self, pipeline_id: str, timeout_s: float) -> dict[str, Any]:
        def probe() -> dict[str, Any] | None:
            view = self.pipeline(pipeline_id)
            return view if view["status"] in FINAL else None

        return self.wait(f"pipeline {pipeline_id} to end", probe, timeout_s, pipeline_id)


def _console(home: Path) -> str:
    parts = []
    for path in [home / "up-console.log", *sorted((home / "logs").glob("*.log"))]:
        if path.exists():
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-25:]))
    return "\n".join(parts)


@pytest.fixture(scope="module")
def stack(trainer_python: str, tiny_assets: TinyAssets) -> Iterator[Stack]:
    # Outside pytest's 0700 tmp root: the embedded Postgres runs as an unprivileged user when we are root.
    home = Path(tempfile.mkdtemp(prefix="verlyard-train-"))
    home.chmod(0o755)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERLYARD_")}
    env |= OFFLINE_ENV | {"VERLYARD_TRAINER_PYTHON": trainer_python}
    with (home / "up-console.log").open("ab") as console:
        process = subprocess.Popen(
            [sys.executable, "-m", "verlyard_shared.cli", "up", "--home", str(home), "--port", str(port)],
            env=env,
            stdout=console,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    api = f"http://127.0.0.1:{port}"
    client: httpx.Client | None = None
    try:
        deadline = time.monotonic() + 180
        token_file = home / "admin-token"
        while True:
            if process.poll() is not None:
                raise AssertionError(f"verlyard up exited {process.returncode}:\n{_console(home)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"verlyard up did not become ready:\n{_console(home)}")
            if token_file.exists() and (home / "run" / "agent.pid").exists():
                headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
                try:
                    if httpx.get(f"{api}/readyz", headers=headers, timeout=2).status_code == 200:
                        client = httpx.Client(base_url=api, headers=headers, timeout=30)
                        break
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        yield Stack(home=home, api=api, client=client, assets=tiny_assets, trainer_python=trainer_python)
    finally:
        if client is not None:
            client.close()
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        shutil.rmtree(home, ignore_errors=True)


def _prep(dataset: Path) -> dict[str, Any]:
    return {"kind": "preprocess", "with": {"dataset": str(dataset), "format": "auto", "val_fraction": 0.125, "seed": 0}}


def _train(stack: Stack, *, steps: int, epochs: int, save_every: int, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "train",
        "needs": ["prep"],
        "with": {
            "algorithm": "sft",
            "model": str(stack.assets.model),
            "epochs": epochs,
            "batch_size": 16,
            "lr": 1.0e-3,
            "save_every": save_every,
            "overrides": {"trainer.total_training_steps": steps},
        },
        **extra,
    }


def _retry(*classes: str, attempts: int = 2) -> dict[str, Any]:
    return {"max_attempts": attempts, "backoff": "fixed", "initial_delay": "1s", "retry_on": list(classes)}


def _series(metrics: dict[str, Any], key: str) -> dict[int, list[tuple[int, float]]]:
    """Attempt number -> (step, value) points of `key`, in step order."""
    out: dict[int, list[tuple[int, float]]] = {}
    for series in metrics["series"]:
        if series["key"] == key:
            points = [(p["step"], p["value"]) for p in series["points"] if p["value"] is not None]
            out[series["number"]] = sorted(points)
    return out


def _checkpoint_steps(events: list[dict[str, Any]], attempt: str | None = None) -> list[int]:
    return [
        e["data"]["step"]
        for e in events
        if e["type"] == "checkpoint.saved" and (attempt is None or e["data"]["attempt"] == attempt)
    ]


def _attempt_processes(attempt: str) -> list[psutil.Process]:
    """Live processes the agent marked as `attempt`'s (the marker its children inherit)."""
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and proc.environ().get("VERLYARD_ATTEMPT") == attempt:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


_GENERATE = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = tok("What is 2 plus 3?", return_tensors="pt")
with torch.no_grad():
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
new = out.shape[1] - ids["input_ids"].shape[1]
print("GENERATED", new, repr(tok.decode(out[0][ids["input_ids"].shape[1]:])))
"""


def test_sft_pipeline_end_to_end(stack: Stack) -> None:
    spec = {
        "name": "e2e-sft",
        "defaults": {"retry": _retry("infra", "lost"), "timeout": "15m"},
        "stages": {
            "prep": _prep(stack.dataset),
            "train": _train(stack, steps=10, epochs=1, save_every=5),
            "eval": {"kind": "evaluate", "needs": ["train"]},
            "export": {"kind": "export", "needs": ["train"]},
            "cleanup": {"kind": "cleanup", "needs": ["eval", "export"], "when": "always", "with": {"keep_last": 1}},
        },
    }
    pipeline_id = stack.submit(spec)
    view = stack.wait_final(pipeline_id, 420)
    assert view["status"] == "succeeded", json.dumps(view, indent=1)
    assert {name: s["status"] for name, s in view["stages"].items()} == dict.fromkeys(spec["stages"], "succeeded")

    loss = _series(stack.metrics(pipeline_id, "train", "train/loss"), "train/loss")
    assert list(loss) == [1], loss
    steps = [step for step, _ in loss[1]]
    assert steps == list(range(1, 11)), f"one train/loss point per step: {steps}"
    first, last = loss[1][0][1], loss[1][-1][1]
    assert last < first, f"the loss did not fall: {loss[1]}"

    events = stack.events(pipeline_id)
    assert _checkpoint_steps(events) == [5, 10], [e["type"] for e in events]
    assert view["stages"]["train"]["checkpoint"]["step"] == 10

    hf_dir = view["stages"]["export"]["outputs"]["hf_dir"]
    assert Path(hf_dir, "config.json").is_file(), hf_dir
    done = subprocess.run(
        [stack.trainer_python, "-c", _GENERATE, hf_dir],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, **OFFLINE_ENV},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    generated = [line for line in done.stdout.splitlines() if line.startswith("GENERATED ")]
    assert generated and int(generated[0].split()[1]) > 0, done.stdout


def test_agent_killed_mid_training_resumes_from_the_recorded_checkpoint(stack: Stack) -> None:
    spec = {
        "name": "e2e-resume",
        "defaults": {"timeout": "15m"},
        "stages": {
            "prep": _prep(stack.dataset),
            "train": _train(
                stack, steps=RESUME_STEPS, epochs=2, save_every=2, retry=_retry("lost", "infra", attempts=3)
            ),
        },
    }
    pipeline_id = stack.submit(spec)
    seen = stack.wait(
        "a checkpoint.saved event",
        lambda: _checkpoint_steps(stack.events(pipeline_id)),
        360,
        pipeline_id,
    )
    agent_pid_file = stack.home / "run" / "agent.pid"
    old_agent = int(agent_pid_file.read_text())
    first_attempt = stack.pipeline(pipeline_id)["stages"]["train"]["attempts"][0]["id"]
    os.kill(old_agent, signal.SIGKILL)

    def restarted() -> bool:
        try:
            pid = int(agent_pid_file.read_text())
        except (OSError, ValueError):
            return False
        return pid != old_agent and psutil.pid_exists(pid)

    stack.wait("the supervisor to restart the agent", restarted, 60)
    view = stack.wait_final(pipeline_id, 420)
    assert view["status"] == "succeeded", json.dumps(view, indent=1)

    attempts = view["stages"]["train"]["attempts"]
    assert len(attempts) == 2, attempts
    assert attempts[0]["id"] == first_attempt
    assert attempts[0]["failure_class"] == "lost", attempts[0]
    events = stack.events(pipeline_id)
    recorded = _checkpoint_steps(events, first_attempt)
    resumed = attempts[1]["resumed_from_step"]
    assert resumed is not None and resumed in recorded and resumed >= max(seen), (resumed, recorded, seen)

    loss = _series(stack.metrics(pipeline_id, "train", "train/loss"), "train/loss")
    second = [step for step, _ in loss[2]]
    assert second[0] == resumed + 1, f"resumed from {resumed} but the retry's first step is {second[0]}"
    assert second[-1] == RESUME_STEPS, second
    assert not _attempt_processes(first_attempt), "the lost attempt's processes were left running"


def test_cancel_mid_training_stops_the_process_group(stack: Stack) -> None:
    spec = {
        "name": "e2e-cancel",
        "stages": {
            "prep": _prep(stack.dataset),
            "train": _train(stack, steps=200, epochs=20, save_every=1000),
        },
    }
    pipeline_id = stack.submit(spec)

    def stepping() -> str | None:
        attempts = stack.pipeline(pipeline_id)["stages"]["train"]["attempts"]
        if attempts and attempts[-1]["status"] == "running" and (attempts[-1]["step"] or 0) >= 1:
            return str(attempts[-1]["id"])
        return None

    attempt = stack.wait("the train attempt's first step", stepping, 360, pipeline_id)
    processes = _attempt_processes(attempt)
    assert processes, "the running attempt has no marked process"
    answer = stack.client.post(f"/api/v1/pipelines/{pipeline_id}/cancel", json={"reason": "e2e cancel"})
    assert answer.status_code == 202, answer.text
    cancelled_at = time.monotonic()

    view = stack.wait_final(pipeline_id, 60)
    assert view["status"] == "cancelled", json.dumps(view, indent=1)
    assert view["stages"]["train"]["status"] == "cancelled"
    # The agent's grace period is 10 s (SIGTERM, then SIGKILL); allow the bus round trip on top.
    _, alive = psutil.wait_procs(processes, timeout=max(0.1, cancelled_at + 15 - time.monotonic()))
    assert not alive, f"processes of the cancelled attempt survived: {[p.pid for p in alive]}"
    assert not _attempt_processes(attempt)


def test_malformed_datasets(stack: Stack) -> None:
    good = stack.dataset.read_text().splitlines()[:20]
    partial = stack.home / "partial.jsonl"
    lines = [*good[:4], '{"prompt": "broken', *good[4:7], '{"question": 1, "answer": [2]}', *good[7:]]
    partial.write_text("\n".join(lines) + "\n")  # line 5 is not JSON, line 9 has the wrong shape
    bad = stack.home / "bad.jsonl"
    bad.write_text('this is not json\n{"unrelated": true}\n[1, 2, 3]\n')

    def only_prep(name: str, dataset: Path) -> dict[str, Any]:
        return {"name": name, "defaults": {"retry": {"max_attempts": 1}}, "stages": {"prep": _prep(dataset)}}

    partial_id = stack.submit(only_prep("e2e-partial-data", partial))
    bad_id = stack.submit(only_prep("e2e-bad-data", bad))

    view = stack.wait_final(partial_id, 120)
    assert view["status"] == "succeeded", json.dumps(view, indent=1)
    outputs = view["stages"]["prep"]["outputs"]
    assert outputs["rows"]["dropped"] == 2 and outputs["rows"]["total"] == 22, outputs["rows"]
    assert [d["line"] for d in outputs["dropped"]] == [5, 9], outputs["dropped"]
    assert all(d["reason"] for d in outputs["dropped"])

    view = stack.wait_final(bad_id, 120)
    assert view["status"] == "failed", json.dumps(view, indent=1)
    stage = view["stages"]["prep"]
    assert stage["status"] == "failed"
    attempt = stage["attempts"][-1]
    assert attempt["failure_class"] == "user", attempt
    reason = attempt["reason"] or stage["reason"]
    assert "no usable rows" in reason and "line 1" in reason, reason
    assert "Traceback" not in reason


def test_replay_verify_finds_the_read_models_equal_to_the_log_these_runs_filled(stack: Stack) -> None:
    """Last in the module: the database now holds every run above (training, a resume after a killed
    agent, a cancel, bad data); rebuilding the read models from the log must match what is stored."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERLYARD_")}
    env |= {"VERLYARD_API_URL": stack.api, "VERLYARD_TOKEN": (stack.home / "admin-token").read_text().strip()}
    done = subprocess.run(
        [sys.executable, "-m", "verlyard_shared.cli", "replay", "--verify", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True and report["differences"] == [], report
    assert report["pipelines"] >= 5, report

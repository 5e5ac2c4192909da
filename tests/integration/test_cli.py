"""Integration: the real CLI (`python -m verlyard_shared.cli ...` subprocesses, no TTY) against the real API
served by uvicorn on a free port, on real Postgres. The scheduler is played by appending its events.

Covers each API command's text and `--json` output, one-line errors (422 with lines, 401, connection
refused, hosts on a server without them), and `submit --watch` / `status --watch` exit codes for
success (0), failure (1) and cancel (3)."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import select
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.integration.api_app import SPEC_YAML, ApiEnv, api_env, served
from tests.integration.test_api_pipelines import run_to_end
from verlyard_api.adapters.dataset_store import DatasetStore
from verlyard_shared.embedded.ports import free_port
from verlyard_shared.envelope import Metadata, NewEvent
from verlyard_shared.events import (
    AgentRegistered,
    AttemptProgressed,
    AttemptStarted,
    GpuInfo,
    PipelineCancelled,
    PipelineFailed,
    PipelineSucceeded,
    StageCancelled,
    StageFailed,
    StagePlaced,
    StageRetryScheduled,
    StageSkipped,
    StageSucceeded,
)
from verlyard_shared.ids import agent_stream, new_id
from verlyard_shared.store.port import ANY

AUDIT_KEYS = [
    "position",
    "event_id",
    "stream_id",
    "version",
    "type",
    "recorded_at",
    "actor",
    "correlation_id",
    "causation_id",
    "data",
]
WATCH_LINE = re.compile(r"^\d\d:\d\d:\d\d ")
CLI_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


Cli = Callable[..., Awaitable[Result]]


@dataclass
class Stack:
    api: ApiEnv
    url: str
    cli: Cli
    home: Path


def _env(url: str, token: str | None, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERLYARD_")}
    env |= {"VERLYARD_API_URL": url, "VERLYARD_HOME": str(home), "COLUMNS": "120", "NO_COLOR": "1"}
    if token is not None:
        env["VERLYARD_TOKEN"] = token
    return env


async def start_cli(url: str, token: str | None, home: Path, *argv: str, stdin: bytes | None = None) -> Any:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "verlyard_shared.cli",
        *argv,
        env=_env(url, token, home),
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: Any, stdin: bytes | None = None) -> Result:
    try:
        out, err = await asyncio.wait_for(process.communicate(stdin), CLI_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        out, err = await process.communicate()
        raise AssertionError(f"the CLI did not finish: {out.decode()} {err.decode()}") from None
    result = Result(process.returncode, out.decode(), err.decode())
    assert "Traceback" not in result.err, result.err
    return result


@pytest.fixture
async def stack(pg_pool: asyncpg.Pool, tmp_path: Path) -> AsyncIterator[Stack]:
    async with api_env(pg_pool) as api:
        api.deps.services.datasets = DatasetStore(tmp_path / "datasets")
        async with served(api.app) as url:

            async def cli(*argv: str, who: str | None = "admin", stdin: bytes | None = None) -> Result:
                token = api.tokens[who] if who is not None else None
                return await finish(await start_cli(url, token, tmp_path, *argv, stdin=stdin), stdin)

            yield Stack(api=api, url=url, cli=cli, home=tmp_path)


async def submit(stack: Stack) -> str:
    """Submit SPEC_YAML through the served API. Not `ApiEnv.submit`: its in-process ASGI call leaves the
    request's database deadline set in the test's own context, which later scheduler appends would hit."""
    async with httpx.AsyncClient(base_url=stack.url, timeout=30) as client:
        response = await client.post(
            "/api/v1/pipelines",
            content=SPEC_YAML,
            headers=stack.api.auth("member") | {"Content-Type": "application/yaml"},
        )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def spec_file(tmp_path: Path, text: str = SPEC_YAML, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


async def play(api: ApiEnv, pid: str, outcome: str) -> None:
    """The scheduler's events for prep -> train -> eval, ending `outcome` (succeeded|failed|cancelled)."""
    for stage in ("prep", "train", "eval"):
        attempt = f"{pid}-{stage}-1"
        if outcome == "cancelled" and stage == "train":
            await api.scheduler(pid, StageCancelled(pipeline_id=pid, stage="train", attempt=attempt))
            await api.scheduler(pid, StageSkipped(pipeline_id=pid, stage="eval", reason="cancelled"))
            await api.scheduler(pid, PipelineCancelled(pipeline_id=pid, reason="cancelled by admin"))
            return
        await api.scheduler(
            pid, StagePlaced(pipeline_id=pid, stage=stage, attempt=attempt, attempt_number=1, agent="gpu-1")
        )
        await api.scheduler(pid, AttemptStarted(pipeline_id=pid, stage=stage, attempt=attempt, agent="gpu-1"))
        if outcome == "cancelled":
            continue
        await asyncio.sleep(0.2)  # let the watcher see the running stage
        if outcome == "failed" and stage == "train":
            await api.scheduler(
                pid, StageFailed(pipeline_id=pid, stage=stage, attempt=attempt, failure_class="oom", exit_code=137)
            )
            await api.scheduler(pid, StageSkipped(pipeline_id=pid, stage="eval", reason="train failed"))
            await api.scheduler(pid, PipelineFailed(pipeline_id=pid, reason="train failed", failed_stages=("train",)))
            return
        await api.scheduler(pid, StageSucceeded(pipeline_id=pid, stage=stage, attempt=attempt))
    await api.scheduler(pid, PipelineSucceeded(pipeline_id=pid))


async def first_line(process: Any) -> str:
    line = await asyncio.wait_for(process.stdout.readline(), CLI_TIMEOUT_S)
    return str(line.decode().strip())


# ---- submit, ls, status ----------------------------------------------------------------------------------


async def test_submit_prints_the_id_and_ls_status_show_it_in_text_and_json(stack: Stack) -> None:
    spec = spec_file(stack.home)
    submitted = await stack.cli("submit", str(spec), who="member")
    assert submitted.code == 0
    pid = submitted.out.strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", pid) and f"verlyard status {pid} --watch" in submitted.err

    as_json = spec_file(stack.home, json.dumps({"name": "tiny", "stages": {"a": {"kind": "noop"}}}), "tiny.txt")
    first = await stack.cli("submit", str(as_json), "--json", "--idempotency-key", "k-1")
    again = await stack.cli("submit", str(as_json), "--json", "--idempotency-key", "k-1")
    body = json.loads(first.out)
    assert body["name"] == "tiny" and body["status"] == "pending" and json.loads(again.out)["id"] == body["id"]

    listed = await stack.cli("ls", "--json")
    page = json.loads(listed.out)
    assert [p["id"] for p in page["items"]] == [body["id"], pid] and page["next"] is None
    text = (await stack.cli("ls", "--status", "pending", "--limit", "1")).out.splitlines()
    assert text[0].split() == ["ID", "NAME", "STATUS", "STAGES", "CREATED"]
    assert text[1].split()[:4] == [body["id"], "tiny", "pending", "0/1"]
    assert json.loads((await stack.cli("ls", "--status", "failed", "--json")).out)["items"] == []

    state = json.loads((await stack.cli("status", pid, "--json")).out)
    assert state["id"] == pid and list(state["stages"]) == ["prep", "train", "eval"]
    await stack.api.scheduler(
        pid, StagePlaced(pipeline_id=pid, stage="prep", attempt="a1", attempt_number=1, agent="gpu-1")
    )
    lines = (await stack.cli("status", pid)).out.splitlines()
    assert lines[0].startswith(f"pipeline {pid}  sales-sft  running")
    assert lines[2].split()[:4] == ["prep", "running", "1", "gpu-1"]
    assert lines[3].startswith("└─ train") and "waiting for prep" in lines[3]
    assert lines[4].startswith("   └─ eval")


async def test_cancel_and_retry_in_text_and_json(stack: Stack) -> None:
    pid = await submit(stack)
    cancelled = await stack.cli("cancel", pid, "--reason", "wrong data")
    assert cancelled.code == 0 and cancelled.out.startswith(f"cancel requested for pipeline {pid}")
    again = json.loads((await stack.cli("cancel", pid, "--json")).out)
    assert again["cancel_requested"] is True

    failed = await submit(stack)
    await run_to_end(stack.api, failed, fail="train")
    retried = await stack.cli("retry", failed)
    assert retried.code == 0
    assert retried.out.strip() == f"retrying pipeline {failed}: running train, eval again; keeping prep"
    refused = await stack.cli("retry", failed)
    assert refused.code == 2 and refused.out == ""
    assert refused.err.startswith("verlyard: error: 409 pipeline_active: ") and refused.err.count("\n") == 1

    missing = await stack.cli("cancel", "no-such-pipeline")
    assert missing.code == 2 and missing.err == "verlyard: error: 404 not_found: no pipeline no-such-pipeline\n"


async def test_events_json_is_one_audit_object_per_line(stack: Stack) -> None:
    pid = await submit(stack)
    await run_to_end(stack.api, pid)
    other = await submit(stack)

    everything = await stack.cli("events", "--json")
    events = [json.loads(line) for line in everything.out.splitlines()]
    assert all(list(e) == AUDIT_KEYS for e in events)
    positions = [e["position"] for e in events]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)
    mine = [e for e in events if e["stream_id"] == f"pipeline-{pid}"]
    assert [e["type"] for e in mine][:2] == ["pipeline.submitted", "stage.placed"]
    assert mine[-1]["type"] == "pipeline.succeeded"

    after = mine[3]["position"]
    scoped = [
        json.loads(line) for line in (await stack.cli("events", pid, "--after", str(after), "--json")).out.splitlines()
    ]
    assert [e["position"] for e in scoped] == [e["position"] for e in mine if e["position"] > after]
    assert all(e["stream_id"] == f"pipeline-{pid}" for e in scoped)
    limited = (await stack.cli("events", "--after", str(after), "--limit", "2", "--json")).out.splitlines()
    assert [json.loads(line)["position"] for line in limited] == [p for p in positions if p > after][:2]

    text = (await stack.cli("events", other)).out.splitlines()
    assert len(text) == 1 and "  pipeline.submitted  " in text[0] and f"pipeline-{other}" in text[0]


async def test_events_follow_prints_new_events_as_they_are_recorded(stack: Stack) -> None:
    pid = await submit(stack)
    process = await start_cli(
        stack.url, stack.api.tokens["viewer"], stack.home, "events", pid, "-f", "--json", "--limit", "3"
    )
    assert json.loads(await first_line(process))["type"] == "pipeline.submitted"
    await stack.api.scheduler(
        pid, StagePlaced(pipeline_id=pid, stage="prep", attempt="a1", attempt_number=1, agent="gpu-1")
    )
    await stack.api.scheduler(pid, AttemptStarted(pipeline_id=pid, stage="prep", attempt="a1", agent="gpu-1"))
    result = await finish(process)
    assert result.code == 0
    assert [json.loads(line)["type"] for line in result.out.splitlines()] == ["stage.placed", "attempt.started"]


# ---- errors ----------------------------------------------------------------------------------------------


async def test_errors_are_one_clear_line(stack: Stack, tmp_path: Path) -> None:
    bad = spec_file(
        tmp_path, "name: bad\nstages:\n  a:\n    kind: trian\n  b:\n    kind: noop\n    needs: [zz]\n", "bad.yaml"
    )
    result = await stack.cli("submit", str(bad), who="member")
    assert result.code == 2 and result.out == ""
    lines = result.err.splitlines()
    assert lines[0].startswith("verlyard: error: 422 invalid_spec: ")
    assert any(re.fullmatch(r"  stages\.a\.kind \(line 4\): .*trian.*", line) for line in lines[1:]), lines
    assert any(line.startswith("  stages.b.needs") and "(line 7)" in line for line in lines[1:]), lines

    stale = await finish(await start_cli(stack.url, "vy_" + "x" * 43, tmp_path, "ls"))
    assert stale.code == 2
    assert stale.err == (
        "verlyard: error: no valid token (set VERLYARD_TOKEN or run inside the embedded stack's home)\n"
    )
    forbidden = await stack.cli("submit", str(bad), who="viewer")
    assert forbidden.code == 2 and forbidden.err.startswith("verlyard: error: 403 forbidden: ")

    closed = f"http://127.0.0.1:{free_port()}"
    refused = await finish(await start_cli(closed, "vy_token", tmp_path, "status", "x"))
    assert refused.code == 2
    assert refused.err == f"verlyard: error: cannot reach the API at {closed} (is `verlyard up` running?)\n"

    # The hosts API answers (docs/adr/0011); this API has no VERLYARD_SECRET_KEY, so adding one is refused.
    hosts = await stack.cli("hosts", "ls", "--json")
    assert hosts.code == 0 and json.loads(hosts.out) == {"items": [], "next": None}
    added = await stack.cli(
        "hosts", "add", "box", "--address", "h:22", "--user", "u", "--password-stdin", stdin=b"pw\n"
    )
    assert added.code == 2 and "VERLYARD_SECRET_KEY" in added.err and "pw" not in added.err.split("VERLYARD")[0]


async def test_the_embedded_stacks_admin_token_file_is_used_without_verlyard_token(stack: Stack) -> None:
    (stack.home / "admin-token").write_text(stack.api.tokens["admin"] + "\n")
    listed = await stack.cli("ls", "--json", who=None)
    assert listed.code == 0 and json.loads(listed.out) == {"items": [], "next": None}


# ---- watch -----------------------------------------------------------------------------------------------


async def test_submit_watch_exits_with_the_pipelines_outcome(stack: Stack) -> None:
    spec = spec_file(stack.home)

    async def watched(outcome: str) -> tuple[str, Result]:
        process = await start_cli(stack.url, stack.api.tokens["admin"], stack.home, "submit", str(spec), "--watch")
        pid = await first_line(process)
        if outcome == "cancelled":
            cancel = await start_cli(stack.url, stack.api.tokens["admin"], stack.home, "cancel", pid)
            assert (await finish(cancel)).code == 0
        await play(stack.api, pid, outcome)
        return pid, await finish(process)

    started = time.monotonic()
    results = await asyncio.gather(watched("succeeded"), watched("failed"), watched("cancelled"))
    assert time.monotonic() - started < 30
    for (pid, result), (outcome, code) in zip(
        results, [("succeeded", 0), ("failed", 1), ("cancelled", 3)], strict=True
    ):
        lines = result.out.splitlines()
        assert result.code == code, (outcome, result)
        assert all(WATCH_LINE.match(line) for line in lines[:-1]), lines
        assert lines[-1].startswith(f"pipeline {pid} {outcome} after "), lines
        assert "\x1b" not in result.out  # no colour, no cursor movement without a TTY
        body = [line[9:] for line in lines[:-1]]
        # The first frame is whatever the first poll saw: the test's fake scheduler may have started.
        assert body[0] in {f"pipeline {pid} (sales-sft): pending", f"pipeline {pid} (sales-sft): running"}
        assert f"pipeline {pid}: {outcome}" in body
    success = [line[9:] for line in results[0][1].out.splitlines()[:-1]]
    # The watch prints changes as it polls: the attempt may still read "placed" when the stage runs.
    assert any(line.startswith("prep: running (attempt 1 on gpu-1") for line in success), success
    assert any(line.startswith("train: succeeded (attempt 1 on gpu-1, took ") for line in success)
    failure = [line[9:] for line in results[1][1].out.splitlines()[:-1]]
    assert any(line.startswith("train: failed (attempt 1 on gpu-1, oom, exit 137") for line in failure), failure
    assert "eval: skipped (train failed)" in failure


async def test_status_watch_of_a_finished_pipeline_and_json_watch(stack: Stack) -> None:
    pid = await submit(stack)
    await run_to_end(stack.api, pid, fail="train")
    result = await stack.cli("status", pid, "--watch")
    assert result.code == 1 and result.out.splitlines()[-1].startswith(f"pipeline {pid} failed after ")
    final = await stack.cli("status", pid, "--watch", "--json")
    assert final.code == 1 and json.loads(final.out)["status"] == "failed"


# ---- metrics and logs ------------------------------------------------------------------------------------


async def record_telemetry(pool: asyncpg.Pool, pid: str, stage: str, attempt: str, *, steps: range) -> None:
    """What the API's persisters write from the agents' metric and log batches (test scaffolding)."""
    now = datetime.now(UTC)
    await pool.executemany(
        "INSERT INTO metrics (pipeline_id, stage, attempt, step, key, value, recorded_at) "
        "VALUES ($1,$2,$3,$4,$5,$6,$7)",
        [
            (pid, stage, attempt, s, key, value, now)
            for s in steps
            for key, value in (("train/loss", 5.0 / s), ("train/lr", 1e-5))
        ],
    )
    await pool.executemany(
        'INSERT INTO log_lines (pipeline_id, stage, attempt, "offset", stream, text, recorded_at) '
        "VALUES ($1,$2,$3,$4,$5,$6,$7)",
        [(pid, stage, attempt, i, "stdout", f"{attempt} step {s}", now) for i, s in enumerate(steps)],
    )


async def test_metrics_and_logs(stack: Stack, pg_pool: asyncpg.Pool) -> None:
    pid = await submit(stack)
    api = stack.api
    await api.scheduler(pid, StagePlaced(pipeline_id=pid, stage="train", attempt="t1", attempt_number=1, agent="g"))
    await api.scheduler(pid, AttemptStarted(pipeline_id=pid, stage="train", attempt="t1", agent="g"))
    await record_telemetry(pg_pool, pid, "train", "t1", steps=range(1, 9))
    await api.scheduler(pid, StageFailed(pipeline_id=pid, stage="train", attempt="t1", failure_class="infra"))
    await api.scheduler(
        pid,
        StageRetryScheduled(
            pipeline_id=pid, stage="train", attempt="t1", next_attempt_number=2, not_before=datetime.now(UTC)
        ),
    )
    await api.scheduler(
        pid,
        StagePlaced(
            pipeline_id=pid,
            stage="train",
            attempt="t2",
            attempt_number=2,
            agent="g",
            resume_from_step=4,
            resume_from_path="/c",
        ),
    )
    await api.scheduler(pid, AttemptStarted(pipeline_id=pid, stage="train", attempt="t2", agent="g"))
    await api.scheduler(pid, AttemptProgressed(pipeline_id=pid, stage="train", attempt="t2", step=10, total_steps=20))
    await record_telemetry(pg_pool, pid, "train", "t2", steps=range(5, 11))

    body = json.loads((await stack.cli("metrics", pid, "train", "--json")).out)
    assert body["keys"] == ["train/loss", "train/lr"] and [a["number"] for a in body["attempts"]] == [1, 2]
    table = (await stack.cli("metrics", pid, "train")).out.splitlines()
    assert table[0].split() == ["KEY", "STEP", "LAST", "MIN", "MAX", "ROLLED", "BACK"]
    assert table[1].split() == ["train/loss", "10", "0.5", "0.5", "5", "steps", "5-8"]
    plotted = await stack.cli("metrics", pid, "train", "--plot", "--width", "50", "--height", "6")
    lines = plotted.out.splitlines()
    assert lines[0] == "train/loss  (last 0.5 at step 10, min 0.5)"
    assert lines[-1] == "  x: steps 5-8 of attempt 1 rolled back (attempt 2 resumed from step 4)"
    only_lr = (await stack.cli("metrics", pid, "train", "--plot", "--keys", "train/lr", "--ascii")).out
    assert only_lr.startswith("train/lr") and "*" in only_lr
    unknown = await stack.cli("metrics", pid, "nope")
    assert unknown.code == 2 and unknown.err == f"verlyard: error: 404 not_found: pipeline {pid} has no stage 'nope'\n"

    latest = await stack.cli("logs", pid, "train")
    assert latest.out.splitlines() == [f"t2 step {s}" for s in range(5, 11)]
    first = await stack.cli("logs", pid, "train", "--attempt", "1", "--tail", "2")
    assert first.out.splitlines() == ["t1 step 7", "t1 step 8"]
    as_json = [
        json.loads(line)
        for line in (await stack.cli("logs", pid, "train", "--json", "--tail", "1")).out.split("\n")
        if line
    ]
    assert as_json[0]["offset"] == 5 and as_json[0]["text"] == "t2 step 10"

    # `status` shows the progress bar with the loss of the running training stage.
    status = (await stack.cli("status", pid)).out
    assert "[##########----------] 10/20" in status and "loss 0.5" in status

    # `logs -f` prints what is there, then new lines, and ends when the attempt has ended.
    follow = await start_cli(
        stack.url, stack.api.tokens["viewer"], stack.home, "logs", pid, "train", "-f", "--tail", "1"
    )
    assert await first_line(follow) == "t2 step 10"
    await pg_pool.execute(
        'INSERT INTO log_lines (pipeline_id, stage, attempt, "offset", stream, text, recorded_at) '
        "VALUES ($1, 'train', 't2', 6, 'stdout', 'the last line', now())",
        pid,
    )
    await api.scheduler(pid, StageSucceeded(pipeline_id=pid, stage="train", attempt="t2"))
    result = await finish(follow)
    assert result.code == 0 and result.out.splitlines() == ["the last line"]


# ---- agents and datasets ---------------------------------------------------------------------------------


async def test_agents_list_and_drain(stack: Stack) -> None:
    empty = await stack.cli("agents")
    assert empty.code == 0 and empty.err == "no agents registered\n"
    assert json.loads((await stack.cli("agents", "--json")).out)["items"] == []
    await stack.api.ctx.store.append(
        agent_stream("gpu-1"),
        ANY,
        [
            NewEvent(
                event_id=new_id(),
                event=AgentRegistered(
                    agent="gpu-1", hostname="box", gpus=(GpuInfo(index=0, name="NVIDIA H100"),), cpu_slots=4
                ),
            )
        ],
        Metadata(actor="agent:gpu-1", correlation_id=new_id()),
    )
    listed = (await stack.cli("agents")).out.splitlines()
    assert listed[0].split()[:4] == ["AGENT", "STATE", "HOST", "GPUS"]
    assert listed[1].split()[:6] == ["gpu-1", "active", "box", "1x", "NVIDIA", "H100"]
    drained = await stack.cli("agents", "drain", "gpu-1")
    assert drained.code == 0 and drained.out.startswith("agent gpu-1 is draining")
    (agent,) = json.loads((await stack.cli("agents", "ls", "--json")).out)["items"]
    assert agent["state"] == "draining"
    refused = await stack.cli("agents", "drain", "gpu-1", who="member")
    assert refused.code == 2 and refused.err.startswith("verlyard: error: 403 forbidden")


async def test_datasets_push_ls_show(stack: Stack, tmp_path: Path) -> None:
    data = tmp_path / "Sales.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(10)))
    pushed = await stack.cli("datasets", "push", str(data), "--name", "sales", who="member")
    assert pushed.code == 0 and pushed.out.startswith("pushed dataset sales (") and "jsonl" in pushed.out
    listed = (await stack.cli("datasets", "ls")).out.splitlines()
    assert listed[0].split() == ["NAME", "FORMAT", "SIZE", "SHA256", "UPLOADED", "BY"]
    assert listed[1].split()[:2] == ["sales", "jsonl"]
    shown = (await stack.cli("datasets", "show", "sales", "--rows", "2")).out
    assert "name: sales" in shown and "first 2 row(s):" in shown and '"prompt": "q1"' in shown
    body = json.loads((await stack.cli("datasets", "show", "sales", "--json")).out)
    assert body["name"] == "sales" and body["size_bytes"] == data.stat().st_size
    missing = await stack.cli("datasets", "push", str(tmp_path / "none.jsonl"))
    assert missing.code == 2 and missing.err.startswith("verlyard: error: cannot read ")


async def test_watch_on_a_terminal_draws_the_live_view_with_progress_loss_and_logs(
    stack: Stack, pg_pool: asyncpg.Pool
) -> None:
    pid = await submit(stack)
    api = stack.api
    leader, follower = pty.openpty()
    env = _env(stack.url, api.tokens["viewer"], stack.home) | {"COLUMNS": "140", "LINES": "40", "TERM": "xterm"}
    env.pop("NO_COLOR")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "verlyard_shared.cli", "status", pid, "--watch", env=env, stdout=follower, stderr=follower
    )
    os.close(follower)
    chunks: list[bytes] = []

    def read_available() -> None:
        while select.select([leader], [], [], 0)[0]:
            try:
                chunks.append(os.read(leader, 65536))
            except OSError:
                return

    async def screen_shows(text: str) -> None:
        deadline = time.monotonic() + 20
        while text not in b"".join(chunks).decode(errors="replace"):
            assert time.monotonic() < deadline, b"".join(chunks).decode(errors="replace")[-3000:]
            read_available()
            await asyncio.sleep(0.05)

    await api.scheduler(pid, StagePlaced(pipeline_id=pid, stage="prep", attempt="p1", attempt_number=1, agent="gpu-1"))
    await api.scheduler(pid, StageSucceeded(pipeline_id=pid, stage="prep", attempt="p1"))
    await api.scheduler(pid, StagePlaced(pipeline_id=pid, stage="train", attempt="t1", attempt_number=1, agent="gpu-1"))
    await api.scheduler(pid, AttemptStarted(pipeline_id=pid, stage="train", attempt="t1", agent="gpu-1"))
    await api.scheduler(pid, AttemptProgressed(pipeline_id=pid, stage="train", attempt="t1", step=4, total_steps=8))
    await record_telemetry(pg_pool, pid, "train", "t1", steps=range(1, 5))
    await screen_shows("4/8")
    await screen_shows("loss 1.25")
    await screen_shows("t1 step 4")
    await api.scheduler(pid, StageSucceeded(pipeline_id=pid, stage="train", attempt="t1"))
    await api.scheduler(pid, StagePlaced(pipeline_id=pid, stage="eval", attempt="e1", attempt_number=1, agent="gpu-1"))
    await api.scheduler(pid, StageSucceeded(pipeline_id=pid, stage="eval", attempt="e1"))
    await api.scheduler(pid, PipelineSucceeded(pipeline_id=pid))
    assert await asyncio.wait_for(process.wait(), CLI_TIMEOUT_S) == 0
    read_available()
    os.close(leader)
    screen = b"".join(chunks).decode(errors="replace")
    assert "\x1b[" in screen and "━" in screen  # colour and a drawn progress bar
    assert f"pipeline {pid} succeeded after " in screen and "Traceback" not in screen

"""Bench R1 (edge): fold 1,000,000 recorded events; restart the scheduler with 10,000 active pipelines.

The recorded logs are the scheduler's own (tests/fixtures/event_logs: a diamond with a retry and a
lost attempt, a failure then a retry, a cancel mid-run), replicated under fresh pipeline, event and
attempt ids until there are a million events.

- fold: the scheduler's start-up fold (`World.apply`, the call `Term._load` makes per event) over the
  decoded events, in one process, timed apart from decoding; events/s.
- restart: a throwaway Postgres holds those ended pipelines, one agent, and 10,000 active pipelines
  (each with a stage placed on the agent and not yet accepted, so an outstanding RunStage each); a
  fresh `verlyard scheduler` process starts on it (with a throwaway nats-server) and we read its
  own log: the start-up load (`scheduler_loaded`), the first command after taking the lead
  (`scheduler_first_command`), and its RSS once loaded; plus wall time from spawning the process.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from bench.harness import Client, Result
from verlyard_scheduler.world import World
from verlyard_shared import codec
from verlyard_shared.embedded.nats import EmbeddedNats
from verlyard_shared.embedded.ports import free_port
from verlyard_shared.embedded.postgres import EmbeddedPostgres
from verlyard_shared.envelope import Envelope, Metadata, NewEvent
from verlyard_shared.events import AgentRegistered, PipelineSubmitted, StagePlaced
from verlyard_shared.ids import new_id, pipeline_stream
from verlyard_shared.nats_topology import connect_nats, ensure_topology
from verlyard_shared.store.migrate import migrate
from verlyard_shared.store.port import AppendRequest
from verlyard_shared.store.postgres import PostgresEventStore, connect_pool
from verlyard_shared.validation import validate_pipeline

NAME = "R1"
ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "tests" / "fixtures" / "event_logs"
AGENT = "r1-agent"
META = Metadata(actor="bench-r1", correlation_id="bench-r1")
LOADED_FIELDS = ("events", "streams", "live_streams", "active", "pipelines", "scan_s", "read_s", "fold_s")


def _templates() -> list[tuple[str, list[str]]]:
    """(pipeline id, lines) of each recorded log."""
    out = []
    for path in sorted(LOGS.glob("*.jsonl")):
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        pid = json.loads(lines[0])["event"]["pipeline_id"]
        out.append((pid, lines))
    return out


def recorded_events(total: int) -> Iterator[list[Envelope]]:
    """`total` recorded events (about), one copied pipeline log at a time, under fresh ids and positions."""
    position = 0
    made = 0
    copies = itertools.count(1)
    templates = _templates()
    while True:
        for template_pid, lines in templates:
            if made >= total:
                return
            new_pid = str(uuid.UUID(int=next(copies), version=4))
            batch: list[Envelope] = []
            for line in lines:
                position += 1
                row = json.loads(line.replace(template_pid, new_pid))
                row["position"] = position
                row["event_id"] = f"{new_pid}-{row['event_id']}"
                if "attempt" in row["event"]:
                    row["event"]["attempt"] = f"{new_pid}-{row['event']['attempt']}"
                batch.append(codec.decode_envelope(json.dumps(row)))
            made += len(batch)
            yield batch


def measure_fold(total: int) -> dict[str, Any]:
    world = World()
    decode_s = fold_s = 0.0
    count = 0
    began = time.perf_counter()
    batches = recorded_events(total)
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        t1 = time.perf_counter()
        decode_s += t1 - t0
        if batch is None:
            break
        for envelope in batch:
            world.apply(envelope, index=False, advance=False)
        fold_s += time.perf_counter() - t1
        count += len(batch)
    t0 = time.perf_counter()
    world.evict_terminal(list(world.pipelines))
    world.reindex()
    fold_s += time.perf_counter() - t0
    return {
        "events": count,
        "fold_s": round(fold_s, 3),
        "decode_and_copy_s": round(decode_s, 3),
        "events_per_s": round(count / fold_s),
        "wall_s": round(time.perf_counter() - began, 3),
        "rss_mb": round(psutil.Process().memory_info().rss / 1e6, 1),
    }


def _active_requests(count: int) -> list[AppendRequest]:
    spec = validate_pipeline({"name": "r1-active", "stages": {"a": {"kind": "noop"}}})
    requests = []
    for _ in range(count):
        pid = new_id()
        placed = StagePlaced(pipeline_id=pid, stage="a", attempt=new_id(), attempt_number=1, agent=AGENT)
        events = (NewEvent(event_id=new_id(), event=PipelineSubmitted(pipeline_id=pid, spec=spec)),)
        events += (NewEvent(event_id=new_id(), event=placed),)
        requests.append(AppendRequest(stream_id=pipeline_stream(pid), expected_version=0, events=events, metadata=META))
    return requests


async def _fill(url: str, nats: EmbeddedNats, ended_events: int, active: int) -> int:
    pool = await connect_pool(url, min_size=1, max_size=4)
    try:
        await migrate(pool)
        store = PostgresEventStore(pool)
        agent = AgentRegistered(agent=AGENT, hostname="r1-host", cpu_slots=active + 10)
        await store.append(f"agent-{AGENT}", 0, [NewEvent(event_id=new_id(), event=agent)], META)
        written = 1
        chunk: list[AppendRequest] = []
        for batch in recorded_events(ended_events):
            events = tuple(NewEvent(event_id=e.event_id, event=e.event) for e in batch)
            chunk.append(AppendRequest(stream_id=batch[0].stream_id, expected_version=0, events=events, metadata=META))
            written += len(events)
            if len(chunk) >= 500:
                await store.append_many(chunk)
                chunk = []
        requests = _active_requests(active)
        for i in range(0, len(requests), 500):
            await store.append_many(requests[i : i + 500])
        if chunk:
            await store.append_many(chunk)
        written += 2 * active
    finally:
        await pool.close()
    nc = await connect_nats(nats.url, name="bench-r1", user=nats.user, password=nats.password)
    try:
        await ensure_topology(nc.jetstream(), agents=[AGENT])
    finally:
        await nc.close()
    return written


def _scheduler_run(url: str, nats: EmbeddedNats, home: Path, timeout_s: float = 300) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERLYARD_")}
    env |= {
        "VERLYARD_HOME": str(home),
        "VERLYARD_DATABASE_URL": url,
        "VERLYARD_NATS_URL": nats.url,
        "VERLYARD_NATS_USER": nats.user,
        "VERLYARD_NATS_PASSWORD": nats.password,
        "VERLYARD_LOG_FORMAT": "json",
    }
    home.mkdir(parents=True, exist_ok=True)
    log_path = home / "scheduler.log"
    spawned = time.monotonic()
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "verlyard_shared.cli", "scheduler"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        loaded: dict[str, Any] | None = None
        first: dict[str, Any] | None = None
        rss_mb = 0.0
        first_wall_s = 0.0
        deadline = spawned + timeout_s
        while first is None and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the scheduler exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            for line in log_path.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == "scheduler_loaded":
                    loaded = record
                elif record.get("event") == "scheduler_first_command":
                    first = record
            if first is not None:
                first_wall_s = time.monotonic() - spawned
                break
            if loaded is not None:
                rss_mb = max(rss_mb, psutil.Process(proc.pid).memory_info().rss / 1e6)
            time.sleep(0.02)
        if first is None or loaded is None:
            raise RuntimeError(f"no first command in {timeout_s} s:\n{log_path.read_text()[-3000:]}")
        rss_mb = max(rss_mb, psutil.Process(proc.pid).memory_info().rss / 1e6)
        return {
            "load_s": loaded["load_s"],
            "loaded": {k: loaded[k] for k in LOADED_FIELDS if k in loaded},
            "first_command_s": first["seconds"],
            "first_command_from_spawn_s": round(first_wall_s, 3),
            "rss_mb": round(rss_mb, 1),
        }
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def measure_restart(ended_events: int, active: int, restarts: int) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="verlyard-r1-"))
    root.chmod(0o755)  # the embedded Postgres runs as an unprivileged user when we are root
    pg = EmbeddedPostgres(root / "pg", port=free_port())
    nats = EmbeddedNats(root / "nats", free_port(), user="verlyard", password=secrets.token_hex(16))
    try:
        pg.init()
        pg.start()
        nats.start()
        url = pg.create_database("r1")
        t0 = time.perf_counter()
        written = asyncio.run(_fill(url, nats, ended_events, active))
        fill_s = time.perf_counter() - t0
        runs = [_scheduler_run(url, nats, root / f"home-{i}") for i in range(restarts)]
        return {"events_in_log": written, "fill_s": round(fill_s, 1), "runs": runs}
    finally:
        nats.kill()
        pg.kill()
        shutil.rmtree(root, ignore_errors=True)


async def run(client: Client, quick: bool) -> Result:
    del client  # R1 runs its own Postgres, nats-server and scheduler
    total = 100_000 if quick else 1_000_000
    active = 1_000 if quick else 10_000
    restarts = 1 if quick else 3
    result = Result(NAME, "fold recorded events; scheduler restart with active pipelines", {})
    result.parameters = {"fold_events": total, "active_pipelines": active, "restarts": restarts}
    fold = await asyncio.to_thread(measure_fold, total)
    restart = await asyncio.to_thread(measure_restart, total, active, restarts)
    result.raw = {"fold": fold, "restart": restart}
    runs = restart["runs"]
    first = sorted(r["first_command_s"] for r in runs)[len(runs) // 2]
    from_spawn = sorted(r["first_command_from_spawn_s"] for r in runs)[len(runs) // 2]
    rss = max(r["rss_mb"] for r in runs)
    result.check("fold events/s", ">= 200,000/s", fold["events_per_s"], lambda v: v >= 200_000, unit="/s")
    result.check(f"restart with {active} active: first command (median)", "<= 2 s", first, lambda v: v <= 2.0, unit="s")
    result.check("  same, from process spawn (imports, connects)", "(reported)", from_spawn, lambda v: True, unit="s")
    result.check("scheduler RSS after the restart (max)", "<= 200 MB", rss, lambda v: v <= 200, unit="MB")
    result.notes.append(
        f"fold: {fold['events']} events in {fold['fold_s']} s (+{fold['decode_and_copy_s']} s decoding the copies); "
        f"restart log: {restart['events_in_log']} events, load_s {[r['load_s'] for r in runs]}"
    )
    return result

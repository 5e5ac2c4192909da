"""Bench harness (edge): one `verlyard up` stack in a temp home, an HTTP client, stats and result files.

Latencies come from the event log's `recorded_at` (server-side, what the orchestrator itself adds) and,
beside them, from the client's wall clock (what a user sees, including HTTP and the completion poll).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.http import LeanClient
from verlyard_shared.embedded.nats import find_nats_server
from verlyard_shared.embedded.ports import free_port
from verlyard_shared.embedded.postgres import postgres_bin_dir

RESULTS_DIR = Path(__file__).parent / "results"
TERMINAL = {"pipeline.succeeded", "pipeline.failed", "pipeline.cancelled"}
POLL_S = 0.005
"""Completion poll interval: short enough for the client wall time, long enough not to load 2 cores much."""


# ---- stats -----------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank-with-interpolation percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary(values: Sequence[float]) -> dict[str, float | int]:
    return {
        "n": len(values),
        "p50": round(percentile(values, 50), 3),
        "p95": round(percentile(values, 95), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(max(values), 3) if values else float("nan"),
        "min": round(min(values), 3) if values else float("nan"),
    }


def parse_ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# ---- results ---------------------------------------------------------------------------------------------


@dataclass
class Check:
    """One target of issue 8's table and whether the measured figure met it."""

    what: str
    target: str
    measured: str
    passed: bool | None
    """None for a figure that is reported without a target."""


@dataclass
class Result:
    name: str
    title: str
    parameters: dict[str, Any]
    raw: dict[str, Any] = field(default_factory=dict)
    summaries: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, what: str, target: str, measured: float, ok: Callable[[float], bool], unit: str = "ms") -> None:
        passed = None if target == "(reported)" else bool(ok(measured))
        self.checks.append(Check(what, target, f"{measured:.1f} {unit}".strip(), passed))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_mb() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def machine_info() -> dict[str, Any]:
    import verlyard_shared

    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_mb": _mem_total_mb(),
        "loadavg_at_start": os.getloadavg(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "verlyard": verlyard_shared.__version__,
        "postgres": _version([str(postgres_bin_dir() / "postgres"), "--version"]),
        "nats_server": _version([str(find_nats_server()), "--version"]),
    }


def write_result(result: Result, machine: dict[str, Any], quick: bool) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{result.name}.json"
    doc = {
        "name": result.name,
        "title": result.title,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": machine | {"loadavg_at_end": os.getloadavg()},
        "parameters": result.parameters,
        "summary": result.summaries,
        "checks": [c.__dict__ for c in result.checks],
        "notes": result.notes,
        "raw": result.raw,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


# ---- the stack -------------------------------------------------------------------------------------------


class Stack:
    """`verlyard up` in a fresh temp home on a free port, with a wide local agent; stopped by `close`."""

    def __init__(self, agent_slots: int = 64, extra_env: dict[str, str] | None = None) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="verlyard-bench-"))
        self.extra_env = dict(extra_env or {})
        # Outside a 0700 tmp root: the embedded Postgres runs as an unprivileged user when we are root.
        self.home.chmod(0o755)
        self.port = free_port()
        self.agent_slots = agent_slots
        self.process: subprocess.Popen[bytes] | None = None
        self.token = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 180.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VERLYARD_")} | self.extra_env
        log = (self.home / "up-console.log").open("ab")
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "verlyard_shared.cli", "up"),
                *("--home", str(self.home), "--port", str(self.port), "--agent-slots", str(self.agent_slots)),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"verlyard up exited {self.process.returncode}:\n{self.console()}")
            token_file = self.home / "admin-token"
            try:
                if token_file.exists():
                    self.token = token_file.read_text().strip()
                    headers = {"Authorization": f"Bearer {self.token}"}
                    ready = httpx.get(f"{self.base_url}/readyz", timeout=2, headers=headers)
                    agents = httpx.get(f"{self.base_url}/api/v1/agents", timeout=2, headers=headers)
                    if ready.status_code == 200 and agents.status_code == 200 and _has_agent(agents.json()):
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"verlyard up did not become ready in {timeout_s} s:\n{self.console()}")

    def console(self) -> str:
        parts = []
        for path in [self.home / "up-console.log", *sorted((self.home / "logs").glob("*.log"))]:
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-20:]
                parts.append(f"--- {path.name}\n" + "\n".join(tail))
        return "\n".join(parts)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # what Ctrl-C sends: `up` stops its children in order
            try:
                self.process.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        shutil.rmtree(self.home, ignore_errors=True)


def _has_agent(body: Any) -> bool:
    items = body.get("items", body) if isinstance(body, dict) else body
    return isinstance(items, list) and len(items) > 0


# ---- the client ------------------------------------------------------------------------------------------


class Client:
    """The few API calls the benchmarks make, over a lean pooled client (bench/http.py)."""

    def __init__(self, stack: Stack, connections: int = 16) -> None:
        self.stack_home = stack.home
        self.base_url = stack.base_url
        self.token = stack.token
        self.http = LeanClient(
            "127.0.0.1", stack.port, headers={"Authorization": f"Bearer {stack.token}"}, connections=connections
        )
        self.stream_http = httpx.AsyncClient(
            base_url=stack.base_url, headers={"Authorization": f"Bearer {stack.token}"}, timeout=30
        )
        """For the live stream (L1) only: server-sent events, which the lean client does not read."""

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.stream_http.aclose()

    async def submit(self, spec: dict[str, Any]) -> str:
        response = await self.http.post_json("/api/v1/pipelines", spec)
        if response.status != 201:
            raise RuntimeError(f"submit answered {response.status}: {response.text}")
        return str(response.json()["id"])

    async def get(self, pipeline_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/api/v1/pipelines/{pipeline_id}")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    async def events_after(self, pipeline_id: str, after: int) -> list[dict[str, Any]]:
        response = await self.http.get(f"/api/v1/pipelines/{pipeline_id}/events", {"after": after, "limit": 500})
        response.raise_for_status()
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    async def wait_events(
        self, pipeline_id: str, timeout_s: float = 60.0, poll_s: float = POLL_S
    ) -> list[dict[str, Any]]:
        """The pipeline's events up to and including its terminal event (polls the audit log)."""
        events: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            new = await self.events_after(pipeline_id, events[-1]["version"] if events else 0)
            events.extend(new)
            if any(e["type"] in TERMINAL for e in new):
                return events
            await asyncio.sleep(poll_s)
        raise TimeoutError(f"pipeline {pipeline_id} did not end in {timeout_s} s; saw {[e['type'] for e in events]}")


def first(events: list[dict[str, Any]], type_: str, stage: str | None = None) -> dict[str, Any] | None:
    for event in events:
        if event["type"] == type_ and (stage is None or event["data"].get("stage") == stage):
            return event
    return None


def at(events: list[dict[str, Any]], type_: str, stage: str | None = None) -> float:
    event = first(events, type_, stage)
    if event is None:
        raise LookupError(f"no {type_} {stage or ''} in {[e['type'] for e in events]}")
    return parse_ts(event["recorded_at"])


def stage(kind: str = "noop", needs: Sequence[str] = (), **with_: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"kind": kind, "with": {"sleep_ms": 0} | with_}
    if needs:
        spec["needs"] = list(needs)
    return spec

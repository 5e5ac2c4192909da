"""Bench H1 (edge): the HTTP API under N concurrent clients: GET pipeline, then submit; req/s and p99."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.harness import Client, Result, stage, summary

NAME = "H1"


async def _hammer(call: Callable[[], Awaitable[None]], clients: int, seconds: float) -> tuple[list[float], float, int]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            start = time.perf_counter()
            try:
                await call()
            except Exception:  # any failed request counts as an error; the run goes on
                errors += 1
                continue
            latencies.append((time.perf_counter() - start) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies, time.perf_counter() - start, errors


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(text: str) -> dict[str, float]:
    """wrk's `--latency` report -> req/s, p50/p75/p90/p99 in ms, requests, errors (non-2xx + socket)."""
    out: dict[str, float] = {}
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        out["req_per_s"] = float(m.group(1))
    for pct, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE):
        out[f"p{pct}"] = round(float(value) * _UNITS[unit], 3)
    if m := re.search(r"(\d+) requests in", text):
        out["requests"] = float(m.group(1))
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", text))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        errors += sum(int(g) for g in m.groups())
    out["errors"] = float(errors)
    return out


def _wrk(url: str, token: str, seconds: float, clients: int, body: dict[str, Any] | None = None) -> dict[str, float]:
    args = ["wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--latency", "-H", f"Authorization: Bearer {token}"]
    with tempfile.TemporaryDirectory() as tmp:
        if body is not None:
            script = Path(tmp) / "post.lua"
            script.write_text(
                'wrk.method = "POST"\n'
                f"wrk.body = {json.dumps(json.dumps(body))}\n"
                'wrk.headers["Content-Type"] = "application/json"\n'
            )
            args += ["-s", str(script)]
        done = subprocess.run([*args, url], capture_output=True, text=True, timeout=seconds + 60, check=True)
    return parse_wrk(done.stdout)


QUEUED_BODY: dict[str, Any] = {
    "name": "h1-queued",
    "stages": {"a": stage() | {"resources": {"labels": {"pool": "h1-queue"}}}},
}
RUNNING_BODY: dict[str, Any] = {"name": "h1-submit", "stages": {"a": stage()}}


async def _settle(client: Client, timeout_s: float = 180.0) -> None:
    """Wait until no pipeline is pending or running (the previous run's backlog has drained)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = await client.http.get("/api/v1/pipelines", params={"status": "pending,running", "limit": 1})
        response.raise_for_status()
        if not response.json()["items"]:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"pipelines still pending or running after {timeout_s} s")


async def _run_wrk(client: Client, result: Result, seconds: float, clients: int, target: str) -> Result:
    base, token = client.base_url, client.token
    get_url = f"{base}/api/v1/pipelines/{target}"
    solo = await asyncio.to_thread(_wrk, get_url, token, min(seconds, 3.0), 1)
    get = await asyncio.to_thread(_wrk, get_url, token, seconds, clients)
    url = f"{base}/api/v1/pipelines"
    # Submits that the scheduler and the agent then run at once, on the same 2 cores (W4's work too).
    running = await asyncio.to_thread(_wrk, url, token, seconds, clients, RUNNING_BODY)
    await _settle(client)
    # Submits into a full cluster: the API's intake. Each pipeline is validated, appended, projected,
    # relayed and decided by the scheduler, then waits (no agent has the label), as a queue does.
    queued = await asyncio.to_thread(_wrk, url, token, seconds, clients, QUEUED_BODY)
    result.raw = {"tool": "wrk", "get_one_client": solo, "get": get, "submit": queued, "submit_running": running}
    result.summaries = dict(result.raw)
    del result.summaries["tool"]
    result.check("GET pipeline req/s", ">= 1500/s", get["req_per_s"], lambda v: v >= 1500, "/s")
    result.check("GET pipeline p99", "(reported)", get.get("p99", float("nan")), lambda v: v == v)
    result.check("submit req/s (intake, pipelines queue)", ">= 300/s", queued["req_per_s"], lambda v: v >= 300, "/s")
    result.check("submit p99 (intake)", "(reported)", queued.get("p99", float("nan")), lambda v: v == v)
    result.check("submit req/s while each pipeline runs", "(reported)", running["req_per_s"], lambda v: v == v, "/s")
    result.check(
        "submit p99 while each pipeline runs", "(reported)", running.get("p99", float("nan")), lambda v: v == v
    )
    errors = get["errors"] + queued["errors"] + running["errors"]
    result.check("errors (GET + submits)", "0", errors, lambda v: v == 0, unit="")
    result.notes.append(
        f"load from wrk (C, 1 thread, {clients} connections) on the same 2 cores as the stack; intake submits "
        "pipelines no agent can take (label pool=h1-queue), so they wait pending with a reason; the second "
        "submit run's pipelines are run by the scheduler and agent at once (their throughput is W4's)"
    )
    return result


async def run(client: Client, quick: bool) -> Result:
    clients = 16
    seconds = 5.0 if quick else 10.0
    result = Result(NAME, "HTTP API throughput", {"clients": clients, "seconds_each": seconds})
    target = await client.submit({"name": "h1-target", "stages": {"a": stage()}})
    await client.wait_events(target)
    if shutil.which("wrk") is not None:  # a C load generator: the Python client would be the bottleneck
        return await _run_wrk(client, result, seconds, clients, target)

    async def get() -> None:
        await client.get(target)

    async def submit() -> None:
        await client.submit(QUEUED_BODY)

    # One client first: the latency of a lone request, without queueing behind the other clients.
    solo_lat, solo_s, solo_err = await _hammer(get, 1, min(seconds, 3.0))
    get_lat, get_s, get_err = await _hammer(get, clients, seconds)
    sub_lat, sub_s, sub_err = await _hammer(submit, clients, seconds)
    get_rps, sub_rps = len(get_lat) / get_s, len(sub_lat) / sub_s
    result.raw = {
        "solo_get_latency_ms": solo_lat,
        "solo_get_errors": solo_err,
        "solo_get_elapsed_s": solo_s,
        "get_latency_ms": get_lat,
        "get_errors": get_err,
        "get_elapsed_s": get_s,
        "submit_latency_ms": sub_lat,
        "submit_errors": sub_err,
        "submit_elapsed_s": sub_s,
    }
    result.summaries = {
        "get_one_client": summary(solo_lat) | {"req_per_s": round(len(solo_lat) / solo_s, 1), "errors": solo_err},
        "get": summary(get_lat) | {"req_per_s": round(get_rps, 1), "errors": get_err},
        "submit": summary(sub_lat) | {"req_per_s": round(sub_rps, 1), "errors": sub_err},
    }
    result.check("GET pipeline req/s", ">= 1500/s", get_rps, lambda v: v >= 1500, "/s")
    result.check("GET pipeline p99", "(reported)", summary(get_lat)["p99"], lambda v: v == v)
    result.check("submit req/s", ">= 300/s", sub_rps, lambda v: v >= 300, "/s")
    result.check("submit p99", "(reported)", summary(sub_lat)["p99"], lambda v: v == v)
    result.notes.append(
        "wrk is not installed (scripts/system-deps.sh installs it): one Python client process (bench/http.py, 16 "
        "connections) shares the 2 cores with the stack; the client itself costs CPU, so req/s is a lower "
        "bound of what the API serves"
    )
    return result

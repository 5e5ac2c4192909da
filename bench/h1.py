"""Bench H1 (edge): the HTTP API under N concurrent clients: GET pipeline, then submit; req/s and p99."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

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


async def run(client: Client, quick: bool) -> Result:
    clients = 16
    seconds = 5.0 if quick else 10.0
    result = Result(NAME, "HTTP API throughput", {"clients": clients, "seconds_each": seconds})
    target = await client.submit({"name": "h1-target", "stages": {"a": stage()}})
    await client.wait_events(target)

    async def get() -> None:
        await client.get(target)

    async def submit() -> None:
        await client.submit({"name": "h1-submit", "stages": {"a": stage()}})

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
        "one Python client process (httpx, 16 connections) shares the 2 cores with the stack; the client "
        "itself costs CPU, so req/s is a lower bound of what the API serves"
    )
    return result

"""Bench tool (edge): how long a message waits in a pull consumer's reader, nats-py `fetch(n)` vs
`verlyard_shared.nats_fetch.fetch_ready` (ADR 0019), on a throwaway embedded nats-server.

The reader loops as the scheduler's report inbox does (batch 1000, 0.5 s requests); the writer sends
bursts of three messages 0-6 ms apart with 10-200 ms between bursts. Each message's latency is publish
start -> handed to the reader; each run has a fresh stream and consumer. Writes bench/results/fetch-stall.json.

    .venv/bin/python -m bench.fetch_stall --bursts 100 --runs 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from bench.harness import summary
from verlyard_shared.embedded.nats import EmbeddedNats
from verlyard_shared.embedded.ports import free_port
from verlyard_shared.nats_fetch import fetch_ready
from verlyard_shared.nats_pull import OpenPull

RESULTS = Path(__file__).resolve().parent / "results" / "fetch-stall.json"
Reader = Callable[[JetStreamContext.PullSubscription], Awaitable[list[Msg]]]
_open: dict[int, OpenPull] = {}


def _open_pull(sub: JetStreamContext.PullSubscription) -> Awaitable[list[Msg]]:
    """The scheduler's report inbox: one pull request kept open per subscription."""
    pull = _open.setdefault(id(sub), OpenPull(sub, batch=1000, expires_s=0.5))
    return pull.next_batch(0.5)


READERS: dict[str, Reader] = {
    "nats-py fetch(1000, 0.5)": lambda sub: sub.fetch(1000, timeout=0.5),
    "fetch_ready(1000, 0.5)": lambda sub: fetch_ready(sub, 1000, 0.5),
    "OpenPull(1000, 0.5)": _open_pull,
}


async def measure(js: JetStreamContext, stream: str, read: Reader, bursts: int, rng: random.Random) -> list[float]:
    await js.add_stream(name=stream, subjects=[f"{stream.lower()}.>"])
    await js.add_consumer(stream, durable_name="reader", ack_policy="explicit")
    sub = await js.pull_subscribe_bind(durable="reader", stream=stream)
    arrived: dict[bytes, float] = {}

    async def reader() -> None:
        while True:
            try:
                msgs = await read(sub)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in msgs:
                arrived[msg.data] = time.perf_counter()
                await msg.ack()

    task = asyncio.create_task(reader())
    await asyncio.sleep(1.0)
    sent: dict[bytes, float] = {}
    for n in range(bursts):
        burst = [f"{n}-{k}".encode() for k in range(3)]
        for key in burst:
            sent[key] = time.perf_counter()
            await js.publish(f"{stream.lower()}.x", key)
            await asyncio.sleep(rng.uniform(0, 0.006))
        await asyncio.sleep(rng.uniform(0.01, 0.2))
        while not all(k in arrived for k in burst):
            await asyncio.sleep(0.001)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await sub.unsubscribe()
    return [(arrived[k] - sent[k]) * 1000 for k in sent]


async def main(bursts: int, runs: int) -> dict[str, Any]:
    password = secrets.token_urlsafe(16)
    with (
        tempfile.TemporaryDirectory() as folder,
        EmbeddedNats(Path(folder), free_port(), user="u", password=password) as srv,
    ):
        nc = await nats.connect(srv.url, user="u", password=password)
        js = nc.jetstream()
        results: dict[str, Any] = {}
        latencies: dict[str, list[float]] = {name: [] for name in READERS}
        for run in range(runs):  # a fresh stream and consumer per run, the readers taking turns
            for i, (name, read) in enumerate(READERS.items()):
                stream = f"STALL{run}X{i}"
                latencies[name] += await measure(js, stream, read, bursts, random.Random(run))
                await js.delete_stream(stream)
        for name, values in latencies.items():
            results[name] = summary(values) | {"over_50_ms": sum(v > 50 for v in values)}
        await nc.close()
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="how long a message waits in a pull consumer's reader (ADR 0019)")
    parser.add_argument("--bursts", type=int, default=100, help="bursts of three per run")
    parser.add_argument("--runs", type=int, default=6)
    args = parser.parse_args()
    out = asyncio.run(main(args.bursts, args.runs))
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record = {"date": now, "bursts": args.bursts, "runs": args.runs, "readers": out}
    RESULTS.write_text(json.dumps(record, indent=1) + "\n")
    for name, stats in out.items():
        print(f"{name:28} {stats}")

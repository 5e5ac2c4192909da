"""Soak entry point (edge): `python -m soak [--scenario T1[,T2...]] [--pipelines N] [--faults N] [--quick]`.

Each scenario gets a fresh stack, runs its load and faults, waits for the pipelines to settle, then
checks the event log and read models (soak/checker.py), prints a Jepsen-style summary, writes
soak/results/<scenario>.json and exits non-zero on any lost, duplicated or unexpected finding.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

from soak.checker import Event, Fault, Verdict, check, render, summary
from soak.harness import Load, NetNs, SoakStack, StackConfig, pipeline_spec
from soak.loader import load, projector_caught_up
from soak.scenarios import SCENARIOS, Bar, Run, Scenario

RESULTS_DIR = Path(__file__).parent / "results"


async def _probe_loop(load_: Load, every_s: float, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await load_.probe()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_s)


async def _submit_all(run: Run, scenario: Scenario, pipelines: int, spread_s: float) -> None:
    poison_at = set(run.rng.sample(range(pipelines), min(scenario.poison, pipelines)))
    tasks = []
    for i in range(pipelines):
        poison = i in poison_at
        spec = pipeline_spec(f"soak-{scenario.name.lower()}-{i:04d}", run.rng, poison=poison)
        tasks.append(asyncio.create_task(run.load.submit(spec, expect="failed" if poison else "succeeded")))
        await asyncio.sleep(spread_s / max(1, pipelines))
    await asyncio.gather(*tasks)


async def _published(
    stack: SoakStack, events: list[Event], faults: list[Fault]
) -> tuple[tuple[int, int, int], float | None]:
    """How many committed events VY_EVENTS holds (by Nats-Msg-Id), how many twice, and the p99 of
    stored-at minus recorded-at (the relay's commit-to-publish lag) in ms over the events committed
    outside fault windows (a fault until 10 s after its component was restarted: the relay is down
    then by design, and catches up after)."""
    from verlyard_shared import subjects
    from verlyard_shared.nats_topology import connect_nats

    nc = await connect_nats(stack.nats_url, name="soak-check", user=stack.nats.user, password=stack.nats.password)
    try:
        js = nc.jetstream()
        info = await js.stream_info(subjects.STREAM_EVENTS)
        total = info.state.messages
        sub = await js.subscribe(subjects.EVENTS_ALL, stream=subjects.STREAM_EVENTS, ordered_consumer=True)
        seen: dict[str, int] = {}
        lags: list[float] = []
        by_id = {e.event_id: e for e in events}
        got = 0
        deadline = time.monotonic() + 120
        while got < total and time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=5)
            except Exception:
                break
            got += 1
            event_id = (msg.headers or {}).get("Nats-Msg-Id", "")
            seen[event_id] = seen.get(event_id, 0) + 1
            event = by_id.get(event_id)
            if event is not None and msg.metadata is not None and not _in_fault(event.recorded_at, faults):
                lags.append(msg.metadata.timestamp.timestamp() - event.recorded_at)
        await sub.unsubscribe()
    finally:
        await nc.close()
    found = sum(1 for e in events if e.event_id in seen)
    repeats = sum(n - 1 for n in seen.values() if n > 1)
    lags.sort()
    p99 = round(lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1000, 1) if lags else None
    return (found, len(events), repeats), p99


def _in_fault(t: float, faults: list[Fault]) -> bool:
    return any(f.at <= t <= (f.back_at or f.at) + 10.0 for f in faults)


def _machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "loadavg": os.getloadavg(),
    }


async def run_scenario(
    scenario: Scenario,
    *,
    pipelines: int,
    faults: int,
    seed: int,
    quick: bool,
    settle_s: float,
    keep: bool = False,
    slots: int | None = None,
    spread_s: float | None = None,
) -> tuple[Verdict, list[Bar], dict[str, Any]]:
    stack = SoakStack(
        StackConfig(
            slots=slots or scenario.slots,
            netns_agents=scenario.netns_agents,
            proxy_agent=scenario.proxy_agent,
            proxy_scheduler_db=scenario.proxy_scheduler_db,
        )
    )
    t0 = time.monotonic()
    run: Run | None = None
    try:
        await asyncio.to_thread(stack.start)
        started_s = time.monotonic() - t0
        async with Load(stack) as load_:
            run = Run(stack, load_, random.Random(seed), faults, quick)
            stop = asyncio.Event()
            prober = asyncio.create_task(_probe_loop(load_, scenario.probe_every_s, stop))
            spread = max(10.0, scenario.seconds_per_fault * faults) if faults else 10.0
            spread = spread if spread_s is None else spread_s
            submitter = asyncio.create_task(_submit_all(run, scenario, pipelines, spread))
            await scenario.inject(run)
            faults_done_s = time.monotonic() - t0
            await submitter
            settled = await load_.settled(settle_s)
            stop.set()
            await prober
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not await projector_caught_up(stack.database_url):
            await asyncio.sleep(0.5)
        events, model = await load(stack.database_url)
        run.events = events
        if scenario.name in ("T2", "T6"):
            run.extra["published"], run.extra["relay_lag_p99_ms"] = await _published(stack, events, load_.faults)
        verdict = check(events, load_.submissions, model, load_.faults, load_.probes)
        if stack.proxies:
            run.extra["proxies"] = {name: p.stats().__dict__ for name, p in stack.proxies.items()}
        bars = scenario.bars(run, verdict)
        info = {
            "stack_start_s": round(started_s, 1),
            "faults_done_s": round(faults_done_s, 1),
            "settled": settled,
            "wall_s": round(time.monotonic() - t0, 1),
            "faults": [f.__dict__ for f in load_.faults],
            "submit_latency_s": summary([p.latency_s for p in load_.probes if p.status in (200, 201)]),
            "restarts": {name: s.starts - 1 for name, s in stack.services.items()},
            "submit_spread_s": spread,
            "slots_per_agent": stack.config.slots,
            "agents": stack.config.agents,
        }
        if stack.proxies:
            info["proxies"] = run.extra["proxies"]
        if not settled:
            run.notes.append(f"not every pipeline ended within {settle_s} s of the last submission")
        info["notes"] = run.notes
        return verdict, bars, info
    except BaseException:
        print(stack.console(), file=sys.stderr)
        raise
    finally:
        await asyncio.to_thread(stack.close, keep)


def _bars_table(bars: list[Bar]) -> str:
    rows = [("check", "target", "measured", "")]
    rows += [(b.what, b.target, b.measured, {True: "PASS", False: "MISS", None: "-"}[b.passed]) for b in bars]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def write_result(
    scenario: Scenario, verdict: Verdict, bars: list[Bar], info: dict[str, Any], params: dict[str, Any]
) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{scenario.name}.json"
    doc = {
        "scenario": scenario.name,
        "title": scenario.title,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": _machine(),
        "parameters": params,
        "verdict": verdict.as_dict(),
        "bars": [b.__dict__ for b in bars],
        "run": info,
    }
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m soak", description="verlyard soak and fault injection (T1-T15)")
    parser.add_argument("--scenario", default="", help=f"comma-separated, default all: {','.join(SCENARIOS)}")
    parser.add_argument("--pipelines", type=int, default=None, help="pipelines per scenario (default 30, quick 8)")
    parser.add_argument("--faults", type=int, default=None, help="faults per scenario (default: the T-table's)")
    parser.add_argument("--slots", type=int, default=None, help="CPU slots per agent (default: the scenario's)")
    parser.add_argument("--spread", type=float, default=None, help="submit the pipelines over this many seconds")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="fewer pipelines and faults")
    parser.add_argument("--settle", type=float, default=240.0, help="seconds to wait for pipelines to end")
    parser.add_argument("--keep", action="store_true", help="keep the temp home (logs, data) for inspection")
    parser.add_argument("--no-write", action="store_true", help="do not write soak/results/<scenario>.json")
    args = parser.parse_args(argv)
    names = [n.strip().upper() for n in args.scenario.split(",") if n.strip()] or list(SCENARIOS)
    for name in names:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name}; known: {', '.join(SCENARIOS)}")
    failed = []
    for name in names:
        scenario = SCENARIOS[name]
        if scenario.netns_agents and NetNs.available() is not None:
            print(f"soak {name}: SKIPPED ({NetNs.available()})", flush=True)
            continue
        seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
        pipelines = args.pipelines or (8 if args.quick else 30)
        faults = args.faults if args.faults is not None else scenario.default_faults
        if args.quick and args.faults is None:
            faults = min(faults, 3)
        slots = args.slots or scenario.slots
        params = {"pipelines": pipelines, "faults": faults, "seed": seed, "quick": args.quick, "slots": slots}
        if args.spread is not None:
            params["spread_s"] = args.spread
        print(f"soak {name}: {scenario.title} ({params})", flush=True)
        verdict, bars, info = asyncio.run(
            run_scenario(
                scenario,
                pipelines=pipelines,
                faults=faults,
                seed=seed,
                quick=args.quick,
                settle_s=args.settle,
                keep=args.keep,
                slots=slots,
                spread_s=args.spread,
            )
        )
        print(render(name, verdict))
        print(_bars_table(bars))
        for note in info.get("notes", []):
            print(f"  note: {note}")
        if not args.no_write:
            print(f"  -> {write_result(scenario, verdict, bars, info, params)}")
        print(flush=True)
        if not verdict.ok:
            failed.append(name)
    if failed:
        print(f"soak: INVALID in {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

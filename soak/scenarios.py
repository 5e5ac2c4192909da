"""Soak scenarios (edge): each injects one kind of fault on a schedule while pipelines run (docs/reliability.md).

A scenario is an async `inject(run)` that breaks and restarts components through the harness and
records each fault, plus `bars(run, verdict)`: its targets from the T-table, measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from soak.checker import REPORT_EVENTS, Event, Fault, Verdict
from soak.harness import Load, SoakStack
from soak.proxy import Mode


@dataclass
class Bar:
    what: str
    target: str
    measured: str
    passed: bool | None


@dataclass
class Run:
    """What a scenario gets: the stack, the load, a seeded rng and its size."""

    stack: SoakStack
    load: Load
    rng: random.Random
    faults: int
    quick: bool
    events: list[Event] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def fault(self, kind: str, target: str, at: float, back_at: float | None) -> None:
        self.load.faults.append(Fault(kind, target, at, back_at))


@dataclass
class Scenario:
    name: str
    title: str
    inject: Callable[[Run], Awaitable[None]]
    bars: Callable[[Run, Verdict], list[Bar]]
    poison: int = 0
    """How many of the pipelines carry a poison stage (expected to fail)."""
    default_faults: int = 10
    probe_every_s: float = 0.5
    netns_agents: int = 0
    """Agents run in their own network namespace (the last ones)."""
    slots: int = 4
    """CPU slots per agent. T7/T7N give every agent room for the whole load, so "a new attempt within
    2 s" measures the scheduler's decision, not a queue behind a full cluster (docs/reliability.md)."""
    proxy_agent: bool = False
    proxy_scheduler_db: bool = False
    seconds_per_fault: float = 4.0
    """Roughly how long one fault takes to inject: pipelines are submitted over faults x this."""


# ---- helpers ---------------------------------------------------------------------------------------------


def _max(verdict: Verdict, key: str) -> float | None:
    value = verdict.recovery.get(key, {}).get("max")
    return float(value) if value is not None else None


def _bar_max(verdict: Verdict, key: str, limit: float, what: str, target: str) -> Bar:
    got = _max(verdict, key)
    if got is None:
        return Bar(what, target, "not observed", None)
    passed = None if target == "(reported)" else got < limit
    return Bar(what, target, f"max {got:.2f} s (p50 {verdict.recovery[key].get('p50')} s)", passed)


def _common(verdict: Verdict) -> list[Bar]:
    return [
        Bar("lost", "0", str(verdict.lost), verdict.lost == 0),
        Bar("duplicated", "0", str(verdict.duplicated), verdict.duplicated == 0),
        Bar("unexpected", "0", str(verdict.unexpected), verdict.unexpected == 0),
        Bar(
            "completed",
            f"{verdict.acknowledged}",
            f"{verdict.completed}/{verdict.acknowledged}",
            verdict.completed == verdict.acknowledged,
        ),
    ]


async def _busy_agent(run: Run, among: set[str] | None = None) -> str | None:
    """An agent (of `among`, default any) that holds a running attempt right now (the API's read model)."""
    try:
        response = await run.load.http.get("/api/v1/agents")
        items = response.json().get("items", [])
    except Exception:
        return None
    busy = [a["id"] for a in items if any(t["status"] == "running" for t in a.get("attempts", []))]
    busy = [a for a in busy if among is None or a in among]
    return run.rng.choice(sorted(busy)) if busy else None


async def _gap(run: Run, low: float, high: float) -> None:
    await asyncio.sleep(run.rng.uniform(low, high))


# ---- T1: scheduler kill -9 -------------------------------------------------------------------------------


async def inject_t1(run: Run) -> None:
    scheduler = run.stack.services["scheduler"]
    for _ in range(run.faults):
        await _gap(run, 2.0, 5.0)
        at = time.time()
        scheduler.kill()
        await asyncio.sleep(run.rng.uniform(0.1, 1.0))
        scheduler.start()
        run.fault("scheduler_kill", "scheduler", at, time.time())


def bars_t1(run: Run, verdict: Verdict) -> list[Bar]:
    return [
        *_common(verdict),
        _bar_max(
            verdict,
            "scheduler_kill.first_scheduler_event_s",
            2.0,
            "first scheduler event after restart",
            "< 2 s after the process starts (includes Python start-up)",
        ),
    ]


# ---- T2: nats-server kill -9 -----------------------------------------------------------------------------


async def inject_t2(run: Run) -> None:
    nats = run.stack.nats
    for _ in range(run.faults):
        await _gap(run, 1.5, 4.0)
        at = time.time()
        nats.kill()
        await asyncio.sleep(run.rng.uniform(0.2, 1.5))
        await asyncio.to_thread(nats.start)
        run.fault("nats_kill", "nats-server", at, time.time())


def bars_t2(run: Run, verdict: Verdict) -> list[Bar]:
    return [
        *_common(verdict),
        _published_bar(run),
        _bar_max(
            verdict,
            "nats_kill.first_report_event_s",
            5.0,
            "consumers resume (first report-derived event after NATS is back)",
            "< 5 s",
        ),
    ]


# ---- T6: relay crashes (the relay runs in the api process) plus NATS kills --------------------------------


async def _api_ready(run: Run, timeout_s: float = 15.0) -> None:
    """Until the restarted api (and with it the relay) answers /readyz, so the next kill hits a running relay."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if (await run.load.http.get("/readyz", timeout=2)).status_code == 200:
                return
        await asyncio.sleep(0.1)


async def inject_t6(run: Run) -> None:
    api = run.stack.services["api"]
    # The T-table's ratio: 100 relay crashes to 5 NATS kills.
    nats_kills = max(1, round(run.faults / 20))
    kinds = ["relay_kill"] * run.faults + ["nats_kill"] * nats_kills
    run.rng.shuffle(kinds)
    for kind in kinds:
        await _api_ready(run)
        await _gap(run, 0.3, 1.5)
        at = time.time()
        if kind == "relay_kill":
            api.kill()
            api.start()
            run.fault("relay_kill", "api+relay", at, time.time())
        else:
            run.stack.nats.kill()
            await asyncio.sleep(0.5)
            await asyncio.to_thread(run.stack.nats.start)
            run.fault("nats_kill", "nats-server", at, time.time())


def _published_bar(run: Run) -> Bar:
    published = run.extra.get("published")
    if published is None:
        return Bar("published ⊇ committed", "every committed event on VY_EVENTS once", "not checked", None)
    found, committed, repeats = published
    return Bar(
        "published ⊇ committed",
        "every committed event on VY_EVENTS once",
        f"{found} of {committed} committed events, {repeats} stored twice",
        found == committed and repeats == 0,
    )


def bars_t6(run: Run, verdict: Verdict) -> list[Bar]:
    out = [*_common(verdict), _published_bar(run)]
    lag = run.extra.get("relay_lag_p99_ms")
    out.append(
        Bar(
            "relay lag p99 (commit to stored, outside fault windows)",
            "< 500 ms",
            f"{lag} ms",
            None if lag is None else lag < 500,
        )
    )
    return out


# ---- T7: agent kill -9 mid-stage -------------------------------------------------------------------------


async def inject_t7(run: Run) -> None:
    done = 0
    deadline = time.monotonic() + 60 + 15 * run.faults
    while done < run.faults and time.monotonic() < deadline:
        await _gap(run, 3.0, 6.0)
        agent = await _busy_agent(run)
        if agent is None:
            continue
        service = run.stack.services[agent]
        at = time.time()
        service.kill()
        await asyncio.sleep(run.rng.uniform(0.5, 2.0))
        service.start()
        run.fault("agent_kill", agent, at, time.time())
        done += 1


def bars_t7(run: Run, verdict: Verdict) -> list[Bar]:
    lease = run.stack.config.lease_s
    return [
        *_common(verdict),
        _bar_max(
            verdict,
            "agent_kill.lost_detected_s",
            lease + 1.0,
            "attempt declared lost after the kill",
            f"< heartbeat timeout + 1 s ({lease + 1:.0f} s)",
        ),
        _bar_max(
            verdict,
            "agent_kill.replaced_after_backoff_s",
            2.0,
            "new attempt placed after the loss (after the stage's retry backoff)",
            "< 2 s",
        ),
        _bar_max(
            verdict, "agent_kill.replaced_s", 60.0, "new attempt placed after the loss (backoff included)", "(reported)"
        ),
        *_slot_bars(verdict, "agent_kill"),
        _resume_bar(verdict),
    ]


def _resume_bar(verdict: Verdict, *, require: bool = True) -> Bar:
    """Every retry placed after a checkpoint resumes from the latest one (a mismatch is also an
    `unexpected` anomaly, which fails the run). With `require`, at least one retry must have had a
    checkpoint (T7: a kill lands mid-stage); a partition or blackhole may cut an agent off before
    its first checkpoint report arrives, so there no resume is "not observed", not a pass."""
    measured = f"{verdict.resumed_from_checkpoint} resumed, {verdict.resume_mismatches} mismatched"
    if verdict.resume_mismatches:
        return Bar("retries resume from the latest checkpoint", "all", measured, False)
    if verdict.resumed_from_checkpoint == 0:
        return Bar(
            "retries resume from the latest checkpoint",
            "all",
            measured + " (none observed)",
            False if require else None,
        )
    return Bar("retries resume from the latest checkpoint", "all", measured, True)


def _slot_bars(verdict: Verdict, kind: str) -> list[Bar]:
    """How many replacements found every live agent full (by the log), and the time once a slot was free:
    reported beside the bar so a slow placement can be told from a queue behind a full cluster."""
    waited = verdict.recovery.get(f"{kind}.waited_for_slot", {})
    return [
        Bar(
            "replacements that found every live agent's slots full",
            "(reported)",
            f"{waited.get('waited', 0)} of {waited.get('n', 0)}",
            None,
        ),
        _bar_max(
            verdict,
            f"{kind}.replaced_after_slot_s",
            60.0,
            "new attempt placed after the loss, once a slot was free",
            "(reported)",
        ),
    ]


# ---- T7N: a network partition of an agent's host (netns + veth) -----------------------------------------


async def _agent_active(run: Run, agent: str) -> bool:
    try:
        response = await run.load.http.get("/api/v1/agents")
        return any(a["id"] == agent and a["state"] == "active" for a in response.json().get("items", []))
    except Exception:
        return False


async def inject_t7n(run: Run) -> None:
    """Cut the namespaced agent off (both ways, no reset) past its lease while it runs stages, then heal.
    It keeps running and journaling meanwhile; its stale reports must be rejected after the heal."""
    ns = run.stack.netns[0]
    agent = run.stack.agent_ids()[-1]
    lease = run.stack.config.lease_s
    rejoin: list[float] = []
    done = 0
    deadline = time.monotonic() + 90 + (lease + 25) * run.faults
    while done < run.faults and time.monotonic() < deadline:
        await _gap(run, 2.0, 4.0)
        if await _busy_agent(run, among={agent}) is None:
            continue
        at = time.time()
        await asyncio.to_thread(ns.partition)
        await asyncio.sleep(lease + 5.0)
        await asyncio.to_thread(ns.heal)
        healed = time.time()
        run.fault("agent_partition", agent, at, healed)
        done += 1
        while time.time() - healed < 60 and not await _agent_active(run, agent):
            await asyncio.sleep(0.25)
        rejoin.append(time.time() - healed)
        await asyncio.sleep(3.0)
    run.extra["rejoin_s"] = rejoin


def bars_t7n(run: Run, verdict: Verdict) -> list[Bar]:
    lease = run.stack.config.lease_s
    rejoin: list[float] = run.extra.get("rejoin_s", [])
    return [
        *_common(verdict),
        _bar_max(
            verdict,
            "agent_partition.lost_detected_s",
            lease + 2.0,
            "cut-off agent's attempts declared lost",
            f"< lease + 2 s ({lease + 2:.0f} s)",
        ),
        _bar_max(
            verdict,
            "agent_partition.replaced_after_backoff_s",
            2.0,
            "new attempt placed after the loss (after the stage's retry backoff)",
            "< 2 s",
        ),
        *_slot_bars(verdict, "agent_partition"),
        _resume_bar(verdict, require=False),
        Bar(
            "stale reports after the heal rejected (audited), none applied",
            "all",
            f"{verdict.stale_rejected} rejected {verdict.rejected_reasons}; unexpected {verdict.unexpected}",
            verdict.unexpected == 0,
        ),
        Bar(
            "agent active again after the heal",
            "< 10 s",
            f"max {max(rejoin):.2f} s" if rejoin else "not observed",
            bool(rejoin) and max(rejoin) < 10.0,
        ),
    ]


# ---- T7P: delay, drop and reset of an agent's NATS link and the scheduler's Postgres link ----------------

SHORT_LINK_FAULTS = ("agent_link_delay", "agent_link_drop", "agent_link_reset")


async def _link_phase(
    run: Run, link: str, kind: str, target: str, mode: Mode, *, hold_s: float, delay_ms: float = 0.0
) -> float:
    """Switch the proxy `link` to `mode` for `hold_s`, back to pass, record the fault; returns back_at."""
    proxy = run.stack.proxies[link]
    at = time.time()
    await asyncio.to_thread(proxy.set_mode, mode, delay_ms)
    await asyncio.sleep(hold_s)
    await asyncio.to_thread(proxy.set_mode, "pass")
    back = time.time()
    run.fault(kind, target, at, back)
    run.extra.setdefault("phases", []).append(
        {"link": link, "kind": kind, "mode": mode, "delay_ms": delay_ms, "held_s": round(back - at, 2)}
    )
    return back


async def _until_busy(run: Run, agent: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and await _busy_agent(run, among={agent}) is None:
        await asyncio.sleep(0.5)


async def inject_t7p(run: Run) -> None:
    """Per cycle, on the last agent's NATS link: 200 ms then 1000 ms of delay per chunk, a blackhole
    shorter than the lease, a reset of its connections (none of these may cost an attempt), then a
    blackhole past the lease (its attempts are lost and re-placed, its late reports rejected). Then on
    the scheduler's Postgres link: 100 ms of delay, a 5 s blackhole and a reset."""
    agent = run.stack.agent_ids()[-1]
    lease = run.stack.config.lease_s
    rejoin: list[float] = []
    scheduler_restarts: list[float] = []
    for _ in range(max(1, run.faults)):
        await _until_busy(run, agent)
        await _link_phase(run, "agent", "agent_link_delay", agent, "delay", hold_s=8.0, delay_ms=200)
        await _link_phase(run, "agent", "agent_link_delay", agent, "delay", hold_s=8.0, delay_ms=1000)
        # Busy before each short fault, so "reports again after" measures the link, not an idle agent.
        await _until_busy(run, agent)
        await _link_phase(run, "agent", "agent_link_drop", agent, "drop", hold_s=lease / 3)
        await _until_busy(run, agent)
        await _link_phase(run, "agent", "agent_link_reset", agent, "reset", hold_s=0.5)
        # Let any loss a short phase caused show up before the long blackout (the lease), so the
        # checker attributes it to the phase that caused it.
        await asyncio.sleep(lease + 2.0)
        await _until_busy(run, agent)
        healed = await _link_phase(run, "agent", "agent_link_blackout", agent, "drop", hold_s=lease + 5.0)
        while time.time() - healed < 60 and not await _agent_active(run, agent):
            await asyncio.sleep(0.25)
        rejoin.append(time.time() - healed)
        if "scheduler_db" in run.stack.proxies:
            await _link_phase(run, "scheduler_db", "db_link_delay", "scheduler", "delay", hold_s=8.0, delay_ms=100)
            await _link_phase(run, "scheduler_db", "db_link_drop", "scheduler", "drop", hold_s=5.0)
            await _link_phase(run, "scheduler_db", "db_link_reset", "scheduler", "reset", hold_s=0.5)
            await asyncio.sleep(3.0)
            scheduler = run.stack.services["scheduler"]
            if not scheduler.alive():
                # The scheduler is meant to ride out a broken Postgres link (it reconnects, or a standby
                # takes over); if it exited, say so and bring it back so the run can still be checked.
                scheduler_restarts.append(time.time())
                run.notes.append("the scheduler exited after a Postgres link fault and was restarted")
                scheduler.start()
    run.extra["rejoin_s"] = rejoin
    run.extra["scheduler_restarts"] = scheduler_restarts


def _reports_during(run: Run, kind: str) -> list[int]:
    """Per fault of `kind`: how many report-derived events of attempts on its target agent were
    recorded while it lasted (a slow link must still carry the agent's reports)."""
    placed_on = {str(e.data.get("attempt")): str(e.data.get("agent")) for e in run.events if e.type == "stage.placed"}
    out: list[int] = []
    for fault in run.load.faults:
        if fault.kind != kind:
            continue
        end = fault.back_at if fault.back_at is not None else fault.at
        out.append(
            sum(
                1
                for e in run.events
                if e.type in REPORT_EVENTS
                and fault.at <= e.recorded_at <= end
                and placed_on.get(str(e.data.get("attempt"))) == fault.target
            )
        )
    return out


def bars_t7p(run: Run, verdict: Verdict) -> list[Bar]:
    lease = run.stack.config.lease_s
    rejoin: list[float] = run.extra.get("rejoin_s", [])
    short_losses = sum(int(verdict.recovery.get(f"{k}.lost_detected_s", {}).get("n", 0)) for k in SHORT_LINK_FAULTS)
    proxies: dict[str, Any] = run.extra.get("proxies", {})
    agent_link = proxies.get("agent", {})
    during = _reports_during(run, "agent_link_delay")
    bars = [
        *_common(verdict),
        Bar(
            "traffic through the agent's link proxy",
            "> 0 bytes both ways",
            f"{agent_link.get('bytes_up', 0)} up, {agent_link.get('bytes_down', 0)} down, "
            f"{agent_link.get('accepted', 0)} connections, {agent_link.get('reset', 0)} reset",
            agent_link.get("bytes_up", 0) > 0 and agent_link.get("bytes_down", 0) > 0,
        ),
        Bar(
            "attempts lost in delay, short-drop and reset phases (all shorter than the lease)",
            "0",
            str(short_losses),
            short_losses == 0,
        ),
        Bar(
            "agent's reports recorded while its link was delayed (200 ms, 1000 ms per chunk)",
            "> 0 in each phase",
            str(during) if during else "no delay phase",
            bool(during) and min(during) > 0,
        ),
        _bar_max(
            verdict,
            "agent_link_drop.agent_report_s",
            5.0,
            "agent's reports recorded again after a short blackhole",
            "< 5 s",
        ),
        _bar_max(
            verdict,
            "agent_link_reset.agent_report_s",
            5.0,
            "agent's reports recorded again after its connections were reset",
            "< 5 s (as T2's consumers)",
        ),
        _bar_max(
            verdict,
            "agent_link_blackout.lost_detected_s",
            lease + 2.0,
            "blackholed agent's attempts declared lost",
            f"< lease + 2 s ({lease + 2:.0f} s)",
        ),
        _bar_max(
            verdict,
            "agent_link_blackout.replaced_after_backoff_s",
            2.0,
            "new attempt placed after the loss (after the stage's retry backoff)",
            "< 2 s",
        ),
        *_slot_bars(verdict, "agent_link_blackout"),
        _resume_bar(verdict, require=False),
        Bar(
            "stale reports after the blackout rejected (audited), none applied",
            "all",
            f"{verdict.stale_rejected} rejected {verdict.rejected_reasons}; unexpected {verdict.unexpected}",
            verdict.unexpected == 0,
        ),
        Bar(
            "agent active again after the blackout",
            "< 10 s",
            f"max {max(rejoin):.2f} s" if rejoin else "not observed",
            bool(rejoin) and max(rejoin) < 10.0,
        ),
    ]
    if "scheduler_db" in proxies:
        restarts = run.extra.get("scheduler_restarts", [])
        bars += [
            _bar_max(
                verdict,
                "db_link_drop.first_scheduler_event_s",
                3.0,
                "first scheduler event after its Postgres link is back (blackhole)",
                "< 3 s (T14's bar for the API)",
            ),
            _bar_max(
                verdict,
                "db_link_reset.first_scheduler_event_s",
                3.0,
                "first scheduler event after its Postgres connections were reset",
                "< 3 s (T14's bar for the API)",
            ),
            Bar(
                "scheduler survived its Postgres link faults",
                "no restart needed",
                f"{len(restarts)} restarts",
                not restarts,
            ),
        ]
    return bars


# ---- T8: SIGSTOP an agent past its lease, then SIGCONT ---------------------------------------------------


async def inject_t8(run: Run) -> None:
    lease = run.stack.config.lease_s
    done = 0
    deadline = time.monotonic() + 60 + (lease + 15) * run.faults
    while done < run.faults and time.monotonic() < deadline:
        await _gap(run, 2.0, 4.0)
        agent = await _busy_agent(run)
        if agent is None:
            continue
        service = run.stack.services[agent]
        at = time.time()
        service.signal(signal.SIGSTOP)
        await asyncio.sleep(lease + 4.0)
        service.signal(signal.SIGCONT)
        run.fault("agent_pause", agent, at, time.time())
        done += 1
        await asyncio.sleep(5.0)


def bars_t8(run: Run, verdict: Verdict) -> list[Bar]:
    stale = verdict.rejected_reasons
    return [
        *_common(verdict),
        Bar(
            "stale attempt's reports rejected (audited as report.rejected)",
            "every one; none applied",
            f"{verdict.stale_rejected} rejected {stale}; applied-after-loss anomalies {verdict.unexpected}",
            verdict.unexpected == 0,
        ),
        _bar_max(
            verdict,
            "agent_pause.lost_detected_s",
            run.stack.config.lease_s + 2.0,
            "paused agent's attempts declared lost",
            f"< lease + 2 s ({run.stack.config.lease_s + 2:.0f} s)",
        ),
    ]


# ---- T14: Postgres stop -m immediate under load ----------------------------------------------------------


async def inject_t14(run: Run) -> None:
    pg = run.stack.postgres
    for _ in range(run.faults):
        await _gap(run, 3.0, 6.0)
        at = time.time()
        await asyncio.to_thread(pg.stop_immediate)
        await asyncio.sleep(run.rng.uniform(1.0, 3.0))
        await asyncio.to_thread(pg.start)
        run.fault("postgres_stop", "postgres", at, time.time())


def bars_t14(run: Run, verdict: Verdict) -> list[Bar]:
    p: dict[str, Any] = verdict.probes
    back = p.get("serving_again_s", {})
    return [
        *_common(verdict),
        Bar(
            "5xx other than 503 during outages",
            "0",
            str(p.get("server_errors_not_503")),
            p.get("server_errors_not_503") == 0,
        ),
        Bar(
            "503 without Retry-After", "0", str(p.get("503_without_retry_after")), p.get("503_without_retry_after") == 0
        ),
        Bar(
            "slowest API answer", "< 5 s (no hang)", f"{p.get('max_latency_s')} s", (p.get("max_latency_s") or 0) < 5.0
        ),
        Bar(
            "API serving again after Postgres is back",
            "< 3 s",
            f"max {back.get('max')} s (p50 {back.get('p50')} s, n {back.get('n')})",
            back.get("max") is not None and back["max"] < 3.0,
        ),
        Bar("status codes seen", "(reported)", str(p.get("statuses")), None),
    ]


# ---- T15: a poison command -------------------------------------------------------------------------------


async def inject_t15(run: Run) -> None:
    """Nothing to break: the poison pipelines (submitted by the runner) are the fault."""
    await asyncio.sleep(1.0)


def poison_times(events: list[Event], poisoned: set[str]) -> list[tuple[float, str]]:
    """For each pipeline in `poisoned` (ids): seconds from its poison stage's first placement to the
    stage's `stage.failed`, and the failure class recorded (other pipelines' `right` stages may fail
    and be retried for other reasons, e.g. a killed agent: they are not counted)."""
    placed: dict[str, float] = {}
    out: list[tuple[float, str]] = []
    for e in events:
        if e.data.get("stage") != "right" or e.stream_id.removeprefix("pipeline-") not in poisoned:
            continue
        if e.type == "stage.placed":
            placed.setdefault(e.stream_id, e.recorded_at)
        elif e.type == "stage.failed" and e.stream_id in placed:
            out.append((e.recorded_at - placed[e.stream_id], str(e.data.get("failure_class"))))
    return out


def bars_t15(run: Run, verdict: Verdict) -> list[Bar]:
    poisoned = [s for s in run.load.submissions if s.expect == "failed"]
    times = poison_times(run.events, {s.pipeline_id for s in poisoned if s.pipeline_id})
    classes = sorted({c for _, c in times})
    worst = max((t for t, _ in times), default=None)
    return [
        *_common(verdict),
        Bar(
            "poison stage ends as stage.failed (poison)",
            f"{len(poisoned)} of {len(poisoned)}",
            f"{len(times)} failed, classes {classes}",
            len(times) == len(poisoned) and classes == ["poison"],
        ),
        Bar(
            "placement to stage.failed (5 deliveries with backoff 0.5/1/2/4 s)",
            "< 10 s (last delivery + 2 s)",
            "not observed" if worst is None else f"max {worst:.2f} s",
            worst is not None and worst < 10.0,
        ),
    ]


# ---- MIX: one of each (the short soak `make test` runs) -----------------------------------------------


async def inject_mix(run: Run) -> None:
    """Scheduler kill, agent kill mid-stage, NATS kill, relay (api) kill, in that order, a few seconds apart."""
    stack = run.stack
    await _gap(run, 3.0, 4.0)
    at = time.time()
    stack.services["scheduler"].kill()
    stack.services["scheduler"].start()
    run.fault("scheduler_kill", "scheduler", at, time.time())
    for _ in range(10):
        await _gap(run, 1.0, 2.0)
        agent = await _busy_agent(run)
        if agent is not None:
            at = time.time()
            stack.services[agent].kill()
            await asyncio.sleep(0.5)
            stack.services[agent].start()
            run.fault("agent_kill", agent, at, time.time())
            break
    await _gap(run, 2.0, 3.0)
    at = time.time()
    stack.nats.kill()
    await asyncio.sleep(0.5)
    await asyncio.to_thread(stack.nats.start)
    run.fault("nats_kill", "nats-server", at, time.time())
    await _gap(run, 2.0, 3.0)
    at = time.time()
    stack.services["api"].kill()
    stack.services["api"].start()
    run.fault("relay_kill", "api+relay", at, time.time())


def bars_mix(run: Run, verdict: Verdict) -> list[Bar]:
    return [*_common(verdict), *bars_t15(run, verdict)[len(_common(verdict)) :]]


SCENARIOS: dict[str, Scenario] = {
    "T1": Scenario("T1", "scheduler kill -9 at random moments, restarted", inject_t1, bars_t1, default_faults=10),
    "T2": Scenario(
        "T2", "nats-server kill -9 (sync_interval: always), restarted", inject_t2, bars_t2, default_faults=20
    ),
    "T6": Scenario(
        "T6",
        "relay crashes (api+relay kill -9) and NATS kills",
        inject_t6,
        bars_t6,
        default_faults=15,
        seconds_per_fault=3.0,
    ),
    "T7": Scenario("T7", "agent kill -9 mid-stage, restarted", inject_t7, bars_t7, default_faults=6, slots=24),
    "T7N": Scenario(
        "T7N",
        "network partition of an agent's host (netns + veth, link down) past its lease, then healed",
        inject_t7n,
        bars_t7n,
        default_faults=3,
        netns_agents=1,
        slots=24,
        seconds_per_fault=30.0,
    ),
    "T7P": Scenario(
        "T7P",
        "fault proxy: delay, blackhole and reset of an agent's NATS link and the scheduler's Postgres link",
        inject_t7p,
        bars_t7p,
        default_faults=1,
        slots=24,
        proxy_agent=True,
        proxy_scheduler_db=True,
        seconds_per_fault=90.0,
    ),
    "T8": Scenario("T8", "SIGSTOP an agent past its lease, then SIGCONT", inject_t8, bars_t8, default_faults=3),
    "T14": Scenario(
        "T14", "Postgres stop -m immediate under load", inject_t14, bars_t14, default_faults=10, probe_every_s=0.2
    ),
    "MIX": Scenario(
        "MIX",
        "one of each: scheduler, agent, NATS and relay kill -9, a poison stage",
        inject_mix,
        bars_mix,
        poison=1,
        default_faults=4,
    ),
    "T15": Scenario(
        "T15",
        "poison command (a RunStage whose handler always fails)",
        inject_t15,
        bars_t15,
        poison=3,
        default_faults=0,
    ),
}

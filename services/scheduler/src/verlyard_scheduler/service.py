"""Service layer: the scheduler's loop. Lead (advisory lock), load and fold the log, then turn by turn:
tail new events, admit reports, decide, place, append (expected versions + tracking row, one
transaction), settle the reports, and only then send commands. docs/adr/0006-scheduler-service.md.

One coroutine owns the world and does every append, so appends (and the tracking position) are
serialised; the report fetcher, the lock watcher and the publish-ack waiter only wake it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from verlyard_scheduler.adapters.nats_commands import CommandSender
from verlyard_scheduler.adapters.nats_reports import PoisonReport, ReportInbox, decode
from verlyard_scheduler.adapters.pg_log import load_live, read_log
from verlyard_scheduler.decide import ReadyStage, next_deadline
from verlyard_scheduler.leader import LOCK_NAME, Leadership, acquire_leadership
from verlyard_scheduler.step import (
    Plan,
    StepConfig,
    StreamAppend,
    drain_command,
    outstanding,
    plan_step,
    still_ready,
)
from verlyard_scheduler.world import AGENT_PREFIX, PIPELINE_PREFIX, Change, World
from verlyard_shared.commands import AnyCommand
from verlyard_shared.envelope import Envelope, Metadata
from verlyard_shared.events import event_type
from verlyard_shared.ids import new_id
from verlyard_shared.reports import AnyReport
from verlyard_shared.store.port import (
    AppendRequest,
    AppendResult,
    EventStore,
    StoreError,
    StoreUnavailable,
    Tracking,
    TrackingMovedBackwards,
    WrongExpectedVersion,
)
from verlyard_shared.store.postgres import NOTIFY_CHANNEL
from verlyard_shared.subjects import CONSUMER_SCHEDULER_REPORTS
from verlyard_shared.topology import CONSUMERS

log = structlog.get_logger("verlyard.scheduler")

TRACKING_CONSUMER = "scheduler"


class SchedulerConfig(msgspec.Struct, frozen=True, kw_only=True):
    lease_s: float = 30.0
    """How long a report or heartbeat keeps an attempt alive."""
    accept_timeout_s: float | None = None
    """Schedule-to-start deadline of a placed attempt (default: `lease_s`)."""
    agent_timeout_s: float | None = None
    """No hello or heartbeat for this long: `agent.lost` (default: `lease_s`)."""
    restart_grace_s: float | None = None
    """Lease of every active attempt when a term starts (default: `lease_s` + the reports consumer's
    first ack deadline). Longer than a lease: reports a dead leader had fetched but not acked come back
    only after that deadline (10 s), and an attempt whose finished report is among them must not be
    declared lost meanwhile."""
    reconcile_s: float = 3.0
    """How often outstanding commands are re-derived from the fold and re-sent."""
    poll_s: float = 1.0
    """Fallback tail poll when no NOTIFY arrives."""
    lock_retry_s: float = 1.0
    lock_check_s: float = 1.0
    read_batch: int = 5000
    report_batch: int = 1000
    decide_batch: int = 2000
    """Pipelines decided per turn at most (the rest wait a turn, so reports keep flowing)."""
    streams_per_append: int = 200
    """Streams per append transaction at most (short transactions: appends are serialised)."""
    retire_after_s: float = 300.0
    """Ended pipelines stay in memory this long (late reports need no database read)."""
    nak_delay_s: float = 1.0
    lock_name: str = LOCK_NAME
    actor: str = "scheduler"

    def grace_s(self) -> float:
        if self.restart_grace_s is not None:
            return self.restart_grace_s
        reports = next(c for c in CONSUMERS if c.durable == CONSUMER_SCHEDULER_REPORTS)
        return self.lease_s + (reports.backoff_s[0] if reports.backoff_s else reports.ack_wait_s)

    def step(self) -> StepConfig:
        return StepConfig(
            lease_s=self.lease_s,
            accept_timeout_s=self.accept_timeout_s if self.accept_timeout_s is not None else self.lease_s,
            agent_timeout_s=self.agent_timeout_s if self.agent_timeout_s is not None else self.lease_s,
        )


class LeadershipLost(Exception):
    """This scheduler may no longer act: its lock connection failed, or a newer leader wrote the log."""


def utc_now() -> datetime:
    return datetime.now(UTC)


class SchedulerService:
    """Runs terms of leadership until `stop` is set; a standby waits for the lock."""

    def __init__(
        self,
        *,
        dsn: str,
        store: EventStore,
        js: JetStreamContext,
        pool: asyncpg.Pool | None = None,
        config: SchedulerConfig = SchedulerConfig(),
        clock: Callable[[], datetime] = utc_now,
        ids: Callable[[], str] = new_id,
    ) -> None:
        self._dsn = dsn
        self._store = store
        self._js = js
        self._pool = pool
        self.config = config
        self._clock = clock
        self._ids = ids
        self.term: Term | None = None
        self.terms = 0
        self.leading = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.config
        while not stop.is_set():
            leadership = await acquire_leadership(
                self._dsn, stop, name=cfg.lock_name, retry_s=cfg.lock_retry_s, check_s=cfg.lock_check_s
            )
            if leadership is None:
                break
            self.terms += 1
            term = Term(self, leadership)
            self.term = term
            try:
                self.leading.set()
                await term.run(stop)
            except LeadershipLost as exc:
                log.warning("scheduler_stepped_down", reason=str(exc))
            except (StoreError, OSError, TimeoutError) as exc:
                log.warning("scheduler_term_interrupted", error=type(exc).__name__, detail=str(exc)[:300])
            except Exception:
                log.exception("scheduler_term_failed")
            finally:
                self.leading.clear()
                await term.close()
                await leadership.release()
            if not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=cfg.lock_retry_s)
        log.info("scheduler_stopped")


class Term:
    """One term of leadership: a fresh world loaded from the log, then the loop until stop or loss."""

    def __init__(self, service: SchedulerService, leadership: Leadership) -> None:
        self.svc = service
        self.config = service.config
        self.step_config = service.config.step()
        self.store = service._store
        self.leadership = leadership
        self.world = World()
        self.sender = CommandSender(service._js, resend_after_s=self.config.reconcile_s)
        self.inbox = ReportInbox(service._js, wake=self._set_wake, batch=self.config.report_batch)
        self._wake = asyncio.Event()
        self._dirty: dict[str, None] = {}
        self._place_all = True
        self._timers: list[tuple[datetime, str]] = []
        self._scheduled: dict[str, datetime] = {}
        self._tasks: list[asyncio.Task[Any]] = []
        self._in_hand: list[Msg] = []
        self._inbox_task: asyncio.Task[None] | None = None
        """Report messages of the turn under way (handed back if the term ends in the middle of it)."""
        self._next_reconcile = 0.0
        self._notified = 0
        """The highest position a NOTIFY announced: the log holds news for us only past our position."""
        self._next_tail = 0.0
        """time.monotonic() of the next unconditional tail (the fallback for a NOTIFY that never came)."""
        self._log = log.bind(term=service.terms)
        self.loaded = asyncio.Event()
        self.turns = 0
        self._started = time.monotonic()

    @property
    def first_command_s(self) -> float | None:
        """Seconds from taking the lead to the first command sent (None: none yet)."""
        sent = self.sender.first_sent_at
        return None if sent is None else sent - self._started

    # ---- plumbing --------------------------------------------------------------------------------

    def _set_wake(self) -> None:
        self._wake.set()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        try:
            position = int(payload)
        except ValueError:
            self._next_tail = 0.0  # not a position: read the log to be sure
        else:
            self._notified = max(self._notified, position)
            if position <= self.world.position:
                return  # our own append, already folded
        self._wake.set()

    def _check(self) -> None:
        if self.leadership.lost.is_set():
            raise LeadershipLost("the leader lock's connection failed")

    async def close(self) -> None:
        # asyncio.wait never raises a task's own CancelledError, so a cancellation of the caller is
        # never swallowed here (it propagates from the await itself).
        self.inbox.close()
        if self._inbox_task is not None:
            await asyncio.wait({self._inbox_task}, timeout=2.5)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
            for task in self._tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    self._log.warning("scheduler_task_failed", task=task.get_name(), error=repr(task.exception()))
        await self.inbox.release(self._in_hand)
        self._in_hand = []
        await self.sender.close()

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))

    async def _forward(self, event: asyncio.Event) -> None:
        await event.wait()
        self._wake.set()

    # ---- the term --------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        started = time.monotonic()
        self._log.info("scheduler_leading", lock=self.leadership.name)
        self._spawn(self._forward(self.leadership.lost), "scheduler-lost")
        self._spawn(self._forward(stop), "scheduler-stop")
        await self.leadership.listen(NOTIFY_CHANNEL, self._on_notify)
        stats = await self._load()
        self._check()
        now = self.svc._clock()
        self.world.seed(now, self.config.grace_s())
        for pid in self.world.active_pipelines():
            self._dirty[pid] = None
        self._log.info(
            "scheduler_loaded",
            **stats,
            position=self.world.position,
            pipelines=len(self.world.pipelines),
            active=len(self._dirty),
            agents=len(self.world.agents),
            load_s=round(time.monotonic() - started, 3),
        )
        self._started = started
        self.loaded.set()
        # Outstanding commands first: the fastest way back to work after a restart.
        await self._reconcile(now)
        self._inbox_task = asyncio.create_task(self.inbox.run(stop), name="scheduler-reports")
        self._tasks.append(self._inbox_task)
        first_logged = False
        while not stop.is_set():
            if not first_logged and self.first_command_s is not None:
                # T1 measures this: the first command after taking the lead (restart or takeover).
                self._log.info("scheduler_first_command", seconds=round(self.first_command_s, 3))
                first_logged = True
            self._check()
            self._wake.clear()
            await self._turn()
            if stop.is_set():
                break
            await self._sleep()
        self._log.info("scheduler_term_ended", position=self.world.position, turns=self.turns)

    async def _sleep(self) -> None:
        if self._dirty:
            return  # more to decide: go round again at once
        now = self.svc._clock()
        wake_at = time.monotonic() + self.config.poll_s
        wake_at = min(wake_at, self._next_reconcile)
        deadlines: list[datetime] = []
        if self._timers:
            deadlines.append(self._timers[0][0])
        timeout = timedelta(seconds=self.step_config.agent_timeout_s)
        for name, agent in self.world.agents.items():
            seen = self.world.last_seen.get(name)
            if agent.status in ("active", "draining") and seen is not None:
                deadlines.append(seen + timeout)
        if deadlines:
            wake_at = min(wake_at, time.monotonic() + (min(deadlines) - now).total_seconds())
        delay = wake_at - time.monotonic()
        if delay <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()

    async def _load(self) -> dict[str, Any]:
        """Rebuild the world from the log: only the streams that can still change when a pool is at
        hand (adapters/pg_log.py), else every event from position 0, retiring ended pipelines as it goes."""
        world = self.world
        pool = self.svc._pool
        if pool is not None:

            async def fold(batch: Sequence[Envelope]) -> None:
                for envelope in batch:
                    world.apply(envelope, index=False, advance=False)
                self._check()

            began = time.perf_counter()
            live = await load_live(pool, fold)
            world.position = max(world.position, live.head)
            stats: dict[str, Any] = {
                "events": live.events,
                "streams": live.streams,
                "live_streams": live.live_streams,
                "scan_s": round(live.scan_s, 3),
                "read_s": round(live.read_s, 3),
                "fold_s": round(time.perf_counter() - began - live.scan_s - live.read_s, 3),
            }
        else:
            count = 0
            while True:
                batch = await read_log(self.store, after=world.position, limit=self.config.read_batch)
                if not batch:
                    break
                count += len(batch)
                touched: dict[str, None] = {}
                for envelope in batch:
                    change = world.apply(envelope, index=False)
                    if change is None:
                        continue
                    if change.kind == "reload":
                        await self._reload(PIPELINE_PREFIX + change.key, index=False)
                    if change.kind != "agent":
                        touched[change.key] = None
                world.evict_terminal(touched)
                self._check()
                if len(batch) < self.config.read_batch:
                    break
            stats = {"events": count}
        world.evict_terminal(list(world.pipelines))
        world.reindex()
        world.agent_transitions.clear()
        return stats

    async def _reload(self, stream_id: str, *, index: bool = True) -> None:
        """Read one stream again from where the world has it (all of it for a retired pipeline)."""
        world = self.world
        if stream_id.startswith(PIPELINE_PREFIX):
            state = world.pipelines.get(stream_id[len(PIPELINE_PREFIX) :])
            after = state.version if state is not None else 0
        else:
            after = world.agent_versions.get(stream_id[len(AGENT_PREFIX) :], 0)
        for envelope in await self.store.read_stream(stream_id, after_version=after):
            change = world.apply(envelope, index=index, advance=False)
            if change is not None and index:
                self._changed(change)
        if index:
            self._after_changes()

    # ---- one turn --------------------------------------------------------------------------------

    async def _turn(self) -> None:
        self.turns += 1
        if self._notified > self.world.position or time.monotonic() >= self._next_tail:
            # A turn woken by reports alone skips the read: Postgres announces every commit (NOTIFY
            # carries its last position), and the poll covers a notification lost with a connection.
            await self._tail()
        now = self.svc._clock()
        self._due(now)
        reports = await self._reports()
        dirty = self._take_dirty()
        plan = plan_step(
            self.world,
            now,
            reports=[(i, r) for i, (_, r) in enumerate(reports)],
            dirty=dirty,
            place_all=self._place_all,
            config=self.step_config,
            new_id=self.svc._ids,
        )
        self._place_all = False
        msgs = [m for m, _ in reports]
        await self._apply_plan(plan, msgs, now)
        self._in_hand = []
        if time.monotonic() >= self._next_reconcile:
            await self._reconcile(now)

    async def _tail(self) -> None:
        """Fold what others appended since our position (the API's submissions, cancels, retries...)."""
        world = self.world
        self._next_tail = time.monotonic() + self.config.poll_s
        while True:
            batch = await read_log(self.store, after=world.position, limit=self.config.read_batch)
            for envelope in batch:
                change = world.apply(envelope)
                if change is None:
                    continue
                if change.kind == "reload":
                    await self._reload(PIPELINE_PREFIX + change.key)
                else:
                    self._changed(change)
            self._after_changes()
            if len(batch) < self.config.read_batch:
                return

    def _changed(self, change: Change) -> None:
        if change.kind == "pipeline":
            self._dirty[change.key] = None
        elif change.kind == "agent":
            self._place_all = True

    def _after_changes(self) -> None:
        """React to agent transitions: a lost agent's pipelines are decided again; a drain is sent on."""
        world = self.world
        for agent, before, after in world.agent_transitions:
            state = world.agents.get(agent)
            if after in ("lost", "gone"):
                for pid in world.pipelines_on(agent):
                    self._dirty[pid] = None
                self._log.info("agent_lost" if after == "lost" else "agent_gone", agent=agent, was=before)
            elif after == "draining" and before != "draining" and state is not None:
                command = drain_command(state, world.agent_versions.get(agent, 0), self.svc._clock())
                self._spawn(self._send_checked([command]), "scheduler-drain")
                self._log.info("agent_draining", agent=agent)
            elif after == "active" and before != "active":
                self._log.info("agent_registered", agent=agent, was=before)
        world.agent_transitions.clear()

    def _take_dirty(self) -> list[str]:
        limit = self.config.decide_batch
        if len(self._dirty) <= limit:
            taken = list(self._dirty)
            self._dirty.clear()
            return taken
        taken = []
        for pid in self._dirty:
            taken.append(pid)
            if len(taken) >= limit:
                break
        for pid in taken:
            del self._dirty[pid]
        return taken

    def _due(self, now: datetime) -> None:
        """Pipelines whose next deadline (backoff end, lease, timeout) has come are decided again."""
        world = self.world
        while self._timers and self._timers[0][0] <= now:
            at, pid = heapq.heappop(self._timers)
            if self._scheduled.get(pid) != at:
                continue  # superseded
            del self._scheduled[pid]
            state = world.pipelines.get(pid)
            if state is None or state.terminal:
                continue
            deadline = next_deadline(state, leases=world.leases, lease_s=self.config.lease_s)
            if deadline is None:
                continue
            if deadline <= now:
                self._dirty[pid] = None
            else:
                self._schedule(pid, deadline)

    def _schedule(self, pid: str, deadline: datetime | None) -> None:
        if deadline is None or self._scheduled.get(pid) == deadline:
            return
        self._scheduled[pid] = deadline
        heapq.heappush(self._timers, (deadline, pid))

    def _reschedule(self, pid: str) -> None:
        state = self.world.pipelines.get(pid)
        if state is None or state.terminal:
            self._scheduled.pop(pid, None)
            return
        self._schedule(pid, next_deadline(state, leases=self.world.leases, lease_s=self.config.lease_s))

    async def _reports(self) -> list[tuple[Msg, AnyReport]]:
        """Decode what the inbox holds (poison is terminated here) and load any retired pipeline named."""
        out: list[tuple[Msg, AnyReport]] = []
        self._in_hand = self.inbox.take()
        for msg in self._in_hand:
            try:
                report = decode(msg)
            except PoisonReport as exc:
                self._log.warning("report_poison", subject=msg.subject, reason=str(exc)[:300])
                with contextlib.suppress(Exception):
                    await msg.term()
                continue
            out.append((msg, report))
            pid = getattr(report, "pipeline_id", None)
            if isinstance(pid, str) and pid not in self.world.pipelines:
                await self._reload(PIPELINE_PREFIX + pid)
        return out

    async def _apply_plan(self, plan: Plan, msgs: Sequence[Msg], now: datetime) -> None:
        world = self.world
        for pid, error in plan.failed:
            self._log.error("decide_failed", pipeline=pid, error=error)
        for token, reason in plan.dropped:
            self._log.warning("report_dropped", subject=msgs[token].subject, reason=reason)
            with contextlib.suppress(Exception):
                await msgs[token].term()
        for token in plan.acks:
            with contextlib.suppress(Exception):
                await msgs[token].ack()
        for agent in dict.fromkeys(plan.hellos):
            try:
                await self.sender.ensure_agent(agent)
            except Exception as exc:  # the agent may have created it; its commands wait in the stream anyway
                self._log.warning("agent_consumer_failed", agent=agent, error=type(exc).__name__)
        appends = list(plan.appends.values())
        size = max(1, self.config.streams_per_append)
        for start in range(0, len(appends), size):
            await self._commit(appends[start : start + size], msgs, plan.ready)
        for pid, ready in plan.ready.items():
            if PIPELINE_PREFIX + pid not in plan.appends:
                world.ready[pid] = ready
                self._reschedule(pid)
        self._check()
        await self.sender.send(plan.commands)

    async def _commit(
        self, chunk: list[StreamAppend], msgs: Sequence[Msg], ready: Mapping[str, tuple[ReadyStage, ...]]
    ) -> None:
        world = self.world
        self._check()
        requests = [
            AppendRequest(
                stream_id=a.stream_id,
                expected_version=a.expected_version,
                events=tuple(a.events),
                metadata=Metadata(
                    actor=self.config.actor, correlation_id=a.stream_id.split("-", 1)[-1], causation_id=a.causation_id
                ),
            )
            for a in chunk
        ]
        tokens = [t for a in chunk for t in a.tokens]
        try:
            results = await self.store.append_many(
                requests, tracking=Tracking(consumer=TRACKING_CONSUMER, position=world.position)
            )
        except WrongExpectedVersion as exc:
            # Someone appended first (the API, or an ex-leader): read that stream again, decide again.
            self._log.info("append_conflict", stream=exc.stream_id, expected=exc.expected, actual=exc.actual)
            await self._nak(msgs, tokens, 0.05)
            self._redo(chunk)
            await self._reload(exc.stream_id)
            return
        except TrackingMovedBackwards as exc:
            await self._nak(msgs, tokens, self.config.nak_delay_s)
            raise LeadershipLost(f"a newer scheduler recorded position {exc.current}") from exc
        except StoreUnavailable:
            # The append may or may not have committed: the tail or a conflict will tell.
            await self._nak(msgs, tokens, self.config.nak_delay_s)
            self._redo(chunk)
            raise
        self._committed(chunk, results, ready)
        for token in tokens:
            with contextlib.suppress(Exception):
                await msgs[token].ack()
        self._check()
        await self.sender.send(c for a in chunk for c in a.commands)

    async def _send_checked(self, commands: Sequence[AnyCommand]) -> None:
        if not self.leadership.lost.is_set():
            await self.sender.send(commands)

    async def _nak(self, msgs: Sequence[Msg], tokens: list[int], delay: float) -> None:
        for token in tokens:
            with contextlib.suppress(Exception):
                await msgs[token].nak(delay=delay)

    def _redo(self, chunk: list[StreamAppend]) -> None:
        for a in chunk:
            if a.stream_id.startswith(PIPELINE_PREFIX):
                self._dirty[a.stream_id[len(PIPELINE_PREFIX) :]] = None
        self._place_all = True

    def _committed(
        self, chunk: list[StreamAppend], results: list[AppendResult], ready: Mapping[str, tuple[ReadyStage, ...]]
    ) -> None:
        world = self.world
        fresh = [r for r in results if not r.duplicate]
        if fresh:
            first = min(r.first_position for r in fresh)
            last = max(r.last_position for r in fresh)
            if first == world.position + 1:
                world.position = last  # nothing committed between: no need to read our own events back
        for a, result in zip(chunk, results, strict=True):
            if a.stream_id.startswith(PIPELINE_PREFIX):
                pid = a.stream_id[len(PIPELINE_PREFIX) :]
                assert a.pipeline is not None
                if result.last_version != a.version:
                    self._dirty[pid] = None  # unexpected: let the tail and a reload sort it out
                    continue
                before = world.pipelines.get(pid)
                world.put_pipeline(pid, a.pipeline)
                if not a.pipeline.terminal:
                    candidates = ready.get(pid, world.ready.get(pid, ()))
                    world.ready[pid] = tuple(r for r in candidates if still_ready(a.pipeline, r))
                self._reschedule(pid)
                self._log_events(pid, a)
                if before is not None and not before.terminal and a.pipeline.terminal:
                    self._log.info(
                        "pipeline_finished", pipeline=pid, status=a.pipeline.status, reason=a.pipeline.reason
                    )
            else:
                agent = a.stream_id[len(AGENT_PREFIX) :]
                world.agent_versions[agent] = max(world.agent_versions.get(agent, 0), result.last_version)
                if a.agent is not None:
                    before_status = world.agents[agent].status if agent in world.agents else None
                    world.put_agent(a.agent)
                    if before_status != a.agent.status:
                        world.agent_transitions.append((agent, before_status or "new", a.agent.status))
        self._place_all = True
        self._after_changes()

    def _log_events(self, pid: str, a: StreamAppend) -> None:
        for new in a.events:
            event = new.event
            kind = event_type(event)
            if kind in ("attempt.lost", "report.rejected", "stage.failed"):
                fields = msgspec.to_builtins(event)
                fields.pop("type", None)
                fields.pop("pipeline_id", None)
                self._log.info(kind.replace(".", "_"), pipeline=pid, **fields)
            else:
                self._log.debug(kind.replace(".", "_"), pipeline=pid, stage=getattr(event, "stage", None))

    async def _reconcile(self, now: datetime) -> None:
        self._next_reconcile = time.monotonic() + self.config.reconcile_s
        self._place_all = True
        world = self.world
        self._check()
        await self.sender.send(outstanding(world, now, lease_s=self.config.lease_s))
        retired = world.retire(now, self.config.retire_after_s)
        for pid in retired:
            self._scheduled.pop(pid, None)
        self.sender.forget(max(600.0, 10 * self.config.reconcile_s))

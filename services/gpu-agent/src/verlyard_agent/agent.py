"""Service layer: the GPU agent. Registers, heartbeats, takes commands, runs attempts, drains.

It speaks only NATS and keeps working without it: reports and telemetry go through the local
journal (journal.py / publisher.py), so attempts never wait on the bus; commands need the bus, so
no new work starts while it is away (decision 5: the lease, renewed by heartbeats, decides loss).

Stopping: the first stop request (SIGTERM) drains — no new work, running attempts finish, then the
agent exits; a second request, or `drain_timeout_s`, stops the attempts (reported `preempted`). A
DrainAgent command drains without exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import IO, Any, assert_never

import structlog
from nats.aio.client import Client as NATS

from verlyard_agent import process
from verlyard_agent.attempts import AttemptStore
from verlyard_agent.consumer import CommandConsumer, Verdict, ensure_command_consumer
from verlyard_agent.datasets import DatasetFetcher
from verlyard_agent.inventory import GpuProbe, NvmlProbe, heartbeat_report, hello_report
from verlyard_agent.journal import Journal
from verlyard_agent.layout import attempt_paths, journal_dir, lock_file
from verlyard_agent.lifecycle import AttemptRecord, on_cancel, on_run_stage
from verlyard_agent.outbox import Outbox, report_kind, utcnow
from verlyard_agent.publisher import JournalPublisher
from verlyard_agent.runner import AttemptRun, RunnerServices
from verlyard_agent.watchdog import WatchdogPolicy
from verlyard_shared import codec, subjects
from verlyard_shared.commands import AnyCommand, CancelAttempt, DrainAgent, RunStage
from verlyard_shared.events import GpuInfo
from verlyard_shared.ids import new_id
from verlyard_shared.nats_auth import agent_inbox_prefix
from verlyard_shared.nats_topology import NatsTls, connect_nats
from verlyard_shared.reports import AttemptAcceptedReport, AttemptFinishedReport, Report
from verlyard_shared.runtime import retry_until

log = structlog.get_logger("verlyard.agent")

RECORD_SYNC_S = 1.0
"""How often the attempt records written since the last fsync are made durable."""


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    agent_id: str
    data_dir: Path
    datasets_dir: Path
    nats_url: str
    nats_user: str | None = None
    nats_password: str | None = None
    nats_creds: str | None = None
    nats_tls: NatsTls | None = None
    slots: int = 2
    labels: Mapping[str, str] = field(default_factory=dict[str, str])
    heartbeat_s: float = 5.0
    cancel_grace_s: float = 10.0
    drain_timeout_s: float | None = 1500.0
    """After a stop request, how long running attempts may take to finish (systemd's TimeoutStopSec
    is 30 min; None waits forever)."""
    trainer_python: str | None = None
    watchdog: WatchdogPolicy = field(default_factory=WatchdogPolicy)
    host_env: Mapping[str, str] = field(default_factory=dict[str, str])
    """The environment children may inherit from (allow-listed again by childenv)."""
    flush_on_exit_s: float = 5.0
    keep_records_days: float = 30.0


class AgentBusy(RuntimeError):
    """Another agent already uses this data dir."""


class Agent:
    def __init__(self, config: AgentConfig, *, probe: GpuProbe | None = None) -> None:
        self.config = config
        self.agent_id = subjects.token(config.agent_id)
        self.data_dir = config.data_dir
        self._probe = probe
        self._log = log.bind(agent=self.agent_id)
        self._gpus: tuple[GpuInfo, ...] = ()
        self._nc: NATS | None = None
        self._lock_handle: IO[bytes] | None = None
        self._runs: dict[str, AttemptRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._draining = False
        self._stop_requests = 0
        self._hard = False
        self._stop_requested = asyncio.Event()
        self._exit = asyncio.Event()
        self._consumer_stop = asyncio.Event()
        self._background_stop = asyncio.Event()
        self._drain_timer: asyncio.TimerHandle | None = None
        self.ready = asyncio.Event()
        """Set once the agent is registered and consuming its commands."""
        self.reports: Journal | None = None
        self.telemetry: Journal | None = None
        self.publishers: list[JournalPublisher] = []
        self.store: AttemptStore | None = None
        self._datasets = DatasetFetcher(config.datasets_dir)
        self._outbox: Outbox | None = None
        self._services: RunnerServices | None = None

    # ---- public state ----------------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def running(self) -> dict[str, AttemptRun]:
        return dict(self._runs)

    # ---- stop and drain --------------------------------------------------------------------------

    def request_stop(self) -> None:
        """First call: drain, then exit. Second call: stop the running attempts now."""
        self._stop_requests += 1
        if self._stop_requests > 1:
            self._hard_stop("a second stop request")
            return
        self._log.info("agent_draining", reason="stop requested", running=sorted(self._runs))
        self._draining = True
        self._stop_requested.set()
        timeout = self.config.drain_timeout_s
        if timeout is not None and self._runs:
            self._drain_timer = asyncio.get_running_loop().call_later(
                timeout, self._hard_stop, f"running attempts did not finish within {timeout:g} s"
            )
        self._maybe_exit()

    def drain(self, reason: str) -> None:
        if not self._draining:
            self._log.info("agent_draining", reason=reason, running=sorted(self._runs))
        self._draining = True
        self._spawn(self._send_heartbeat())  # tell the scheduler now, not at the next beat

    def _hard_stop(self, why: str) -> None:
        if self._hard:
            return
        self._hard = True
        self._log.warning("agent_stopping_attempts", why=why, running=sorted(self._runs))
        for run in list(self._runs.values()):
            self._spawn(run.stop("agent_stop", f"the agent is shutting down ({why})"))
        self._stop_requested.set()
        self._maybe_exit()

    def _maybe_exit(self) -> None:
        if self._stop_requested.is_set() and not self._runs:
            self._exit.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- main ------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Run until stopped (request_stop). Raises AgentBusy when another agent holds the data dir."""
        self._take_lock()
        try:
            self._open_local()
            await self._recover()
            if self._probe is None:
                self._probe = await asyncio.to_thread(NvmlProbe)
                reason = getattr(self._probe, "unavailable_reason", None)
                if reason:
                    self._log.info("gpus_unavailable", reason=reason)
            assert self._services is not None
            self._services.probe = self._probe
            self._gpus = await asyncio.to_thread(self._probe.inventory)
            self._log.info(
                "agent_starting",
                data_dir=str(self.data_dir),
                gpus=[f"{g.index}:{g.name}" for g in self._gpus],
                cpu_slots=self.config.slots,
                labels=dict(self.config.labels),
            )
            nc = await retry_until("nats", self._connect, self._stop_requested)
            if nc is None:
                return
            self._nc = nc
            for publisher in self.publishers:
                publisher.attach(nc)
                self._spawn(publisher.run(self._background_stop))
            self._datasets.attach(nc.jetstream())
            self._spawn(self._heartbeats())
            self._spawn(self._sync_records())
            self._spawn(self._watch_link())
            self._spawn(self._send_hello())
            if await self._ensure_consumer():
                consumer = CommandConsumer(
                    nc.jetstream(), self.agent_id, self._on_command, on_poison=self._on_poison_command
                )
                self._spawn(consumer.run(self._consumer_stop))
                self.ready.set()
                self._log.info("agent_ready")
            await self._exit.wait()
        finally:
            await self._shutdown()

    def _take_lock(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        handle = lock_file(self.data_dir).open("ab")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise AgentBusy(f"another agent is running with the data dir {self.data_dir}") from None
        self._lock_handle = handle

    def _open_local(self) -> None:
        jdir = journal_dir(self.data_dir)
        self.reports = Journal(jdir / "reports.jsonl", fsync=True)
        self.telemetry = Journal(jdir / "telemetry.jsonl", fsync=False)
        self.publishers = [
            JournalPublisher(self.reports, name="reports"),
            JournalPublisher(self.telemetry, name="telemetry"),
        ]
        self.store = AttemptStore(self.data_dir)
        self.store.prune(now=utcnow(), keep=timedelta(days=self.config.keep_records_days))
        self._outbox = Outbox(self.agent_id, reports=self.reports, telemetry=self.telemetry)
        self.config.datasets_dir.mkdir(parents=True, exist_ok=True)
        self._services = RunnerServices(
            agent_id=self.agent_id,
            outbox=self._outbox,
            store=self.store,
            datasets_dir=self.config.datasets_dir,
            trainer_python=self.config.trainer_python,
            host_env=self.config.host_env,
            cancel_grace_s=self.config.cancel_grace_s,
            watchdog=self.config.watchdog,
            probe=self._probe,
            datasets=self._datasets,
        )

    async def _recover(self) -> None:
        """Attempts this agent was running when it died: stop what is left of them, report them lost."""
        assert self.store is not None and self._outbox is not None
        for record in self.store.unfinished():
            pids = await asyncio.to_thread(process.kill_leftovers, record.attempt, grace_s=self.config.cancel_grace_s)
            reason = "the agent stopped while this attempt ran (crash or kill)"
            if pids:
                reason += f"; its leftover processes {pids} were stopped on restart"
            self._end_here(record.pipeline_id, record.stage, record.attempt, record.kind, "failed", "lost", reason)
            self._log.warning("attempt_recovered_as_lost", attempt=record.attempt, leftovers=pids)

    def _end_here(
        self,
        pipeline_id: str,
        stage: str,
        attempt: str,
        kind: str,
        outcome: str,
        failure_class: str | None,
        reason: str,
    ) -> None:
        """An end the agent decides itself (lost on restart, cancelled before it started, the agent's own
        failure): journal it and record it, so a later RunStage of the attempt is answered, never run."""
        assert self.store is not None and self._outbox is not None
        report = AttemptFinishedReport(
            report_id=new_id(),
            agent=self.agent_id,
            sent_at=utcnow(),
            pipeline_id=pipeline_id,
            stage=stage,
            attempt=attempt,
            outcome=outcome,
            failure_class=failure_class,
            reason=reason,
        )
        self._outbox.report(report)
        self.store.put(
            AttemptRecord(
                attempt=attempt,
                pipeline_id=pipeline_id,
                stage=stage,
                kind=kind,
                state="finished",
                updated_at=utcnow(),
                finished=report,
            )
        )

    async def _connect(self) -> NATS:
        cfg = self.config
        return await connect_nats(
            cfg.nats_url,
            name=f"verlyard-agent-{self.agent_id}",
            user=cfg.nats_user,
            password=cfg.nats_password,
            creds=cfg.nats_creds,
            tls=cfg.nats_tls,
            # An agent's NATS user may subscribe only below its own inbox prefix (docs/adr/0015).
            inbox_prefix=agent_inbox_prefix(self.agent_id),
        )

    async def _ensure_consumer(self) -> bool:
        assert self._nc is not None
        warned = False
        while not self._stop_requested.is_set():
            try:
                await asyncio.wait_for(ensure_command_consumer(self._nc.jetstream(), self.agent_id), timeout=10.0)
                return True
            except Exception as exc:
                if not warned:
                    self._log.warning("command_consumer_unavailable", error=type(exc).__name__, detail=str(exc))
                    warned = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_requested.wait(), timeout=1.0)
        return False

    async def _shutdown(self) -> None:
        self._consumer_stop.set()
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        if self._runs:  # cancelled from outside (not a stop request): do not leave children behind
            self._hard_stop("the agent task was cancelled")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._exit.wait(), timeout=self.config.cancel_grace_s + 10)
        if self._nc is not None and self._nc.is_connected:
            await self._send_heartbeat()
            for publisher in self.publishers:
                if not await publisher.flush(self.config.flush_on_exit_s):
                    self._log.warning("journal_not_flushed", journal=publisher.name, backlog=publisher.journal.backlog)
        self._background_stop.set()
        tasks = list(self._tasks)
        for task in tasks:
            if task.get_name() != "attempt":
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
        for journal in (self.reports, self.telemetry):
            if journal is not None:
                with contextlib.suppress(OSError):
                    await journal.sync()
                journal.close()
        if self.store is not None:
            with contextlib.suppress(OSError):
                await self.store.sync()
            self.store.close()
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None
        self._log.info("agent_stopped")

    # ---- registration and health -------------------------------------------------------------------

    async def _publish_direct(self, report: Report) -> bool:
        """Hello and heartbeats go straight out (a stale heartbeat replayed later would mean nothing)."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            return False
        try:
            await nc.jetstream().publish(
                subjects.report_subject(self.agent_id, report_kind(report)),
                codec.encode(report),
                headers={"Nats-Msg-Id": report.report_id},
                timeout=min(5.0, max(1.0, self.config.heartbeat_s)),
            )
            return True
        except Exception as exc:
            self._log.debug("report_not_sent", report=report_kind(report), error=type(exc).__name__)
            return False

    async def _send_hello(self) -> None:
        """Register; retried until it gets through (right after a reconnect JetStream may not answer yet)."""
        delay = 0.2
        while not self._background_stop.is_set():
            hello = hello_report(
                agent=self.agent_id,
                now=utcnow(),
                gpus=self._gpus,
                cpu_slots=self.config.slots,
                labels=dict(self.config.labels),
            )
            if await self._publish_direct(hello):
                self._log.info("agent_registered", gpus=len(self._gpus), cpu_slots=self.config.slots)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._background_stop.wait(), timeout=delay)
            delay = min(delay * 2, 5.0)

    async def _send_heartbeat(self) -> None:
        status = ()
        if self._probe is not None and self._gpus:
            try:
                status = await asyncio.wait_for(asyncio.to_thread(self._probe.status), timeout=5.0)
            except TimeoutError:
                self._log.warning("nvml_status_timeout")
        beat = heartbeat_report(
            agent=self.agent_id, now=utcnow(), running=sorted(self._runs), gpus=status, draining=self._draining
        )
        await self._publish_direct(beat)

    async def _heartbeats(self) -> None:
        while not self._background_stop.is_set():
            await self._send_heartbeat()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._background_stop.wait(), timeout=self.config.heartbeat_s)

    async def _sync_records(self) -> None:
        """Group-commit the attempt records off the critical path (one fsync a second at most)."""
        while not self._background_stop.is_set():
            if self.store is not None:
                try:
                    await self.store.sync()
                except OSError as exc:  # a full or failing disk: say so, keep running
                    self._log.warning("attempt_records_sync_failed", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._background_stop.wait(), timeout=RECORD_SYNC_S)

    async def _watch_link(self) -> None:
        """Register again after every reconnect (the scheduler may have declared this agent lost)."""
        assert self._nc is not None
        connected = self._nc.is_connected
        while not self._background_stop.is_set():
            await asyncio.sleep(0.25)
            now_connected = self._nc.is_connected
            if now_connected and not connected:
                self._log.info("nats_link_restored", journal_backlog=sum(p.journal.backlog for p in self.publishers))
                for publisher in self.publishers:
                    publisher.wake()
                self._spawn(self._send_hello())
                self._spawn(self._send_heartbeat())
            connected = now_connected

    # ---- commands --------------------------------------------------------------------------------

    async def _on_command(self, command: AnyCommand) -> Verdict:
        match command:
            case RunStage():
                # Acked once recorded, not once fsynced: the record guards against a second process
                # after an agent crash (the page cache survives that); a power loss kills the attempt
                # with the host, and the records are fsynced every RECORD_SYNC_S anyway.
                return self._on_run(command)
            case CancelAttempt():
                return self._on_cancel(command)
            case DrainAgent():
                if command.agent != self.agent_id:
                    return "term"
                self.drain(command.reason)
                return "ack"
            case _:
                assert_never(command)

    def _on_run(self, command: RunStage) -> Verdict:
        assert self.store is not None and self._outbox is not None and self._services is not None
        bound = self._log.bind(pipeline=command.pipeline_id, stage=command.stage, attempt=command.attempt)
        known = self.store.get(command.attempt)
        action = on_run_stage(command, me=self.agent_id, known=known, draining=self._draining)
        match action:
            case "wrong_agent":
                bound.error("command_for_another_agent", addressed_to=command.agent)
                return "term"
            case "refuse":
                # Never accepted: the scheduler's accept deadline re-places it on another agent.
                bound.info("attempt_refused", reason="draining")
                return "term"
            case "already_running":
                bound.info("attempt_duplicate", state=known.state if known else None)
                return "ack"
            case "already_finished":
                if known is not None and known.finished is not None:
                    self._outbox.report(known.finished)  # same report id: harmless if it already arrived
                bound.info("attempt_duplicate", state="finished")
                return "ack"
            case "accept":
                pass
        try:
            paths = attempt_paths(
                self.data_dir, pipeline_id=command.pipeline_id, stage=command.stage, attempt=command.attempt
            )
        except ValueError as exc:
            # Deterministic: every redelivery would fail the same way, so fail the attempt now (T15).
            bound.error("command_poison", error=str(exc))
            with contextlib.suppress(ValueError, OSError):
                why = f"poison command: the agent cannot run this RunStage: {exc}"
                self._end_here(
                    command.pipeline_id, command.stage, command.attempt, command.spec.kind, "failed", "poison", why
                )
            return "term"
        paths.work_dir.mkdir(parents=True, exist_ok=True)
        self.store.put(
            AttemptRecord(
                attempt=command.attempt,
                pipeline_id=command.pipeline_id,
                stage=command.stage,
                kind=command.spec.kind,
                state="accepted",
                updated_at=utcnow(),
                work_dir=str(paths.work_dir),
            )
        )
        self._outbox.report(
            AttemptAcceptedReport(
                report_id=new_id(),
                agent=self.agent_id,
                sent_at=utcnow(),
                pipeline_id=command.pipeline_id,
                stage=command.stage,
                attempt=command.attempt,
            )
        )
        run = AttemptRun(command, paths, self._services)
        self._runs[command.attempt] = run
        task = asyncio.get_running_loop().create_task(self._execute(run), name="attempt")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        bound.info("attempt_accepted", kind=command.spec.kind, gpus=list(command.gpus))
        return "ack"

    async def _execute(self, run: AttemptRun) -> None:
        try:
            await run.execute()
        except Exception as exc:  # the agent's own machinery failed (a full disk, say): say so, do not go silent
            self._log.exception("attempt_crashed", attempt=run.attempt)
            if run.finished is None:
                with contextlib.suppress(Exception):
                    why = f"the agent failed while running the attempt: {exc!r}"
                    self._end_here(run.pipeline_id, run.stage, run.attempt, run.spec.kind, "failed", "infra", why)
        finally:
            self._runs.pop(run.attempt, None)
            self._maybe_exit()

    async def _on_poison_command(self, command: AnyCommand, exc: BaseException, delivered: int) -> None:
        """A command whose handler failed on every delivery: a RunStage's attempt ends `failed/poison`
        with the error, so the scheduler fails the stage at once (T15) instead of re-placing it."""
        if not isinstance(command, RunStage) or command.agent != self.agent_id:
            return
        assert self.store is not None
        known = self.store.get(command.attempt)
        if known is not None and known.state == "finished":
            return
        why = f"poison command: handling RunStage failed {delivered} times, last with {type(exc).__name__}: {exc}"
        self._end_here(
            command.pipeline_id, command.stage, command.attempt, command.spec.kind, "failed", "poison", why[:2000]
        )

    def _on_cancel(self, command: CancelAttempt) -> Verdict:
        assert self.store is not None and self._outbox is not None
        bound = self._log.bind(pipeline=command.pipeline_id, stage=command.stage, attempt=command.attempt)
        known = self.store.get(command.attempt)
        match on_cancel(command, me=self.agent_id, known=known):
            case "wrong_agent":
                bound.error("command_for_another_agent", addressed_to=command.agent)
                return "term"
            case "already_finished":
                bound.info("cancel_ignored", reason="already finished")
                return "ack"
            case "stop":
                run = self._runs.get(command.attempt)
                if run is not None:
                    bound.info("attempt_cancelling", reason=command.reason)
                    self._spawn(run.stop("cancelled", command.reason))
                return "ack"
            case "tombstone":
                why = f"{command.reason} (before it started on this agent)"
                self._end_here(command.pipeline_id, command.stage, command.attempt, "unknown", "cancelled", None, why)
                bound.info("attempt_cancelled_before_start")
                return "ack"

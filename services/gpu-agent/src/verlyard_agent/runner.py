"""Adapter: one attempt, start to end. `AttemptRun` is the agent's implementation of the stage-kind port
(`stages.base.AttemptContext`): it runs the kind, streams its children's output, batches metrics,
throttles progress, enforces the watchdog and the stage timeout, stops the process group on cancel,
classifies failures and journals every report (accepted is sent by the agent before this starts).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shlex
import time
import traceback
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

import msgspec
import psutil
import structlog

from verlyard_agent import oomwatch, process
from verlyard_agent.attempts import AttemptStore
from verlyard_agent.batching import Progress, Throttle
from verlyard_agent.childenv import child_env
from verlyard_agent.datasets import DatasetFetcher, DatasetMissing, DatasetUnavailable
from verlyard_agent.failures import StopReason, classify
from verlyard_agent.inventory import GpuProbe
from verlyard_agent.layout import AttemptPaths
from verlyard_agent.lifecycle import AttemptRecord
from verlyard_agent.outbox import AttemptTelemetry, Outbox, utcnow
from verlyard_agent.stages import ignored_params, resolve
from verlyard_agent.stages.base import StageFailure, StageResult
from verlyard_agent.watchdog import StepWatch, WatchdogPolicy
from verlyard_shared.commands import RunStage
from verlyard_shared.ids import new_id
from verlyard_shared.reports import (
    AttemptFinishedReport,
    AttemptProgressReport,
    AttemptStartedReport,
    CheckpointReport,
)
from verlyard_shared.spec import StageSpec

log = structlog.get_logger("verlyard.agent.runner")

TAIL_LINES = 2000
PROGRESS_INTERVAL_S = 1.0


@dataclass(kw_only=True)
class RunnerServices:
    """What every attempt gets from its agent."""

    agent_id: str
    outbox: Outbox
    store: AttemptStore
    datasets_dir: Path
    trainer_python: str | None
    host_env: Mapping[str, str]
    cancel_grace_s: float = 10.0
    watchdog: WatchdogPolicy = field(default_factory=WatchdogPolicy)
    probe: GpuProbe | None = None
    spawner: Spawner | None = None
    """Starts a stage's child; None: a local process (`process.spawn`). The SSH runner's spawner starts it
    on a remote host instead (verlyard_agent/ssh/, docs/adr/0011-ssh-hosts.md)."""
    datasets: DatasetFetcher | None = None
    """Fetches pushed datasets from the object store; None: only what is in `datasets_dir` already."""


class RunningChild(Protocol):
    """What an attempt needs of its running child (`process.Child`, or a remote one)."""

    @property
    def pid(self) -> int: ...

    @property
    def pgid(self) -> int: ...

    async def wait(self) -> int: ...

    def members(self) -> list[psutil.Process]:
        """Local processes to signal or dump (a remote child has none here)."""
        ...

    async def stop_group(self, grace_s: float) -> process.StopResult: ...


class Spawner(Protocol):
    """`process.spawn`'s signature: start argv in its own process group, stream its lines to `on_line`."""

    async def __call__(
        self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, on_line: process.LineSink
    ) -> RunningChild: ...


def folder_size(path: str) -> int | None:
    """Total bytes of the files under `path` (a checkpoint folder); None when it cannot be read."""
    root = Path(path)
    try:
        return sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) if root.is_dir() else root.stat().st_size
    except OSError:
        return None


def _watchdog_policy(params: Mapping[str, Any], default: WatchdogPolicy) -> WatchdogPolicy | None:
    """`with: {watchdog: false}` turns it off; `with: {watchdog: {floor_s: 600, factor: 20}}` tunes it."""
    raw = params.get("watchdog")
    if raw is False:
        return None
    if isinstance(raw, Mapping):
        settings: Mapping[str, Any] = raw  # pyright: ignore[reportUnknownVariableType]
        floor = settings.get("floor_s", default.floor_s)
        factor = settings.get("factor", default.factor)
        if isinstance(floor, int | float) and isinstance(factor, int | float) and floor > 0 and factor > 0:
            return WatchdogPolicy(floor_s=float(floor), factor=float(factor), window=default.window)
    return default


class AttemptRun:
    """One attempt of a stage on this agent (implements `AttemptContext`)."""

    pipeline_id: str
    pipeline_name: str
    stage: str
    attempt: str
    attempt_number: int
    spec: StageSpec
    params: Mapping[str, Any]
    inputs: Mapping[str, Mapping[str, Any]]
    work_dir: Path
    stage_dir: Path
    pipeline_dir: Path
    gpus: tuple[int, ...]
    resume_from_path: str | None
    trainer_python: str | None
    datasets_dir: Path

    def __init__(self, command: RunStage, paths: AttemptPaths, services: RunnerServices) -> None:
        self.command = command
        self.pipeline_id = command.pipeline_id
        self.pipeline_name = command.pipeline_name
        self.stage = command.stage
        self.attempt = command.attempt
        self.attempt_number = command.attempt_number
        self.spec = command.spec
        self.params = command.spec.params
        self.inputs = command.inputs
        self.work_dir = paths.work_dir
        self.stage_dir = paths.stage_dir
        self.pipeline_dir = paths.pipeline_dir
        self.gpus = tuple(command.gpus)
        self.resume_from_path = command.resume_from_path
        self.trainer_python = services.trainer_python
        self.datasets_dir = services.datasets_dir
        self._paths = paths
        self._services = services
        self._log = log.bind(
            agent=services.agent_id, pipeline=command.pipeline_id, stage=command.stage, attempt=command.attempt
        )
        self._telemetry = AttemptTelemetry(
            services.outbox, pipeline_id=command.pipeline_id, stage=command.stage, attempt=command.attempt
        )
        self._log_file: IO[str] | None = None
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._lines = 0
        self._child: RunningChild | None = None
        self._stop: StopReason | None = None
        self._stop_detail = ""
        self._oom_kills_before: int | None = None
        self._stop_notes: list[str] = []
        policy = _watchdog_policy(self.params, services.watchdog)
        self._watch: StepWatch | None = StepWatch(policy) if policy is not None else None
        self._throttle = Throttle(PROGRESS_INTERVAL_S)
        self._progress_timer: asyncio.TimerHandle | None = None
        self._kind_task: asyncio.Task[StageResult] | None = None
        self._nan_keys: set[str] = set()
        self._background: set[asyncio.Task[None]] = set()
        self.finished: AttemptFinishedReport | None = None

    # ---- AttemptContext ------------------------------------------------------------------------------

    async def run_process(
        self, argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None
    ) -> int:
        if self._child is not None:
            raise RuntimeError("an attempt runs one child process at a time")
        if self._stop is not None:
            raise StageFailure(f"not starting {argv[0]!r}: the attempt is being stopped ({self._stop})")
        argv = [str(a) for a in argv]
        full_env = child_env(
            self._services.host_env,
            env,
            gpus=self.gpus,
            pipeline_id=self.pipeline_id,
            stage=self.stage,
            attempt=self.attempt,
            work_dir=str(self.work_dir),
        )
        self.log(f"$ {shlex.join(argv)}  (CUDA_VISIBLE_DEVICES={full_env['CUDA_VISIBLE_DEVICES']!r})")
        try:
            spawn = self._services.spawner or process.spawn
            child = await spawn(argv, env=full_env, cwd=cwd or self.work_dir, on_line=self._on_line)
        except FileNotFoundError:
            raise StageFailure(f"cannot run {argv[0]!r}: no such program", exit_code=127) from None
        except PermissionError:
            raise StageFailure(f"cannot run {argv[0]!r}: permission denied", exit_code=126) from None
        except OSError as exc:
            raise StageFailure(f"cannot run {argv[0]!r}: {exc}", failure_class="infra") from None
        self._child = child
        try:
            code = await child.wait()
        finally:
            # Whatever the child left in its group (daemons, workers) must not outlive it: it would
            # hold GPUs that the scheduler believes free.
            if child.members():
                result = await child.stop_group(min(self._services.cancel_grace_s, 5.0))
                self.log(
                    f"stopped what process {child.pid} left running in its group "
                    f"({'SIGKILL' if result.killed else 'SIGTERM'}, {result.elapsed_s:.1f} s)"
                )
            self._child = None
        self.log(f"process {child.pid} exited with code {code}")
        return code

    def log(self, text: str) -> None:
        for line in text.splitlines() or [""]:
            self._emit("agent", line)

    def _oom_kills_during(self) -> int | None:
        """OOM kills in the agent's memory cgroup since the attempt started (None: not readable). A
        shared cgroup may count another process's kill too: then it still reads as an OOM, as before."""
        after = oomwatch.oom_kills()
        if after is None or self._oom_kills_before is None:
            return None
        return max(0, after - self._oom_kills_before)

    async def fetch_dataset(self, name: str) -> Path | None:
        fetcher = self._services.datasets
        if fetcher is None:
            return None
        self.log(f"dataset {name} is not on this host yet: fetching it from the object store")
        try:
            path = await fetcher.fetch(name)
        except DatasetMissing as exc:
            raise StageFailure(str(exc)) from None
        except DatasetUnavailable as exc:
            raise StageFailure(str(exc), failure_class="infra") from None
        self.log(f"dataset {name} fetched ({path.stat().st_size} bytes, sha256 {path.name})")
        return path

    def metrics(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            number = float(value)
            if not math.isfinite(number):
                # JSON has no NaN/inf: say so once per key instead of publishing an unreadable point.
                if key not in self._nan_keys:
                    self._nan_keys.add(key)
                    self.log(f"metric {key} is {number} at step {step}: not published (not a finite number)")
                continue
            self._telemetry.metric(step, key, number)

    def progress(self, step: int, total_steps: int | None) -> None:
        now = time.monotonic()
        if self._watch is not None:
            self._watch.observe(step, now)
        value = self._throttle.offer(Progress(step=step, total_steps=total_steps), now)
        if value is not None:
            self._report_progress(value)
            return
        due = self._throttle.pending_due_at()
        if due is not None and self._progress_timer is None:
            self._progress_timer = asyncio.get_running_loop().call_later(max(0.0, due - now), self._flush_progress)

    def checkpoint(self, step: int, path: str) -> None:
        size = folder_size(path)
        self.log(f"checkpoint of step {step} complete: {path} ({size} bytes)")
        self._services.outbox.report(
            CheckpointReport(
                **self._header(),
                step=step,
                path=path,
                size_bytes=size,
            )
        )

    @property
    def cancelled(self) -> bool:
        """True once the attempt is being stopped (cancel, hang, timeout or agent shutdown)."""
        return self._stop is not None

    # ---- output --------------------------------------------------------------------------------------

    def _header(self) -> dict[str, Any]:
        """The fields every report of this attempt starts with (a fresh report id each time)."""
        return {
            "report_id": new_id(),
            "agent": self._services.agent_id,
            "sent_at": utcnow(),
            "pipeline_id": self.pipeline_id,
            "stage": self.stage,
            "attempt": self.attempt,
        }

    def _on_line(self, stream: str, text: str) -> None:
        self._emit(stream, text)

    def _emit(self, stream: str, text: str) -> None:
        offset = self._lines
        self._lines += 1
        self._tail.append(text)
        if self._log_file is not None:
            with contextlib.suppress(OSError):  # a full disk must not stop the attempt's output
                self._log_file.write(("[verlyard] " + text if stream == "agent" else text) + "\n")
        self._telemetry.line(offset, stream, text)

    def _report_progress(self, value: Progress) -> None:
        self._services.outbox.report(
            AttemptProgressReport(
                **self._header(),
                step=value.step,
                total_steps=value.total_steps,
            )
        )

    def _flush_progress(self) -> None:
        self._progress_timer = None
        value = self._throttle.take_pending(time.monotonic())
        if value is not None:
            self._report_progress(value)

    # ---- lifecycle -----------------------------------------------------------------------------------

    @property
    def stop_reason(self) -> StopReason | None:
        return self._stop

    def _spawn_stop(self, reason: StopReason, detail: str) -> None:
        task = asyncio.get_running_loop().create_task(self.stop(reason, detail))
        self._background.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._background.discard)

    async def stop(self, reason: StopReason, detail: str) -> None:
        """Stop the attempt: SIGTERM its process group, grace, SIGKILL, verify; the first reason wins."""
        if self._stop is not None or self.finished is not None:
            return
        self._stop, self._stop_detail = reason, detail
        self.log(f"stopping ({reason}): {detail}")
        self._log.info("attempt_stopping", reason=reason, detail=detail)
        grace = self._services.cancel_grace_s
        child = self._child
        if child is not None:
            result = await child.stop_group(grace)
            how = "SIGKILL after the grace period" if result.killed else "SIGTERM"
            if result.survivors:
                note = f"processes {list(result.survivors)} survived SIGKILL"
                self._stop_notes.append(note)
                self.log(f"WARNING: {note}")
            else:
                self.log(f"process group {child.pgid} is gone ({how}, {result.elapsed_s:.1f} s)")
            await self._check_gpus_free()
        task = self._kind_task
        if task is None or task.done():
            return
        if child is None:
            task.cancel()  # an in-process kind (noop, cleanup): nothing to wait for
            return
        _, pending = await asyncio.wait({task}, timeout=grace)
        if pending:
            task.cancel()

    async def _check_gpus_free(self) -> None:
        probe = self._services.probe
        if probe is None or not self.gpus:
            return
        try:
            used = await asyncio.wait_for(asyncio.to_thread(probe.processes, self.gpus), timeout=10.0)
        except (TimeoutError, OSError) as exc:
            self.log(f"could not check the GPUs after stopping: {exc!r}")
            return
        busy = {gpu: pids for gpu, pids in used.items() if pids}
        if busy:
            note = "GPUs still in use after stopping: " + ", ".join(
                f"GPU {g} by pids {list(p)}" for g, p in busy.items()
            )
            self._stop_notes.append(note)
            self.log(f"WARNING: {note}")
        else:
            self.log(f"GPUs {', '.join(str(g) for g in self.gpus)} are free")

    def _record(self, state: str, finished: AttemptFinishedReport | None = None) -> None:
        self._services.store.put(
            AttemptRecord(
                attempt=self.attempt,
                pipeline_id=self.pipeline_id,
                stage=self.stage,
                kind=self.spec.kind,
                state="finished" if state == "finished" else "running",
                updated_at=utcnow(),
                work_dir=str(self.work_dir),
                finished=finished,
            )
        )

    async def execute(self) -> AttemptFinishedReport:
        """Run the attempt to its end and journal `rpt.finished` (never raises for a stage's failure)."""
        if self.spec.kind != "noop":  # in-process: the OOM killer would take the agent, not the attempt
            self._oom_kills_before = oomwatch.oom_kills()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = self._paths.log_file.open("a", encoding="utf-8", buffering=1)
        self._record("running")
        self._services.outbox.report(
            AttemptStartedReport(
                **self._header(),
            )
        )
        gpus = ",".join(str(g) for g in self.gpus) or "none"
        self.log(
            f"attempt {self.attempt_number} ({self.attempt}) of {self.pipeline_name}/{self.stage} "
            f"[{self.spec.kind}] on agent {self._services.agent_id}; GPUs: {gpus}; work dir {self.work_dir}"
        )
        self._log.info("attempt_started", kind=self.spec.kind, gpus=list(self.gpus))
        watchdog = asyncio.create_task(self._watchdog())
        timeout: asyncio.TimerHandle | None = None
        if self.spec.timeout_s is not None:
            limit = self.spec.timeout_s
            timeout = asyncio.get_running_loop().call_later(
                limit, self._spawn_stop, "timeout", f"the stage's timeout of {limit:g} s elapsed"
            )
        try:
            if self._stop is not None:
                result = StageResult(outcome="failed", reason="stopped before it started")
            else:
                self._kind_task = asyncio.create_task(self._run_kind())
                try:
                    result = await self._kind_task
                except asyncio.CancelledError:
                    if not self._kind_task.cancelled() or self._stop is None:
                        raise
                    result = StageResult(outcome="failed", reason=self._stop_detail)
        finally:
            watchdog.cancel()
            if timeout is not None:
                timeout.cancel()
        report = self._finish(result)
        return report

    async def _run_kind(self) -> StageResult:
        kind = self.spec.kind
        if ignored := ignored_params(kind, self.params):
            self.log(f"ignoring with: keys a {kind} stage does not read: {', '.join(ignored)}")
        try:
            run = resolve(kind)
            result = await run(self)
        except StageFailure as failure:
            self.log(f"stage failed: {failure.reason}")
            return StageResult(
                outcome="failed",
                failure_class=failure.failure_class,
                reason=failure.reason,
                exit_code=failure.exit_code,
            )
        except Exception as exc:
            self.log("".join(traceback.format_exception(exc)).rstrip())
            self._log.exception("stage_kind_crashed", kind=kind)
            return StageResult(
                outcome="failed", failure_class="infra", reason=f"internal error in the {kind} stage: {exc!r}"
            )
        if not isinstance(result, StageResult):  # pyright: ignore[reportUnnecessaryIsInstance]
            return StageResult(outcome="failed", failure_class="infra", reason=f"{kind} returned {result!r}")
        return result

    async def _watchdog(self) -> None:
        watch = self._watch
        if watch is None:
            return
        while True:
            wait = watch.seconds_until_due(time.monotonic())
            await asyncio.sleep(1.0 if wait is None else min(max(wait, 0.05), 5.0))
            hang = watch.check(time.monotonic())
            if hang is None:
                continue
            self.log(f"watchdog: {hang.reason}")
            child = self._child
            if child is not None:
                stacks = await process.dump_stacks([p.pid for p in child.members()])
                if stacks is not None:
                    dump = self.work_dir / f"stacks-{int(time.time())}.txt"
                    with contextlib.suppress(OSError):
                        dump.write_text(stacks)
                    self.log(stacks)
                else:
                    self.log("py-spy is not installed: no stack dump (pip install py-spy)")
            await self.stop("hang", hang.reason)
            return

    def _finish(self, result: StageResult) -> AttemptFinishedReport:
        outcome, failure_class, reason = result.outcome, result.failure_class, result.reason
        stop = self._stop
        outputs = result.outputs
        if outcome == "succeeded":
            try:
                msgspec.json.encode(outputs)
            except (TypeError, ValueError, msgspec.EncodeError) as exc:
                outcome, failure_class, reason, outputs = "failed", "infra", f"outputs are not JSON: {exc}", {}
        if outcome != "succeeded":
            outputs = result.outputs if outcome == "failed" else {}
            if stop == "cancelled":
                outcome, failure_class, reason = "cancelled", None, self._stop_detail or "cancelled"
            elif stop is not None or failure_class is None:
                tail = list(self._tail)
                diagnosis = classify(
                    result.exit_code,
                    tail,
                    stop=stop,
                    stop_detail=self._stop_detail,
                    first_line=self._lines - len(tail),
                    oom_kills=self._oom_kills_during(),
                )
                outcome, failure_class = "failed", diagnosis.failure_class
                reason = diagnosis.reason if stop is not None or not reason else f"{diagnosis.reason} ({reason})"
                if stop is None and diagnosis.line is not None:
                    self.log(f"failure class {failure_class}: decided by attempt.log line {diagnosis.line}")
            if self._stop_notes:
                reason = "; ".join([reason, *self._stop_notes])
        if self._progress_timer is not None:
            self._progress_timer.cancel()
            self._flush_progress()
        self.log(f"attempt ended: {outcome}" + (f" [{failure_class}] {reason}" if outcome != "succeeded" else ""))
        self._telemetry.close()
        report = AttemptFinishedReport(
            **self._header(),
            outcome=outcome,
            exit_code=result.exit_code,
            failure_class=failure_class if outcome == "failed" else None,
            reason=reason,
            outputs=dict(outputs),
        )
        self._services.outbox.report(report)
        self._record("finished", report)
        self.finished = report
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None
        self._log.info("attempt_finished", outcome=outcome, failure_class=report.failure_class, reason=reason)
        return report

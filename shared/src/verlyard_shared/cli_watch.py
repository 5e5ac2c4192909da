"""Entrypoint: `submit --watch` / `status --watch`. A live view of a pipeline until it ends, refreshed from
its SSE stream (GET /api/v1/pipelines/{id}/stream) or, where that is unavailable, by polling every 0.5 s.

On a terminal: a Rich live view (the stage tree, progress bars, loss, the running stage's last log
lines). Otherwise: one plain line per state change. The exit code is the pipeline's outcome.
"""

from __future__ import annotations

import contextlib
import json
import math
import queue
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

import httpx
from rich.live import Live

from verlyard_shared.cli import CliError
from verlyard_shared.cli_api import ApiCallError, api_client, call, stream
from verlyard_shared.cli_commands import console, emit_json, get_pipeline, now, path_part, stage_path
from verlyard_shared.cli_plot import curves_from_api, loss_key
from verlyard_shared.cli_render import (
    PIPELINE_TERMINAL,
    SseMessage,
    exit_code_for,
    final_line,
    pipeline_view,
    sse_messages,
    state_changes,
)
from verlyard_shared.settings import Settings

POLL_S: Final = 0.5
"""Without the live stream, the state is read this often."""
CATCH_UP_S: Final = 0.1
"""While the read model lags an event the stream showed, the state is read again this often."""
RESYNC_S: Final = 5.0
"""With the live stream, the full state is still re-read this often (a missed message heals)."""
METRICS_EVERY_S: Final = 2.0
LOGS_EVERY_S: Final = 1.0
LOG_LINES: Final = 8
LOG_PAGES_PER_TICK: Final = 10
"""A long log is caught up over several refreshes, not in one blocking read."""
GIVE_UP_S: Final = 30.0
"""How long the API may stay unreachable during a watch before it ends with exit code 2."""
STATE_EVENTS: Final = ("pipeline.", "stage.", "attempt.", "checkpoint.")


class Extras:
    """The loss of running training stages and the last log lines of the running stage, read from the
    metrics and logs endpoints at most every METRICS_EVERY_S / LOGS_EVERY_S. A missing endpoint (404 from
    an older server) is not asked again."""

    def __init__(self, client: httpx.Client, pipeline_id: str) -> None:
        self.client = client
        self.pipeline_id = pipeline_id
        self.losses: dict[str, float] = {}
        self.log_stage = ""
        self.log_attempt = ""
        self.log_lines: deque[str] = deque(maxlen=LOG_LINES)
        self._log_offset = 0
        self._metrics_ok = True
        self._logs_ok = True
        self._metrics_at = -math.inf
        self._logs_at = -math.inf

    def refresh(self, pipeline: Mapping[str, Any], *, logs: bool = True) -> None:
        running = [
            (name, s)
            for name, s in (pipeline.get("stages") or {}).items()
            if s.get("status") == "running" and s.get("attempts")
        ]
        clock = time.monotonic()
        if self._metrics_ok and clock - self._metrics_at >= METRICS_EVERY_S:
            self._metrics_at = clock
            for name, stage in running:
                if stage.get("kind") == "train" or stage["attempts"][-1].get("total_steps") is not None:
                    self._fetch_loss(name)
        if logs and self._logs_ok and running and clock - self._logs_at >= LOGS_EVERY_S:
            self._logs_at = clock
            name, stage = running[-1]
            self._fetch_logs(name, str(stage["attempts"][-1]["id"]))

    def _fetch_loss(self, stage: str) -> None:
        try:
            # LTTB keeps each series' last point: three points per key are enough for "the current loss".
            body = call(self.client, "GET", stage_path(self.pipeline_id, stage, "metrics"), params={"max_points": 3})
        except ApiCallError as exc:
            self._metrics_ok = exc.status != 404
            return
        except CliError:
            return
        curves = curves_from_api(body)
        key = loss_key(k for k, c in curves.items() if c.points)
        if key is not None:
            self.losses[stage] = curves[key].points[-1][1]

    def _fetch_logs(self, stage: str, attempt: str) -> None:
        if (stage, attempt) != (self.log_stage, self.log_attempt):
            self.log_stage, self.log_attempt = stage, attempt
            self.log_lines.clear()
            self._log_offset = 0
        path = stage_path(self.pipeline_id, stage, "logs")
        for _ in range(LOG_PAGES_PER_TICK):
            params = {"attempt": attempt, "offset": self._log_offset, "limit": 1000}
            try:
                page = call(self.client, "GET", path, params=params)
            except ApiCallError as exc:
                self._logs_ok = exc.status != 404
                return
            except CliError:
                return
            for line in page.get("items") or []:
                self.log_lines.append(str(line.get("text", "")).rstrip())
                self._log_offset = int(line.get("offset", self._log_offset)) + 1
            if page.get("next") is None:
                return


class _Stream(threading.Thread):
    """Reads the pipeline's SSE stream into a queue: ("message", SseMessage), ("unavailable", reason)
    when the server has no such stream, ("down", reason) while it cannot connect (it retries)."""

    def __init__(self, settings: Settings, pipeline_id: str, inbox: queue.Queue[tuple[str, Any]]) -> None:
        # Events only: metrics and logs are read on demand (the stream would replay their whole history).
        super().__init__(name="verlyard-watch-stream", daemon=True)
        self.settings = settings
        self.pipeline_id = pipeline_id
        self.inbox = inbox
        self.stop = threading.Event()
        self.client: httpx.Client | None = None

    def run(self) -> None:
        last_id: str | None = None
        while not self.stop.is_set():
            try:
                with api_client(self.settings, timeout=30.0) as client:
                    self.client = client
                    headers = {"Accept": "text/event-stream"} | ({"Last-Event-ID": last_id} if last_id else {})
                    path = f"/api/v1/pipelines/{path_part(self.pipeline_id)}/stream"
                    with stream(
                        client,
                        "GET",
                        path,
                        params={"metrics": "false", "logs": "false"},
                        headers=headers,
                        timeout=httpx.Timeout(10.0, read=60.0),
                    ) as resp:
                        self.inbox.put(("connected", None))
                        for message in sse_messages(resp.iter_lines()):
                            last_id = message.id or last_id
                            self.inbox.put(("message", message))
                            if self.stop.is_set() or message.event == "end":
                                return
            except ApiCallError as exc:
                # 404: this server has no live stream (or not yet); 401/403 repeat on the state reads.
                self.inbox.put(("unavailable", str(exc)))
                return
            except (CliError, httpx.HTTPError, OSError) as exc:
                if self.stop.is_set():
                    return
                self.inbox.put(("down", str(exc)))
            if self.stop.wait(1.0):
                return

    def close(self) -> None:
        self.stop.set()
        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()


class Watch:
    def __init__(self, settings: Settings, client: httpx.Client, pipeline_id: str, *, live: bool) -> None:
        self.settings = settings
        self.client = client
        self.pipeline_id = pipeline_id
        self.live = live
        self.extras = Extras(client, pipeline_id)
        self.inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.stream: _Stream | None = None
        self.streaming = False
        self.failing_since: float | None = None
        self.seen_version = 0
        """The highest pipeline stream version the live stream has shown."""

    def fetch(self) -> dict[str, Any] | None:
        """The pipeline's state; None while the API is unreachable (for up to GIVE_UP_S)."""
        try:
            state = get_pipeline(self.client, self.pipeline_id)
        except ApiCallError:
            raise
        except CliError:
            self.failing_since = self.failing_since or time.monotonic()
            if time.monotonic() - self.failing_since > GIVE_UP_S:
                raise
            return None
        self.failing_since = None
        return state

    def changes_state(self, message: SseMessage) -> bool:
        """A lifecycle event (or the stream's `end`): the pipeline's state is worth reading again.

        Remembers the event's stream version: the state is read from a projection that may lag the log
        by a moment, so it is read again until it reflects that version."""
        if message.event == "end":
            return True
        if not message.event.startswith(STATE_EVENTS):
            return False
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            self.seen_version = max(self.seen_version, int(json.loads(message.data).get("version") or 0))
        return True

    def run(self, *, as_json: bool) -> int:
        state = None
        while state is None:
            state = self.fetch()
            if state is None:
                time.sleep(POLL_S)
        self.pipeline_id = str(state["id"])
        if state["status"] not in PIPELINE_TERMINAL:
            self.stream = _Stream(self.settings, self.pipeline_id, self.inbox)
            self.stream.start()
        try:
            if as_json:
                state = self._loop(state, lambda old, new: None)
                emit_json(state)
            elif self.live:
                state = self._live(state)
            else:
                state = self._lines(state)
        finally:
            if self.stream is not None:
                self.stream.close()
        return exit_code_for(str(state["status"]))

    def _lines(self, state: dict[str, Any]) -> dict[str, Any]:
        def show(old: dict[str, Any] | None, new: dict[str, Any]) -> None:
            stamp = time.strftime("%H:%M:%S")
            for line in state_changes(old, new, now()):
                print(f"{stamp} {line}", flush=True)

        show(None, state)
        state = self._loop(state, show)
        print(final_line(state, now()), flush=True)
        return state

    def _live(self, state: dict[str, Any]) -> dict[str, Any]:
        out = console()

        def view(current: dict[str, Any]) -> Any:
            title = f"{self.extras.log_stage} (attempt log)" if self.extras.log_lines else ""
            return pipeline_view(
                current,
                now(),
                losses=self.extras.losses,
                log_lines=list(self.extras.log_lines),
                log_title=title,
                styled=True,
            )

        self.extras.refresh(state)
        with Live(view(state), console=out, refresh_per_second=4, transient=False) as live:
            state = self._loop(state, lambda old, new: live.update(view(new)), tick=lambda s: live.update(view(s)))
            live.update(view(state))
        out.print(final_line(state, now()))
        return state

    def _loop(self, state: dict[str, Any], changed: Any, tick: Any = None) -> dict[str, Any]:
        last_read = time.monotonic()
        while state["status"] not in PIPELINE_TERMINAL:
            dirty = False
            items: list[tuple[str, Any]] = []
            lagging = int(state.get("version") or 0) < self.seen_version
            try:
                items.append(self.inbox.get(timeout=CATCH_UP_S if lagging else POLL_S))
                while True:
                    items.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
            for kind, value in items:
                if kind == "connected":
                    self.streaming, dirty = True, True
                elif kind in ("unavailable", "down"):
                    self.streaming = False
                elif kind == "message":
                    dirty = self.changes_state(value) or dirty
            since = time.monotonic() - last_read
            behind = int(state.get("version") or 0) < self.seen_version and since >= CATCH_UP_S
            if dirty or behind or since >= (RESYNC_S if self.streaming else POLL_S):
                fresh = self.fetch()
                last_read = time.monotonic()
                if fresh is not None:
                    old, state = state, fresh
                    if self.live:
                        self.extras.refresh(state)
                    changed(old, state)
                    continue
            if self.live:
                self.extras.refresh(state)
            if tick is not None:
                tick(state)
        return state


def watch(settings: Settings, client: httpx.Client, pipeline_id: str, *, as_json: bool = False) -> int:
    """Follow the pipeline until it ends; its outcome is the exit code (0 succeeded, 1 failed, 3 cancelled)."""
    live = sys.stdout.isatty() and not as_json
    try:
        return Watch(settings, client, pipeline_id, live=live).run(as_json=as_json)
    except KeyboardInterrupt:
        print(f"\nstopped watching; the pipeline keeps running: verlyard status {pipeline_id}", file=sys.stderr)
        raise

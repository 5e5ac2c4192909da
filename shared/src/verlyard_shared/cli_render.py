"""Pure core: what the CLI shows. The DAG as an indented tree with progress, tables, events, one-line
errors and the exit codes of a watched pipeline. Inputs are the API's JSON; time is a parameter."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from rich.console import Console, Group, RenderableType
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

# ---- exit codes ------------------------------------------------------------------------------------------

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
"""The watched pipeline failed (also: `replay --verify` found a difference)."""
EXIT_USAGE: Final = 2
"""Bad arguments, an API error, or the API cannot be reached."""
EXIT_CANCELLED: Final = 3
"""The watched pipeline was cancelled."""
EXIT_INTERRUPTED: Final = 130


PIPELINE_TERMINAL: Final = frozenset({"succeeded", "failed", "cancelled"})
STAGE_TERMINAL: Final = frozenset({"succeeded", "failed", "skipped", "cancelled"})

AUDIT_KEYS: Final = (
    "position",
    "event_id",
    "stream_id",
    "version",
    "type",
    "recorded_at",
    "actor",
    "correlation_id",
    "causation_id",
    "data",
)
"""The public audit shape of an event (interface.md), in this order, and nothing else."""


def exit_code_for(status: str) -> int:
    """A terminal pipeline status -> the exit code of `submit --watch` / `status --watch`."""
    match status:
        case "succeeded":
            return EXIT_OK
        case "failed":
            return EXIT_FAILED
        case "cancelled":
            return EXIT_CANCELLED
        case _:
            return EXIT_USAGE


# ---- errors ----------------------------------------------------------------------------------------------

NO_VALID_TOKEN: Final = "no valid token (set VERLYARD_TOKEN or run inside the embedded stack's home)"


def unreachable_message(url: str) -> str:
    return f"cannot reach the API at {url} (is `verlyard up` running?)"


def api_error_message(status: int, body: Any, text: str = "") -> str:
    """An API error response -> the message after `verlyard: error: `.

    One line, except a bad spec (400/422 with `issues`), which lists each issue on its own indented line
    as `stages.x.field (line N): message`.
    """
    if status == 401:
        return NO_VALID_TOKEN
    if isinstance(body, Mapping):
        code = str(body.get("error") or "error")
        detail = str(body.get("detail") or text or "")
        issues = body.get("issues") or []
    else:
        code, detail, issues = "error", (text.strip() or "no detail"), []
    head = f"{status} {code}: {_one_line(detail)}"
    if status in (400, 413, 422) and isinstance(issues, list) and issues:
        lines = [format_issue(i) for i in issues if isinstance(i, Mapping)]
        lines = [line for line in lines if line]
        # The detail usually repeats the first issue; keep the head short when issues follow.
        if lines:
            return "\n".join([f"{status} {code}: {_first_sentence(detail)}", *(f"  {line}" for line in lines)])
    return head


def format_issue(issue: Mapping[str, Any]) -> str:
    path = str(issue.get("path") or "")
    line = issue.get("line")
    message = _one_line(str(issue.get("message") or ""))
    where = path or "(document)"
    if isinstance(line, int) and not isinstance(line, bool):
        where = f"{where} (line {line})"
    return f"{where}: {message}"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _first_sentence(detail: str) -> str:
    text = _one_line(detail)
    head, sep, _ = text.partition(": ")
    # "3 problem(s) in the spec: stages.x ..." -> "3 problem(s) in the spec"
    return head if sep and len(head) < 80 else text


# ---- times -----------------------------------------------------------------------------------------------


def parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def fmt_duration(seconds: float | None) -> str:
    """4.2s, 3m05s, 2h03m, 1d02h; '' for None."""
    if seconds is None or math.isnan(seconds):
        return ""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def fmt_number(value: float) -> str:
    """Compact, stable number formatting for losses and metric values."""
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1e5 or magnitude < 1e-3:
        return f"{value:.3e}"
    if float(value).is_integer() and magnitude < 1e5:
        return str(int(value))
    return f"{value:.4g}"


def _elapsed(start: datetime | None, end: datetime | None, now: datetime) -> float | None:
    if start is None:
        return None
    return ((end or now) - start).total_seconds()


# ---- the DAG as a tree -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TreeNode:
    name: str
    depth: int
    prefix: str
    """Box-drawing prefix (`├─ `, `│  └─ `) that indents the stage under its parent."""
    also_needs: tuple[str, ...]
    """Needs other than the parent it is drawn under."""


def topo_order(needs: Mapping[str, Sequence[str]]) -> list[str]:
    """Stages in dependency order; spec order breaks ties; unknown needs and cycles are tolerated."""
    order: list[str] = []
    placed: set[str] = set()
    remaining = list(needs)
    while remaining:
        progressed = False
        for name in list(remaining):
            if all(dep in placed or dep not in needs for dep in needs[name]):
                order.append(name)
                placed.add(name)
                remaining.remove(name)
                progressed = True
                break  # restart from the first remaining stage, so spec order wins among the ready ones
        if not progressed:  # a cycle (the API refuses them): show the rest in spec order
            order.extend(remaining)
            break
    return order


def dag_tree(needs: Mapping[str, Sequence[str]]) -> list[TreeNode]:
    """Each stage drawn under its deepest need (the longest chain from a root; later in dependency
    order on a tie); the other needs are named. Roots and siblings keep dependency order."""
    order = topo_order(needs)
    index = {name: i for i, name in enumerate(order)}
    depth: dict[str, int] = {}
    parent: dict[str, str | None] = {}
    for name in order:
        known = [d for d in needs[name] if d in index and d in depth]
        chosen = max(known, key=lambda d: (depth[d], index[d])) if known else None
        parent[name] = chosen
        depth[name] = depth[chosen] + 1 if chosen is not None else 0
    children: dict[str | None, list[str]] = {}
    for name in order:
        children.setdefault(parent[name], []).append(name)
    nodes: list[TreeNode] = []

    def visit(name: str, depth: int, lead: str, last: bool) -> None:
        prefix = "" if depth == 0 else lead + ("└─ " if last else "├─ ")
        others = tuple(d for d in needs[name] if d != parent[name])
        nodes.append(TreeNode(name=name, depth=depth, prefix=prefix, also_needs=others))
        kids = children.get(name, [])
        below = "" if depth == 0 else lead + ("   " if last else "│  ")
        for i, kid in enumerate(kids):
            visit(kid, depth + 1, below, i == len(kids) - 1)

    for root in children.get(None, []):
        visit(root, 0, "", True)
    return nodes


# ---- stage rows ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StageRow:
    name: str
    prefix: str
    status: str
    kind: str
    attempt: int | None
    agent: str
    elapsed_s: float | None
    step: int | None
    total_steps: int | None
    eta_s: float | None
    loss: float | None
    note: str
    also_needs: tuple[str, ...] = ()


def _attempts(stage: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    raw = stage.get("attempts") or []
    return [a for a in raw if isinstance(a, Mapping)]


def _eta(attempt: Mapping[str, Any], now: datetime) -> float | None:
    """Remaining seconds at the attempt's own pace (steps since it started or resumed)."""
    step, total = attempt.get("step"), attempt.get("total_steps")
    started = parse_time(attempt.get("started_at"))
    if not isinstance(step, int) or not isinstance(total, int) or started is None or total <= 0:
        return None
    done = step - (attempt.get("resumed_from_step") or 0)
    spent = (now - started).total_seconds()
    if done <= 0 or spent <= 0:
        return None
    return max(0, total - step) * spent / done


def _note(stage: Mapping[str, Any], attempt: Mapping[str, Any] | None, waiting: list[str]) -> str:
    status = stage.get("status")
    if status == "pending":
        if stage.get("pending_reason"):
            return str(stage["pending_reason"])
        if waiting:
            return "waiting for " + ", ".join(waiting)
        return ""
    if status == "failed" and attempt is not None:
        parts = [str(attempt.get("failure_class") or "failed")]
        if attempt.get("exit_code") is not None:
            parts.append(f"exit {attempt['exit_code']}")
        reason = stage.get("reason") or attempt.get("reason")
        return ", ".join(parts) + (f": {_one_line(str(reason))}" if reason else "")
    if status in ("skipped", "cancelled"):
        return _one_line(str(stage.get("reason") or ""))
    checkpoint = stage.get("checkpoint")
    if status == "succeeded" and isinstance(checkpoint, Mapping):
        return f"checkpoint step {checkpoint.get('step')}"
    if attempt is not None and attempt.get("resumed_from_step") is not None and status == "running":
        return f"resumed from step {attempt['resumed_from_step']}"
    return ""


def stage_rows(pipeline: Mapping[str, Any], now: datetime, losses: Mapping[str, float] | None = None) -> list[StageRow]:
    """The pipeline JSON (GET /api/v1/pipelines/{id}) -> one row per stage, in tree order."""
    stages: Mapping[str, Mapping[str, Any]] = pipeline.get("stages") or {}
    needs = {name: [str(d) for d in (s.get("needs") or [])] for name, s in stages.items()}
    rows: list[StageRow] = []
    for node in dag_tree(needs):
        stage = stages[node.name]
        attempts = _attempts(stage)
        current = attempts[-1] if attempts else None
        status = str(stage.get("status") or "pending")
        waiting = [d for d in needs[node.name] if (stages.get(d) or {}).get("status") != "succeeded"]
        elapsed = None
        if current is not None:
            start = parse_time(current.get("started_at")) or parse_time(current.get("placed_at"))
            end = parse_time(current.get("finished_at"))
            if end is None and status in STAGE_TERMINAL:
                end = parse_time(stage.get("finished_at")) or start
            elapsed = _elapsed(start, end, now)
        step = current.get("step") if current is not None else None
        total = current.get("total_steps") if current is not None else None
        rows.append(
            StageRow(
                name=node.name,
                prefix=node.prefix,
                status=status,
                kind=str(stage.get("kind") or ""),
                attempt=current.get("number") if current is not None else None,
                agent=str(current.get("agent") or "") if current is not None else "",
                elapsed_s=elapsed,
                step=step if isinstance(step, int) else None,
                total_steps=total if isinstance(total, int) else None,
                eta_s=_eta(current, now) if current is not None and status == "running" else None,
                loss=(losses or {}).get(node.name),
                note=_note(stage, current, waiting),
                also_needs=node.also_needs,
            )
        )
    return rows


def has_progress(row: StageRow) -> bool:
    return row.kind == "train" or row.total_steps is not None


def progress_text(row: StageRow) -> str:
    """`50/100 ETA 30s loss 1.234` (the bar is drawn separately)."""
    parts: list[str] = []
    if row.step is not None:
        parts.append(f"{row.step}/{row.total_steps}" if row.total_steps else f"step {row.step}")
    if row.eta_s is not None:
        parts.append(f"ETA {fmt_duration(row.eta_s)}")
    if row.loss is not None:
        parts.append(f"loss {fmt_number(row.loss)}")
    return " ".join(parts)


def text_bar(step: int | None, total: int | None, width: int = 20) -> str:
    """`[#########-----------]`; empty when the total is unknown."""
    if step is None or not total:
        return ""
    filled = round(width * min(max(step, 0), total) / total)
    return "[" + "#" * filled + "-" * (width - filled) + "]"


STATUS_STYLE: Final = {
    "pending": "dim",
    "running": "bold yellow",
    "succeeded": "green",
    "failed": "bold red",
    "skipped": "dim",
    "cancelled": "magenta",
}


def header_line(pipeline: Mapping[str, Any], now: datetime) -> str:
    created = parse_time(pipeline.get("created_at"))
    finished = parse_time(pipeline.get("finished_at"))
    took = fmt_duration(_elapsed(created, finished, now))
    extra = " (cancel requested)" if pipeline.get("cancel_requested") and pipeline.get("status") == "running" else ""
    return f"pipeline {pipeline.get('id')}  {pipeline.get('name')}  {pipeline.get('status')}{extra}  {took}".rstrip()


def stage_table(rows: Sequence[StageRow], *, styled: bool) -> Table:
    """The tree as a table; with `styled`, colours and a Rich progress bar, otherwise plain text."""
    table = Table(box=None, show_edge=False, pad_edge=False, header_style="bold" if styled else "")
    for column in ("STAGE", "STATUS", "ATTEMPT", "AGENT", "ELAPSED", "PROGRESS"):
        table.add_column(column, no_wrap=column != "PROGRESS")
    for row in rows:
        numbers = progress_text(row) if has_progress(row) else ""
        tail = " ".join(p for p in (numbers, row.note) if p)
        progress: RenderableType = Text(tail)
        if has_progress(row) and row.total_steps:
            if styled:
                grid = Table.grid(padding=(0, 1))
                bar = ProgressBar(
                    total=float(row.total_steps),
                    completed=float(row.step or 0),
                    width=20,
                    complete_style="cyan",
                    finished_style="green",
                )
                grid.add_row(bar, tail)
                progress = grid
            else:
                progress = Text(f"{text_bar(row.step, row.total_steps)} {tail}")
        name = row.prefix + row.name + (f" (also needs {', '.join(row.also_needs)})" if row.also_needs else "")
        table.add_row(
            Text(name),
            Text(row.status, style=STATUS_STYLE.get(row.status, "") if styled else ""),
            Text("" if row.attempt is None else str(row.attempt)),
            Text(row.agent),
            Text(fmt_duration(row.elapsed_s)),
            progress,
        )
    return table


def pipeline_view(
    pipeline: Mapping[str, Any],
    now: datetime,
    *,
    losses: Mapping[str, float] | None = None,
    log_lines: Sequence[str] = (),
    log_title: str = "",
    styled: bool,
) -> RenderableType:
    """Header, the stage tree, and the last log lines of the running stage."""
    parts: list[RenderableType] = [
        Text(header_line(pipeline, now), style="bold" if styled else ""),
        stage_table(stage_rows(pipeline, now, losses), styled=styled),
    ]
    if log_lines:
        parts.append(Text(f"--- {log_title} ---" if log_title else "---", style="dim" if styled else ""))
        parts.extend(Text(line, no_wrap=True, overflow="ellipsis") for line in log_lines)
    reason = pipeline.get("reason")
    if reason and pipeline.get("status") in PIPELINE_TERMINAL:
        parts.append(Text(f"reason: {_one_line(str(reason))}"))
    return Group(*parts)


def to_text(renderable: RenderableType, *, width: int = 200) -> str:
    """A renderable as plain text (no colour, no trailing spaces): for pipes, files and tests."""
    console = Console(file=io.StringIO(), width=width, no_color=True, color_system=None, highlight=False)
    with console.capture() as capture:
        console.print(renderable)
    return "\n".join(line.rstrip() for line in capture.get().splitlines())


# ---- one line per state change (no TTY) ------------------------------------------------------------------


def _attempt_bits(attempt: Mapping[str, Any] | None) -> str:
    if attempt is None:
        return ""
    bits = f"attempt {attempt.get('number')}"
    if attempt.get("agent"):
        bits += f" on {attempt['agent']}"
    return bits


def state_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any], now: datetime) -> list[str]:
    """What changed between two snapshots of a pipeline, one line each (stages in tree order)."""
    lines: list[str] = []
    old_stages: Mapping[str, Mapping[str, Any]] = (old or {}).get("stages") or {}
    stages: Mapping[str, Mapping[str, Any]] = new.get("stages") or {}
    if old is None:
        lines.append(f"pipeline {new.get('id')} ({new.get('name')}): {new.get('status')}")
    needs = {name: [str(d) for d in (s.get("needs") or [])] for name, s in stages.items()}
    for node in dag_tree(needs):
        stage, before = stages[node.name], old_stages.get(node.name)
        attempts, before_attempts = _attempts(stage), _attempts(before or {})
        current = attempts[-1] if attempts else None
        status = stage.get("status")
        new_attempt = len(attempts) > len(before_attempts)
        attempt_status = current.get("status") if current else None
        before_status = before_attempts[-1].get("status") if before_attempts and not new_attempt else None
        if before is None and old is not None:
            lines.append(f"{node.name}: {status}")
            continue
        unchanged = status == (before or {}).get("status") and attempt_status == before_status
        if before is not None and unchanged and not new_attempt:
            continue
        if before is None and status == "pending" and not attempts:
            continue
        detail = _attempt_bits(current) if current is not None and status not in ("pending", "skipped") else ""
        if status == "running" and attempt_status not in (None, "running"):
            detail += f", {attempt_status}"
        if status in ("failed", "skipped", "cancelled") or (status == "pending" and stage.get("pending_reason")):
            note = _note(stage, current, [])
            detail = ", ".join(p for p in (detail, note) if p)
        if status in STAGE_TERMINAL and current is not None:
            rows = {r.name: r for r in stage_rows(new, now)}
            took = fmt_duration(rows[node.name].elapsed_s) if node.name in rows else ""
            detail = ", ".join(p for p in (detail, took and f"took {took}") if p)
        lines.append(f"{node.name}: {status}" + (f" ({detail})" if detail else ""))
    if old is not None and old.get("status") != new.get("status"):
        lines.append(f"pipeline {new.get('id')}: {new.get('status')}")
    return lines


def final_line(pipeline: Mapping[str, Any], now: datetime) -> str:
    created = parse_time(pipeline.get("created_at"))
    finished = parse_time(pipeline.get("finished_at"))
    took = fmt_duration(_elapsed(created, finished, now))
    line = f"pipeline {pipeline.get('id')} {pipeline.get('status')} after {took}"
    failed = pipeline.get("failed_stages") or []
    if failed:
        line += f" (failed: {', '.join(str(s) for s in failed)})"
    return line


# ---- tables and lists ------------------------------------------------------------------------------------


def plain_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    body = [list(r) for r in rows]
    widths = [len(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    out: list[str] = []
    for row in [list(headers), *body]:
        cells = [cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)]
        out.append("  ".join(cells).rstrip())
    return out


def stage_summary(stage_statuses: Mapping[str, str]) -> str:
    """{'a': 'succeeded', 'b': 'running'} -> '1/2 succeeded, 1 running'."""
    total = len(stage_statuses)
    counts: dict[str, int] = {}
    for status in stage_statuses.values():
        counts[status] = counts.get(status, 0) + 1
    parts = [f"{counts.pop('succeeded', 0)}/{total} succeeded"]
    parts.extend(f"{n} {s}" for s, n in counts.items() if s != "pending")
    return ", ".join(parts)


def pipeline_list_rows(items: Sequence[Mapping[str, Any]]) -> list[str]:
    return plain_table(
        ("ID", "NAME", "STATUS", "STAGES", "CREATED"),
        (
            (
                str(p.get("id")),
                str(p.get("name")),
                str(p.get("status")),
                stage_summary(p.get("stage_statuses") or {}),
                short_time(p.get("created_at")),
            )
            for p in items
        ),
    )


def short_time(value: Any) -> str:
    moment = parse_time(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment is not None else str(value or "")


def audit_event(event: Mapping[str, Any]) -> dict[str, Any]:
    """Exactly the public audit shape (interface.md), keys in the documented order."""
    return {key: event.get(key) for key in AUDIT_KEYS}


def _scalar(value: Any) -> str | None:
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    if isinstance(value, str):
        text = _one_line(value)
        if len(text) > 60:
            text = text[:59] + "…"
        return text if text and " " not in text else json.dumps(text, ensure_ascii=False)
    return None


def event_line(event: Mapping[str, Any]) -> str:
    """`12  2025-01-01 10:00:00  stage.placed  pipeline-…  scheduler  stage=train attempt=… agent=gpu-1`."""
    data: Mapping[str, Any] = event.get("data") or {}
    bits: list[str] = []
    for key, value in data.items():
        if key == "pipeline_id":
            continue
        shown = _scalar(value)
        if shown is not None:
            bits.append(f"{key}={shown}")
        elif isinstance(value, list | tuple) and len(value) <= 8 and all(_scalar(v) is not None for v in value):
            bits.append(f"{key}=[{','.join(_scalar(v) or '' for v in value)}]")
    return "  ".join(
        [
            str(event.get("position")),
            short_time(event.get("recorded_at")),
            str(event.get("type")),
            str(event.get("stream_id")),
            str(event.get("actor")),
            " ".join(bits),
        ]
    ).rstrip()


# ---- spec files and Server-Sent Events ---------------------------------------------------------------------


def spec_content_type(filename: str, data: bytes) -> str:
    """application/json for `*.json` or a document that starts with `{`, else application/yaml."""
    lower = filename.lower()
    if lower.endswith(".json"):
        return "application/json"
    if lower.endswith((".yaml", ".yml")):
        return "application/yaml"
    return "application/json" if data.lstrip()[:1] == b"{" else "application/yaml"


@dataclass(frozen=True, slots=True)
class SseMessage:
    event: str
    """The `event:` field ("message" when absent)."""
    data: str
    id: str | None


def sse_messages(lines: Iterable[str]) -> Iterable[SseMessage]:
    """Parse a Server-Sent Events stream (text lines without their line ends) into messages.

    Comments (`:`) and messages without data are skipped; `id` persists as the last event id.
    """
    event: str = ""
    data_lines: list[str] = []
    last_id: str | None = None
    for raw in lines:
        line = raw.rstrip("\r")
        if line == "":
            if data_lines:
                yield SseMessage(event=event or "message", data="\n".join(data_lines), id=last_id)
            event, data_lines = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        match name:
            case "event":
                event = value
            case "data":
                data_lines.append(value)
            case "id":
                last_id = value
            case _:
                pass  # `retry:` and unknown fields

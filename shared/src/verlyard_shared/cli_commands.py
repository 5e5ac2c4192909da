"""Entrypoint: the CLI commands that talk to the API over HTTP (submit, ls, status, logs, metrics, cancel,
retry, events, agents, datasets, hosts). Output: text for people, `--json` for scripts (stable)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO
from urllib.parse import quote

import httpx
from rich.console import Console

from verlyard_shared.cli import CliError
from verlyard_shared.cli_api import ApiCallError, api_client, call, stream
from verlyard_shared.cli_plot import curves_from_api, plot_all
from verlyard_shared.cli_render import (
    EXIT_OK,
    audit_event,
    event_line,
    fmt_number,
    pipeline_list_rows,
    pipeline_view,
    plain_table,
    short_time,
    spec_content_type,
    sse_messages,
    to_text,
)
from verlyard_shared.ids import pipeline_stream
from verlyard_shared.settings import Settings

PAGE: Final = 1000
"""Events per request when reading the audit log."""
LOG_PAGE: Final = 5000
MAX_PAGE: Final = 500
"""The API's largest page of pipelines."""
FOLLOW_RECONNECT_S: Final = 30.0
"""How long a follower keeps reconnecting after the API went away before giving up."""
HOSTS_MISSING: Final = "hosts are not available on this server yet (HTTP 404)"
MAX_UPLOAD_BYTES: Final = 10 * 1024**3


def now() -> datetime:
    return datetime.now(UTC)


def console(out: TextIO | None = None) -> Console:
    """Colours and widths follow the terminal; a pipe or file gets plain, unwrapped text."""
    target: TextIO = out if out is not None else sys.stdout
    tty = target.isatty()
    # Rich honours NO_COLOR and TERM=dumb itself; a pipe gets no colour and no wrapping.
    return Console(
        file=target, highlight=False, width=None if tty else 200, no_color=True if not tty else None, soft_wrap=not tty
    )


def emit_json(value: Any) -> None:
    print(json.dumps(value, ensure_ascii=False), flush=True)


def path_part(value: str) -> str:
    """A user-given id or name as one URL path segment (no `/` or `..` escapes)."""
    return quote(value, safe="")


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    """Dispatch one API command; a closed stdout (`| head`) ends it quietly."""
    try:
        return _dispatch(args, settings)
    except BrokenPipeError:
        # The reader went away: stop writing, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    match args.command:
        case "submit":
            return submit(settings, args)
        case "ls":
            return list_pipelines(settings, args)
        case "status":
            return status(settings, args)
        case "logs":
            return logs(settings, args)
        case "metrics":
            return metrics(settings, args)
        case "cancel":
            return cancel(settings, args)
        case "retry":
            return retry(settings, args)
        case "events":
            return events(settings, args)
        case "agents":
            return agents(settings, args)
        case "datasets":
            return datasets(settings, args)
        case "hosts":
            return hosts(settings, args)
        case other:
            raise CliError(f"unknown command {other!r}")


# ---- pipelines -------------------------------------------------------------------------------------------


def read_spec(file: str) -> tuple[bytes, str]:
    """The spec's bytes and content type (YAML or JSON by extension, else by content)."""
    if file == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            data = Path(file).read_bytes()
        except FileNotFoundError:
            raise CliError(f"cannot read {file}: no such file") from None
        except IsADirectoryError:
            raise CliError(f"cannot read {file}: it is a directory") from None
        except PermissionError:
            raise CliError(f"cannot read {file}: permission denied") from None
    if not data.strip():
        raise CliError(f"{file} is empty")
    return data, spec_content_type(file, data)


def submit(settings: Settings, args: argparse.Namespace) -> int:
    data, content_type = read_spec(args.file)
    headers = {"Content-Type": content_type}
    if args.idempotency_key:
        headers["Idempotency-Key"] = args.idempotency_key
    with api_client(settings) as client:
        created = call(client, "POST", "/api/v1/pipelines", content=data, headers=headers)
        pipeline_id = str(created["id"])
        if args.watch:
            from verlyard_shared.cli_watch import watch

            if not args.json:
                print(pipeline_id, flush=True)
            return watch(settings, client, pipeline_id, as_json=args.json)
    if args.json:
        emit_json(created)
    else:
        print(pipeline_id)
        stages = created.get("stages") or {}
        print(
            f"submitted {created.get('name')} ({len(stages)} stage{'s' * (len(stages) != 1)}); "
            f"watch it with: verlyard status {pipeline_id} --watch",
            file=sys.stderr,
        )
    return EXIT_OK


def list_pipelines(settings: Settings, args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"status": args.status} if args.status else {}
    items: list[Any] = []
    cursor: str | None = None
    with api_client(settings) as client:
        while True:
            # Ask for no more than still wanted, so `next` resumes exactly after the last item shown.
            want = args.limit if args.all else args.limit - len(items)
            page_params = params | {"limit": min(want, MAX_PAGE)} | ({"cursor": cursor} if cursor else {})
            page = call(client, "GET", "/api/v1/pipelines", params=page_params)
            items.extend(page["items"])
            cursor = page.get("next")
            if not cursor or (not args.all and len(items) >= args.limit):
                break
    if args.json:
        emit_json({"items": items, "next": cursor})
        return EXIT_OK
    if not items:
        print("no pipelines" + (f" with status {args.status}" if args.status else ""), file=sys.stderr)
        return EXIT_OK
    for line in pipeline_list_rows(items):
        print(line)
    if cursor:
        print(f"(showing {len(items)}; more with --limit N or --all)", file=sys.stderr)
    return EXIT_OK


def get_pipeline(client: httpx.Client, pipeline_id: str) -> dict[str, Any]:
    body: dict[str, Any] = call(client, "GET", f"/api/v1/pipelines/{path_part(pipeline_id)}")
    return body


def status(settings: Settings, args: argparse.Namespace) -> int:
    with api_client(settings) as client:
        if args.watch:
            from verlyard_shared.cli_watch import watch

            return watch(settings, client, args.pipeline_id, as_json=args.json)
        pipeline = get_pipeline(client, args.pipeline_id)
        if args.json:
            emit_json(pipeline)
            return EXIT_OK
        from verlyard_shared.cli_watch import Extras

        extras = Extras(client, pipeline["id"])
        extras.refresh(pipeline, logs=False)
    if sys.stdout.isatty():
        console().print(pipeline_view(pipeline, now(), losses=extras.losses, styled=True))
    else:
        print(to_text(pipeline_view(pipeline, now(), losses=extras.losses, styled=False)))
    return EXIT_OK


def cancel(settings: Settings, args: argparse.Namespace) -> int:
    body = {"reason": args.reason} if args.reason else None
    with api_client(settings) as client:
        answer = call(client, "POST", f"/api/v1/pipelines/{path_part(args.pipeline_id)}/cancel", json=body)
    if args.json:
        emit_json(answer)
    elif answer.get("status") == "cancelled":
        print(f"pipeline {answer['id']} is cancelled")
    else:
        print(
            f"cancel requested for pipeline {answer['id']} (now {answer.get('status')}); running attempts are stopped"
        )
    return EXIT_OK


def retry(settings: Settings, args: argparse.Namespace) -> int:
    body = {"stages": args.stage} if args.stage else None
    with api_client(settings) as client:
        answer = call(client, "POST", f"/api/v1/pipelines/{path_part(args.pipeline_id)}/retry", json=body)
        if args.watch:
            from verlyard_shared.cli_watch import watch

            return watch(settings, client, str(answer["id"]), as_json=args.json)
    if args.json:
        emit_json(answer)
        return EXIT_OK
    # The answer may already show the scheduler placing them again: every stage not succeeded runs again.
    stages: dict[str, Any] = answer.get("stages") or {}
    kept = [name for name, st in stages.items() if st.get("status") == "succeeded"]
    again = list(args.stage) or [name for name in stages if name not in kept]
    print(
        f"retrying pipeline {answer['id']}: "
        + (f"running {', '.join(again)} again" if again else "nothing to run again")
        + (f"; keeping {', '.join(kept)}" if kept else "")
    )
    return EXIT_OK


# ---- the audit log ---------------------------------------------------------------------------------------


class _Printer:
    def __init__(self, *, as_json: bool, limit: int | None) -> None:
        self.as_json = as_json
        self.left = limit
        self.position = 0

    @property
    def done(self) -> bool:
        return self.left is not None and self.left <= 0

    def __call__(self, event: Mapping[str, Any]) -> None:
        if self.done:
            return
        if self.as_json:
            emit_json(audit_event(event))
        else:
            print(event_line(event), flush=True)
        self.position = max(self.position, int(event.get("position") or 0))
        if self.left is not None:
            self.left -= 1


def events(settings: Settings, args: argparse.Namespace) -> int:
    printer = _Printer(as_json=args.json, limit=args.limit)
    printer.position = args.after
    with api_client(settings) as client:
        if args.pipeline_id is not None:
            version = 0
            base = f"/api/v1/pipelines/{path_part(args.pipeline_id)}/events"
            while not printer.done:
                page = call(client, "GET", base, params={"after": version, "limit": PAGE})
                for event in page["items"]:
                    if int(event["position"]) > args.after:
                        printer(event)
                if page.get("next") is None:
                    break
                version = int(page["next"])
        else:
            while not printer.done:
                page = call(client, "GET", "/api/v1/events", params={"after": printer.position, "limit": PAGE})
                for event in page["items"]:
                    printer(event)
                if page.get("next") is None:
                    break
        if args.follow and not printer.done:
            stream_id = pipeline_stream(args.pipeline_id) if args.pipeline_id is not None else None
            for event in follow_events(settings, printer.position):
                if stream_id is None or event.get("stream_id") == stream_id:
                    printer(event)
                    if printer.done:
                        break
    return EXIT_OK


def follow_events(settings: Settings, after: int) -> Iterator[dict[str, Any]]:
    """The global log's live SSE stream from `after`, reconnecting with Last-Event-ID when it drops."""
    last = after
    down_since: float | None = None
    timeout = httpx.Timeout(10.0, read=None)
    while True:
        try:
            with (
                api_client(settings, timeout=30.0) as client,
                stream(
                    client,
                    "GET",
                    "/api/v1/events",
                    params={"follow": "true", "after": last},
                    headers={"Accept": "text/event-stream", "Last-Event-ID": str(last)},
                    timeout=timeout,
                ) as response,
            ):
                down_since = None
                for message in sse_messages(response.iter_lines()):
                    try:
                        event = json.loads(message.data)
                    except ValueError:
                        continue
                    if isinstance(event, dict) and "position" in event:
                        last = max(last, int(event["position"]))
                        yield event
        except ApiCallError:
            raise
        except CliError:
            # The connection dropped (an API restart): resume from the last position, for a while.
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > FOLLOW_RECONNECT_S:
                raise
            time.sleep(1.0)


# ---- logs and metrics ------------------------------------------------------------------------------------


def stage_path(pipeline_id: str, stage: str, what: str) -> str:
    return f"/api/v1/pipelines/{path_part(pipeline_id)}/stages/{path_part(stage)}/{what}"


def _print_log(line: Mapping[str, Any], *, as_json: bool) -> None:
    if as_json:
        emit_json(dict(line))
    else:
        print(str(line.get("text", "")), flush=True)


def log_pages(client: httpx.Client, path: str, params: Mapping[str, Any], offset: int = 0) -> Iterator[dict[str, Any]]:
    """Every page of an attempt's log from `offset` (the API's `next` is the following offset)."""
    while True:
        page: dict[str, Any] = call(client, "GET", path, params={**params, "offset": offset, "limit": LOG_PAGE})
        yield page
        if page.get("next") is None or not page.get("items"):
            return
        offset = int(page["next"])


def logs(settings: Settings, args: argparse.Namespace) -> int:
    path = stage_path(args.pipeline_id, args.stage, "logs")
    params: dict[str, Any] = {"attempt": args.attempt} if args.attempt else {}
    with api_client(settings) as client:
        start = 0
        if args.tail is not None or not args.follow:
            last: deque[Mapping[str, Any]] = deque(maxlen=args.tail if args.tail is not None else None)
            first: dict[str, Any] | None = None
            for page in log_pages(client, path, params):
                first = first or page
                # The API picks the latest attempt; pin it so a retry meanwhile cannot mix two logs.
                params["attempt"] = page.get("attempt") or params.get("attempt")
                for line in page["items"]:
                    if args.tail is None:
                        _print_log(line, as_json=args.json)
                    else:
                        last.append(line)
                    start = int(line["offset"]) + 1
            for line in last:
                _print_log(line, as_json=args.json)
            if first is not None and first.get("attempt") is None and not args.follow:
                print(f"stage {args.stage} has not started yet: no log", file=sys.stderr)
            if not args.follow:
                return EXIT_OK
        with stream(
            client,
            "GET",
            path,
            params={k: v for k, v in params.items() if v} | {"follow": "true", "offset": start},
            headers={"Accept": "text/event-stream"},
            timeout=httpx.Timeout(10.0, read=None),
        ) as response:
            for message in sse_messages(response.iter_lines()):
                if message.event == "end":
                    break
                try:
                    line = json.loads(message.data)
                except ValueError:
                    continue
                if isinstance(line, dict) and "text" in line:
                    _print_log(line, as_json=args.json)
    return EXIT_OK


def metrics(settings: Settings, args: argparse.Namespace) -> int:
    keys = [k.strip() for k in (args.keys or "").split(",") if k.strip()]
    params: dict[str, Any] = {}
    if args.attempt:
        params["attempt"] = args.attempt
    if keys:
        params["keys"] = ",".join(keys)
    width = args.width or min(100, shutil.get_terminal_size((80, 24)).columns)
    if args.plot:
        params["max_points"] = max(3, 2 * width)  # two braille dots per column
    with api_client(settings) as client:
        body = call(client, "GET", stage_path(args.pipeline_id, args.stage, "metrics"), params=params)
    if args.json:
        emit_json(body)
        return EXIT_OK
    curves = {k: c for k, c in curves_from_api(body).items() if c.points or c.superseded}
    if not curves:
        print(f"no metrics recorded for {args.stage} yet", file=sys.stderr)
        return EXIT_OK
    if args.plot:
        lines = plot_all(curves, keys or None, width=width, height=args.height, ascii_only=args.ascii)
        for line in lines:
            print(line)
        return EXIT_OK
    rows: list[list[str]] = []
    for key, curve in sorted(curves.items()):
        values = [v for _, v in curve.points]
        if not values:
            continue
        rolled = sum(rb.last - rb.first + 1 for rb in curve.rolled_back)
        rows.append(
            [
                key,
                str(curve.points[-1][0]),
                fmt_number(values[-1]),
                fmt_number(min(values)),
                fmt_number(max(values)),
                f"steps {', '.join(f'{rb.first}-{rb.last}' for rb in curve.rolled_back)}" if rolled else "",
            ]
        )
    for line in plain_table(("KEY", "STEP", "LAST", "MIN", "MAX", "ROLLED BACK"), rows):
        print(line)
    return EXIT_OK


# ---- agents, datasets, hosts -----------------------------------------------------------------------------


def _items(body: Any) -> list[Mapping[str, Any]]:
    items = body.get("items") if isinstance(body, Mapping) else body
    return [i for i in items or [] if isinstance(i, Mapping)]


def _gpus(agent: Mapping[str, Any]) -> str:
    """`2x NVIDIA H100 80GB HBM3 (util 35%, 40%)`; `-` for a CPU-only agent."""
    gpus = [g for g in agent.get("gpus") or [] if isinstance(g, Mapping)]
    if not gpus:
        return "-"
    names: dict[str, int] = {}
    for gpu in gpus:
        name = str(gpu.get("name") or "gpu")
        names[name] = names.get(name, 0) + 1
    text = ", ".join(f"{n}x {name}" for name, n in names.items())
    util = [g.get("utilization_pct") for g in gpus]
    if any(isinstance(u, int | float) for u in util):
        text += " (util " + ", ".join(f"{u:.0f}%" if isinstance(u, int | float) else "?" for u in util) + ")"
    return text


def _running(agent: Mapping[str, Any]) -> str:
    attempts = [a for a in agent.get("attempts") or [] if isinstance(a, Mapping)]
    return ", ".join(f"{a.get('pipeline_id')}/{a.get('stage')}#{a.get('number')}" for a in attempts) or "-"


def agents(settings: Settings, args: argparse.Namespace) -> int:
    with api_client(settings) as client:
        if args.agents_command == "drain":
            answer = call(client, "POST", f"/api/v1/agents/{path_part(args.agent)}/drain")
            if args.json:
                emit_json(answer)
            else:
                print(
                    f"agent {answer.get('id', args.agent)} is {answer.get('state', 'draining')}: "
                    "no new work is placed on it; running attempts finish"
                )
            return EXIT_OK
        body = call(client, "GET", "/api/v1/agents")
    if args.json:
        emit_json(body)
        return EXIT_OK
    items = [a for a in body.get("items") or [] if isinstance(a, Mapping)]
    if not items:
        print("no agents registered", file=sys.stderr)
        return EXIT_OK
    rows = [
        [
            str(a.get("id")),
            str(a.get("state")),
            str(a.get("hostname") or ""),
            _gpus(a),
            str(a.get("cpu_slots", "")),
            short_time(a.get("last_heartbeat_at")) or "-",
            _running(a),
        ]
        for a in items
    ]
    for line in plain_table(("AGENT", "STATE", "HOST", "GPUS", "SLOTS", "LAST HEARTBEAT", "RUNNING"), rows):
        print(line)
    return EXIT_OK


def _size(n: Any) -> str:
    if not isinstance(n, int):
        return ""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def datasets(settings: Settings, args: argparse.Namespace) -> int:
    with api_client(settings) as client:
        match args.datasets_command:
            case "push":
                return _dataset_push(client, args)
            case "show":
                body = call(client, "GET", f"/api/v1/datasets/{path_part(args.name)}", params={"rows": args.rows})
                if args.json:
                    emit_json(body)
                else:
                    _dataset_show(body)
                return EXIT_OK
            case _:
                body = call(client, "GET", "/api/v1/datasets")
    if args.json:
        emit_json(body)
        return EXIT_OK
    items = _items(body)
    if not items:
        print("no datasets", file=sys.stderr)
        return EXIT_OK
    rows = [
        [
            str(d.get("name") or ""),
            str(d.get("format") or ""),
            _size(d.get("size_bytes")),
            str(d.get("sha256") or "")[:12],
            short_time(d.get("uploaded_at")),
            str(d.get("uploaded_by") or ""),
        ]
        for d in items
    ]
    for line in plain_table(("NAME", "FORMAT", "SIZE", "SHA256", "UPLOADED", "BY"), rows):
        print(line)
    return EXIT_OK


def _dataset_push(client: httpx.Client, args: argparse.Namespace) -> int:
    path: Path = args.file
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise CliError(f"cannot read {path}: no such file") from None
    if not path.is_file():
        raise CliError(f"{path} is not a file")
    if size > MAX_UPLOAD_BYTES:
        raise CliError(f"{path} is {_size(size)}; uploads are limited to {_size(MAX_UPLOAD_BYTES)}")
    params = {"filename": path.name} | ({"name": args.name} if args.name else {})
    with path.open("rb") as handle:
        body = call(
            client,
            "POST",
            "/api/v1/datasets",
            params=params,
            content=handle,
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            timeout=httpx.Timeout(30.0, write=None, read=300.0),
        )
    if args.json:
        emit_json(body)
    else:
        size, digest = _size(body.get("size_bytes")), str(body.get("sha256"))[:12]
        print(f"pushed dataset {body.get('name')} ({size}, {body.get('format')}, sha256 {digest})")
    return EXIT_OK


def _dataset_show(body: Mapping[str, Any]) -> None:
    for key in ("name", "id", "format", "filename", "sha256", "object", "uploaded_at", "uploaded_by"):
        if body.get(key) not in (None, ""):
            print(f"{key}: {body[key]}")
    print(f"size: {_size(body.get('size_bytes'))}")
    preview = body.get("preview")
    if not isinstance(preview, Mapping):
        return
    columns = preview.get("columns")
    if isinstance(columns, list) and columns:
        print("columns: " + ", ".join(str(c) for c in columns))
    rows = preview.get("rows") or []
    if rows:
        print(f"first {len(rows)} row(s):")
        for row in rows:
            text = row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)
            print(f"  {text if len(text) <= 200 else text[:199] + '…'}")
    if preview.get("note"):
        print(f"note: {preview['note']}")


def hosts(settings: Settings, args: argparse.Namespace) -> int:
    with api_client(settings) as client:
        try:
            return _hosts(client, args)
        except ApiCallError as exc:
            if exc.status == 404 and _hosts_missing(client, args):
                raise CliError(HOSTS_MISSING) from None
            raise


def _labels(pairs: list[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--label {pair}: expected KEY=VALUE")
        labels[key] = value
    return labels


def _print_probe(probe: Any) -> None:
    """A probe result for people: GPUs (or why none), driver/CUDA, disk, verl."""
    if not isinstance(probe, dict):
        return
    if not probe.get("ok"):
        print(f"probe failed: {probe.get('error')}")
        return
    gpus = probe.get("gpus") or []
    for gpu in gpus:
        util = gpu.get("utilization_pct")
        print(
            f"GPU {gpu.get('index')}: {gpu.get('name')} {gpu.get('memory_total_mb')} MiB "
            f"({gpu.get('memory_used_mb')} MiB used{f', {util}% busy' if util is not None else ''}) {gpu.get('uuid')}"
        )
    if not gpus:
        print(f"GPUs: none ({probe.get('gpu_note') or 'none found'})")
    if probe.get("driver_version") or probe.get("cuda_version"):
        print(f"driver {probe.get('driver_version') or '?'}, CUDA {probe.get('cuda_version') or '?'}")
    free, total = probe.get("disk_free_bytes"), probe.get("disk_total_bytes")
    if isinstance(free, int) and isinstance(total, int):
        print(f"disk: {free / 1024**3:.1f} GiB free of {total / 1024**3:.1f} GiB")
    if probe.get("verl_version"):
        print(f"verl {probe['verl_version']} in {probe.get('trainer_python')}")
    else:
        print(f"verl: not importable by {probe.get('trainer_python')} ({probe.get('verl_error')})")


def _hosts_missing(client: httpx.Client, args: argparse.Namespace) -> bool:
    """A 404 from a server without the hosts API (not a 404 for one unknown host)."""
    if args.hosts_command == "ls":
        return True
    try:
        call(client, "GET", "/api/v1/hosts", params={"limit": 1})
    except ApiCallError as exc:
        return exc.status == 404
    return False


def _hosts(client: httpx.Client, args: argparse.Namespace) -> int:
    match args.hosts_command:
        case "add":
            address, _, port = str(args.address).rpartition(":") if ":" in args.address else (args.address, "", "")
            body: dict[str, Any] = {"name": args.name, "address": address, "user": args.user}
            if port:
                if not port.isdigit():
                    raise CliError(f"--address {args.address}: the port must be a number")
                body["port"] = int(port)
            if args.password_stdin:
                body["password"] = sys.stdin.readline().rstrip("\n")
            else:
                try:
                    body["private_key"] = Path(args.key).read_text()
                except OSError as exc:
                    raise CliError(f"cannot read the key file {args.key}: {exc.strerror}") from None
                if args.passphrase_stdin:
                    body["passphrase"] = sys.stdin.readline().rstrip("\n")
            labels = _labels(getattr(args, "label", None) or [])
            if labels:
                body["labels"] = labels
            for option in ("trainer_python", "root", "host_key_fingerprint"):
                if getattr(args, option, None):
                    body[option] = getattr(args, option)
            answer = call(client, "POST", "/api/v1/hosts", json=body)
            if args.json:
                emit_json(answer)
            else:
                fingerprint = answer.get("host_key_fingerprint") or answer.get("fingerprint")
                print(f"added host {args.name}" + (f" (host key {fingerprint} pinned)" if fingerprint else ""))
                _print_probe(answer.get("probe"))
        case "rm":
            answer = call(client, "DELETE", f"/api/v1/hosts/{path_part(args.name)}")
            if args.json:
                emit_json(answer)
            else:
                print(f"removed host {args.name}")
        case "probe":
            answer = call(client, "POST", f"/api/v1/hosts/{path_part(args.name)}/probe")
            if args.json:
                emit_json(answer)
            elif isinstance(answer, dict) and isinstance(answer.get("probe"), dict):
                print(f"host {args.name}: {answer.get('user')}@{answer.get('address')}:{answer.get('port')}")
                _print_probe(answer["probe"])
            else:
                for key, value in (answer or {}).items():
                    print(f"{key}: {json.dumps(value) if isinstance(value, dict | list) else value}")
        case "rotate-key":
            answer = call(client, "POST", "/api/v1/admin/hosts/rotate-key")
            if args.json:
                emit_json(answer)
            else:
                print(
                    f"credentials sealed with key {answer.get('key_id')}: {answer.get('resealed')} re-encrypted, "
                    f"{answer.get('already_current')} already current"
                )
        case _:
            answer = call(client, "GET", "/api/v1/hosts")
            if args.json:
                emit_json(answer)
            else:
                rows = [
                    [
                        str(h.get("name")),
                        f"{h.get('address')}:{h.get('port')}" if h.get("port") else str(h.get("address")),
                        str(h.get("user")),
                        str(h.get("state") or ""),
                        str(h.get("gpus", "")),
                        str(h.get("host_key_fingerprint") or ""),
                    ]
                    for h in _items(answer)
                ]
                for line in plain_table(("NAME", "ADDRESS", "USER", "STATE", "GPUS", "HOST KEY"), rows):
                    print(line)
    return EXIT_OK

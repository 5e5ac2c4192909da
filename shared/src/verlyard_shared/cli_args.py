"""Entrypoint: the argparse definitions of the CLI commands that talk to the API (no I/O imports, so
`verlyard --help` stays fast; the commands themselves live in cli_commands.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Final

EXIT_CODES: Final = (
    "exit codes: 0 ok (with --watch: the pipeline succeeded), 1 the pipeline failed, "
    "2 usage, API or connection error, 3 the pipeline was cancelled, 130 interrupted "
    "(a watched pipeline keeps running)"
)
ENV_HELP: Final = (
    "The API is $VERLYARD_API_URL (default http://127.0.0.1:8400); the token is $VERLYARD_TOKEN, "
    "or $VERLYARD_HOME/admin-token of the embedded stack."
)

API_COMMANDS: Final = frozenset(
    {"submit", "ls", "status", "logs", "metrics", "cancel", "retry", "events", "agents", "datasets", "hosts"}
)
"""Top-level commands handled by cli_commands.run_command."""


def _parser(sub: Any, name: str, help_text: str, **kwargs: Any) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=f"{help_text}. {ENV_HELP}", epilog=EXIT_CODES, **kwargs
    )
    return parser


def _json(parser: argparse.ArgumentParser, what: str = "the API's JSON") -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} (stable, machine-readable)")


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {number}")
    return number


def add_api_commands(sub: Any) -> None:
    """Register submit, ls, status, logs, metrics, cancel, retry, events, agents, datasets and hosts."""
    p = _parser(sub, "submit", "submit a pipeline spec (YAML or JSON); prints the pipeline id")
    p.add_argument("file", metavar="FILE", help="the spec; `-` reads stdin (YAML, or JSON by .json or content)")
    p.add_argument("--watch", "-w", action="store_true", help="show live progress; exit with the pipeline's outcome")
    p.add_argument(
        "--idempotency-key", default=None, metavar="KEY", help="same key + same spec -> the same pipeline (safe retry)"
    )
    _json(p, "the API's JSON (with --watch: the final state)")

    p = _parser(sub, "ls", "list pipelines, newest first")
    p.add_argument("--status", default=None, metavar="S", help="pending|running|succeeded|failed|cancelled (a,b,...)")
    p.add_argument("--limit", type=_positive, default=50, metavar="N", help="at most N pipelines (default 50)")
    p.add_argument("--all", action="store_true", help="follow the cursors: every pipeline (N per request)")
    _json(p, '{"items": [...], "next": cursor}')

    p = _parser(sub, "status", "a pipeline's state: its stages as a tree, attempts, agents, progress")
    p.add_argument("pipeline_id", metavar="ID")
    p.add_argument("--watch", "-w", action="store_true", help="show live progress; exit with the pipeline's outcome")
    _json(p, "the API's JSON (with --watch: the final state)")

    p = _parser(sub, "logs", "a stage's log (the latest attempt unless --attempt)")
    p.add_argument("pipeline_id", metavar="ID")
    p.add_argument("stage", metavar="STAGE")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the attempt ends")
    p.add_argument("--attempt", default=None, metavar="A", help="attempt number (1, 2, ...) or attempt id")
    p.add_argument("--tail", type=_non_negative, default=None, metavar="N", help="only the last N lines")
    _json(p, "one JSON object per line")

    p = _parser(sub, "metrics", "a stage's metrics: latest values, or curves with --plot")
    p.add_argument("pipeline_id", metavar="ID")
    p.add_argument("stage", metavar="STAGE")
    p.add_argument("--plot", action="store_true", help="draw the loss (or --keys) in the terminal, across attempts")
    p.add_argument("--keys", default=None, metavar="K1,K2", help="only these metric keys")
    p.add_argument("--attempt", default=None, metavar="A", help="attempt number or id (default: all attempts)")
    p.add_argument("--ascii", action="store_true", help="plot with ASCII characters instead of braille dots")
    p.add_argument("--width", type=_positive, default=None, metavar="COLS", help="plot width (default: terminal)")
    p.add_argument("--height", type=_positive, default=12, metavar="ROWS", help="plot height (default 12)")
    _json(p)

    p = _parser(sub, "cancel", "cancel a pipeline (running attempts are stopped)")
    p.add_argument("pipeline_id", metavar="ID")
    p.add_argument("--reason", default=None, help="recorded in the audit log")
    _json(p)

    p = _parser(sub, "retry", "re-run failed/cancelled stages, keep succeeded ones")
    p.add_argument("pipeline_id", metavar="ID")
    p.add_argument("--stage", action="append", default=[], metavar="STAGE", help="only this stage (repeatable)")
    p.add_argument("--watch", "-w", action="store_true", help="then show live progress (exit with the outcome)")
    _json(p)

    p = _parser(sub, "events", "the audit log: every event, or one pipeline's")
    p.add_argument("pipeline_id", nargs="?", default=None, metavar="ID", help="only this pipeline's events")
    p.add_argument(
        "--after", type=_non_negative, default=0, metavar="POSITION", help="events after this global position"
    )
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events (Ctrl-C to stop)")
    p.add_argument("--limit", type=_positive, default=None, metavar="N", help="stop after N events")
    _json(p, "one JSON object per line, in the public audit shape")

    agents = _parser(sub, "agents", "list agents (GPUs, state, running attempts); `agents drain AGENT`")
    _json(agents)
    agent_sub = agents.add_subparsers(dest="agents_command", metavar="ACTION")
    p = agent_sub.add_parser("ls", help="list agents (the default)", epilog=EXIT_CODES)
    _json(p)
    p = agent_sub.add_parser("drain", help="stop placing work on an agent; running attempts finish", epilog=EXIT_CODES)
    p.add_argument("agent", metavar="AGENT")
    _json(p)

    datasets = _parser(sub, "datasets", "upload, list and preview datasets")
    data_sub = datasets.add_subparsers(dest="datasets_command", required=True, metavar="ACTION")
    p = data_sub.add_parser("push", help="upload a file (JSONL, JSON, CSV, Parquet)", epilog=EXIT_CODES)
    p.add_argument("file", type=Path, metavar="FILE")
    p.add_argument("--name", default=None, help="dataset name (default: the file name without extension)")
    _json(p)
    p = data_sub.add_parser("ls", help="list datasets", epilog=EXIT_CODES)
    _json(p)
    p = data_sub.add_parser("show", help="a dataset's details and a preview of its first rows", epilog=EXIT_CODES)
    p.add_argument("name", metavar="NAME", help="dataset name or id")
    p.add_argument("--rows", type=_positive, default=5, metavar="N", help="preview rows (default 5)")
    _json(p)

    hosts = _parser(sub, "hosts", "SSH GPU hosts (agentless)")
    host_sub = hosts.add_subparsers(dest="hosts_command", required=True, metavar="ACTION")
    p = host_sub.add_parser("add", help="register an SSH host (its key is pinned)", epilog=EXIT_CODES)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--address", required=True, metavar="HOST[:PORT]")
    p.add_argument("--user", required=True, metavar="U")
    secret = p.add_mutually_exclusive_group(required=True)
    secret.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    secret.add_argument("--key", type=Path, metavar="FILE", help="a private key file")
    p.add_argument("--passphrase-stdin", action="store_true", help="read the key's passphrase from stdin")
    p.add_argument("--label", action="append", default=[], metavar="K=V", help="a placement label (repeatable)")
    p.add_argument("--trainer-python", default=None, metavar="PATH", help="the host's Python with verl (python3)")
    p.add_argument("--root", default=None, metavar="DIR", help="the host's verlyard folder (~/.verlyard)")
    p.add_argument("--host-key-fingerprint", default=None, metavar="SHA256:...", help="refuse any other host key")
    _json(p)
    p = host_sub.add_parser("ls", help="list hosts", epilog=EXIT_CODES)
    _json(p)
    p = host_sub.add_parser("rm", help="remove a host", epilog=EXIT_CODES)
    p.add_argument("name", metavar="NAME")
    _json(p)
    p = host_sub.add_parser("probe", help="connect, detect GPUs, record the result", epilog=EXIT_CODES)
    p.add_argument("name", metavar="NAME")
    _json(p)
    p = host_sub.add_parser(
        "rotate-key",
        help="re-encrypt every host credential with the first key of VERLYARD_SECRET_KEY",
        epilog=EXIT_CODES,
    )
    _json(p)

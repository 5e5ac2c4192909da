"""Contracts: every NATS subject, stream and durable-consumer name, in one place."""

from __future__ import annotations

import re

PREFIX = "vy"

STREAM_EVENTS = "VY_EVENTS"
STREAM_COMMANDS = "VY_COMMANDS"
STREAM_REPORTS = "VY_REPORTS"
STREAM_METRICS = "VY_METRICS"
STREAM_LOGS = "VY_LOGS"

EVENTS_ALL = f"{PREFIX}.evt.>"
COMMANDS_ALL = f"{PREFIX}.cmd.>"
REPORTS_ALL = f"{PREFIX}.rpt.>"
METRICS_ALL = f"{PREFIX}.met.>"
LOGS_ALL = f"{PREFIX}.log.>"

# Durable consumers owned by the control plane.
CONSUMER_SCHEDULER_REPORTS = "scheduler-reports"
CONSUMER_API_EVENTS = "api-events"
CONSUMER_API_METRICS = "api-metrics"
CONSUMER_API_LOGS = "api-logs"

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def token(value: str) -> str:
    """A value safe to embed as one subject token (no dots, wildcards or spaces), else ValueError."""
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"not a valid subject token: {value!r} (allowed: letters, digits, '_', '-')")
    return value


def event_subject(stream_id: str, event_type: str) -> str:
    """`vy.evt.<stream_id>.<type with dots as _>`: consumers filter by stream or by type."""
    return f"{PREFIX}.evt.{token(stream_id)}.{event_type.replace('.', '_')}"


def events_of_stream(stream_id: str) -> str:
    return f"{PREFIX}.evt.{token(stream_id)}.*"


def command_subject(agent: str, kind: str) -> str:
    return f"{PREFIX}.cmd.{token(agent)}.{token(kind)}"


def commands_of_agent(agent: str) -> str:
    return f"{PREFIX}.cmd.{token(agent)}.>"


def agent_command_consumer(agent: str) -> str:
    """The durable consumer one agent reads its commands from."""
    return f"agent-{token(agent)}"


def report_subject(agent: str, kind: str) -> str:
    return f"{PREFIX}.rpt.{token(agent)}.{token(kind)}"


def reports_of_agent(agent: str) -> str:
    return f"{PREFIX}.rpt.{token(agent)}.>"


def metric_subject(pipeline_id: str, stage: str) -> str:
    return f"{PREFIX}.met.{token(pipeline_id)}.{token(stage)}"


def log_subject(pipeline_id: str, stage: str) -> str:
    return f"{PREFIX}.log.{token(pipeline_id)}.{token(stage)}"


# JetStream object store (stream OBJ_vy-datasets): pushed datasets, one object per sha256 (hex), plus a
# small JSON pointer object `name/<dataset name>` -> {"sha256", "size_bytes", "dataset_id"} for agents
# that resolve a dataset by name without the database (docs/adr/0009-live-streams.md, datasets).
DATASETS_BUCKET = "vy-datasets"


def dataset_name_object(name: str) -> str:
    return f"name/{name}"

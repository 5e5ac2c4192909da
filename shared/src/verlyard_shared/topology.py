"""Contracts: JetStream streams and durable consumers as plain data (applied by `nats_topology.py`).

Rules checked by tests/unit/test_topology.py (reliability T3): file storage, a work-queue command
stream, a duplicate window of at least two minutes, and every consumer with an explicit `ack_wait`,
a bounded `max_deliver` and a `backoff` schedule.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from verlyard_shared import subjects as s

DUPLICATE_WINDOW_S = 300.0


class StreamDef(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    subjects: tuple[str, ...]
    retention: Literal["limits", "workqueue"]
    storage: Literal["file"] = "file"
    duplicate_window_s: float = DUPLICATE_WINDOW_S
    max_age_s: float = 0.0
    """0 keeps messages until limits or acks remove them."""
    max_bytes: int = -1
    replicas: int = 1


class ConsumerDef(msgspec.Struct, frozen=True, kw_only=True):
    durable: str
    stream: str
    filter_subject: str
    ack_wait_s: float
    max_deliver: int
    backoff_s: tuple[float, ...]
    max_ack_pending: int = 1000
    deliver_policy: Literal["all", "new"] = "all"


DAY = 86_400.0

STREAMS: tuple[StreamDef, ...] = (
    # A copy of Postgres, rebuildable by the relay: keep a week for live readers that fall behind.
    StreamDef(name=s.STREAM_EVENTS, subjects=(s.EVENTS_ALL,), retention="limits", max_age_s=7 * DAY),
    StreamDef(name=s.STREAM_COMMANDS, subjects=(s.COMMANDS_ALL,), retention="workqueue"),
    StreamDef(name=s.STREAM_REPORTS, subjects=(s.REPORTS_ALL,), retention="workqueue"),
    StreamDef(name=s.STREAM_METRICS, subjects=(s.METRICS_ALL,), retention="limits", max_age_s=30 * DAY),
    StreamDef(name=s.STREAM_LOGS, subjects=(s.LOGS_ALL,), retention="limits", max_age_s=30 * DAY),
)

# NATS (2.15) takes backoff[0] as the first ack deadline when a backoff is set (ack_wait reads back as
# backoff[0]), and applies the backoff to ack timeouts only: a nak without a delay is redelivered at
# once. So a handler that may run longer than backoff[0] sends in_progress(), and a failing handler
# naks with the delay it wants. NATS also requires max_deliver > len(backoff).
# ack_wait therefore equals backoff[0]: 10 s is long enough for a handler under load (an append, a
# process start) and short enough that a crashed consumer's messages come back quickly.
_BACKOFF = (10.0, 20.0, 30.0, 60.0, 120.0)

CONSUMERS: tuple[ConsumerDef, ...] = (
    ConsumerDef(
        durable=s.CONSUMER_SCHEDULER_REPORTS,
        stream=s.STREAM_REPORTS,
        filter_subject=s.REPORTS_ALL,
        ack_wait_s=10.0,
        max_deliver=10,
        backoff_s=_BACKOFF,
        max_ack_pending=10_000,
    ),
    ConsumerDef(
        durable=s.CONSUMER_API_METRICS,
        stream=s.STREAM_METRICS,
        filter_subject=s.METRICS_ALL,
        ack_wait_s=10.0,
        max_deliver=10,
        backoff_s=_BACKOFF,
        max_ack_pending=10_000,
    ),
    ConsumerDef(
        durable=s.CONSUMER_API_LOGS,
        stream=s.STREAM_LOGS,
        filter_subject=s.LOGS_ALL,
        ack_wait_s=10.0,
        max_deliver=10,
        backoff_s=_BACKOFF,
        max_ack_pending=10_000,
    ),
)


def agent_command_consumer(agent: str) -> ConsumerDef:
    """Each agent's own durable on its own command subjects (work queue: filters never overlap).

    A command is acked once the agent reports the attempt accepted; a handler that keeps failing is
    redelivered with backoff at most `max_deliver` times, then surfaces as a poison failure (T15).
    """
    return ConsumerDef(
        durable=s.agent_command_consumer(agent),
        stream=s.STREAM_COMMANDS,
        filter_subject=s.commands_of_agent(agent),
        ack_wait_s=10.0,
        max_deliver=5,
        backoff_s=(10.0, 20.0, 30.0, 60.0),
        max_ack_pending=100,
    )

"""Pure core: who may do what on verlyard's NATS (per-user permissions as data; docs/adr/0015).

Every NATS client logs in as its own user. Control-plane services (api with its relay, scheduler,
ssh-runner) are trusted with every subject; they get separate users so each can be rotated, revoked
and told apart in the server's connection list. A GPU agent is not trusted: its user may touch only

- its own reports: publish `vy.rpt.<agent>.>` (hello, heartbeat, attempt reports);
- telemetry: publish `vy.met.>` and `vy.log.>`. Those subjects name the pipeline and stage, not the
  agent, and an agent cannot know in advance which pipelines it will run, so telemetry is not
  partitioned by agent. Telemetry is never the record (no event is derived from it); a forged metric
  or log line can mislead a chart, not move a pipeline. That trade is written down in the ADR;
- its own command durable `agent-<agent>` on VY_COMMANDS: create it only through the filtered create
  subject (`$JS.API.CONSUMER.CREATE.<stream>.<durable>.<filter>`, which the server checks against the
  filter in the request body, so the durable cannot be pointed at another agent's commands), read
  its info, pull (`$JS.API.CONSUMER.MSG.NEXT...`) and ack its messages in both ack-subject formats
  (v1 `$JS.ACK.<stream>.<durable>.…`, and v2 `$JS.ACK.<domain>.<account hash>.<stream>.<durable>.…`
  that nats-server 2.14+ may send);
- datasets: read the `vy-datasets` object store (stream info, direct/last-message gets, ordered
  ephemeral consumers on `OBJ_vy-datasets` and their flow-control replies);
- replies: subscribe only to its own inbox prefix `_INBOX.agent-<agent>.>` (the agent connects with
  that `inbox_prefix`), so no agent can read the JetStream acks or pulled commands sent to another.

Everything else is denied by the allow-lists: another agent's command subjects, durables and reports,
the events stream, the JetStream admin API (streams, other consumers) and the rest of `_INBOX`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from verlyard_shared import subjects

Role = Literal["service", "agent"]

SERVICES: tuple[str, ...] = ("api", "scheduler", "ssh-runner")
"""The control-plane services, each with its own NATS user of the same name."""

AGENT_USER_PREFIX = "agent-"
"""An agent's NATS user is `agent-<agent id>` (a user name must start with a letter)."""

_USER = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True, kw_only=True)
class Permissions:
    """Allow-lists of subjects (NATS wildcards); anything not allowed is denied. None: no limit."""

    publish: tuple[str, ...] | None
    subscribe: tuple[str, ...] | None


UNLIMITED = Permissions(publish=None, subscribe=None)


@dataclass(frozen=True, kw_only=True)
class NatsUser:
    """One user of the rendered config. Exactly one of `password_env` (the server reads the password
    from that environment variable) and `password_hash` (a bcrypt hash, `$2a$`/`$2b$`) is set."""

    name: str
    role: Role
    permissions: Permissions
    password_env: str | None = None
    password_hash: str | None = None
    agent: str | None = None


def agent_user(agent: str) -> str:
    """The NATS user name of agent `agent` (ValueError when the id cannot make one)."""
    name = AGENT_USER_PREFIX + subjects.token(agent)
    if not _USER.fullmatch(name):
        raise ValueError(f"agent id {agent!r} is too long for a NATS user name (at most 57 characters)")
    return name


def agent_inbox_prefix(agent: str) -> str:
    """The inbox prefix an agent's connection uses; its user may subscribe only below it.

    One token, `agent-<id>`: it never equals another agent's, nor a default inbox's random nuid
    (which has no '-').
    """
    return f"_INBOX.{agent_user(agent)}"


def _objects(bucket: str) -> tuple[str, ...]:
    stream = f"OBJ_{bucket}"
    return (
        f"$JS.API.STREAM.INFO.{stream}",
        # nats-py's subscribe looks the stream up by subject first (names only, no content).
        "$JS.API.STREAM.NAMES",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}",
        f"$JS.API.DIRECT.GET.{stream}.>",
        # The object store reads chunks with an ordered ephemeral push consumer (created with or
        # without a filter token, deleted when done) and answers its flow-control requests.
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.FC.{stream}.>",
    )


def agent_permissions(agent: str) -> Permissions:
    """What agent `agent` may publish and subscribe to (see the module docstring)."""
    stream = subjects.STREAM_COMMANDS
    durable = subjects.agent_command_consumer(agent)
    return Permissions(
        publish=(
            subjects.reports_of_agent(agent),
            subjects.METRICS_ALL,
            subjects.LOGS_ALL,
            f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.{subjects.commands_of_agent(agent)}",
            f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.>",
            f"$JS.ACK.*.*.{stream}.{durable}.>",
            *_objects(subjects.DATASETS_BUCKET),
        ),
        subscribe=(f"{agent_inbox_prefix(agent)}.>",),
    )


def service_user(service: str, *, password_env: str) -> NatsUser:
    if service not in SERVICES:
        raise ValueError(f"unknown service {service!r}; the services are {', '.join(SERVICES)}")
    return NatsUser(name=service, role="service", permissions=UNLIMITED, password_env=password_env)


def agent_nats_user(agent: str, *, password_env: str | None = None, password_hash: str | None = None) -> NatsUser:
    return NatsUser(
        name=agent_user(agent),
        role="agent",
        permissions=agent_permissions(agent),
        password_env=password_env,
        password_hash=password_hash,
        agent=agent,
    )


def service_password_env(service: str) -> str:
    """`NATS_<SERVICE>_PASSWORD`: the variable the server's config reads a service's password from
    (the service itself reads its password from VERLYARD_NATS_PASSWORD, like every client)."""
    return f"NATS_{service.upper().replace('-', '_')}_PASSWORD"

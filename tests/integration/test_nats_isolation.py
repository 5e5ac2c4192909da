"""Integration (reliability T11, NATS half): per-agent users against a real nats-server.

The server runs the config `render_config` makes from `verlyard_shared.nats_auth` (the one the
embedded stack and `verlyard nats config` render), with bcrypt-hashed agent passwords made by
`verlyard_shared.nats_accounts`. Given agents `gpu-a` and `gpu-b`, each logged in as its own user:
- a real Agent running as `agent-gpu-a` works end to end: creates its durable, takes its commands,
  reports, streams metrics and logs, fetches a pushed dataset from the object store, and the server
  logs no permission violation for it;
- as `agent-gpu-a`, every way into gpu-b's work is refused by the server (a permissions violation)
  and leaves gpu-b's command where it was: subscribing to its commands or to other inboxes, pulling
  from or re-creating its durable, pointing a durable at its subjects, reading the command stream,
  publishing reports as gpu-b, forging its acks, deleting its durable, administering streams.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from tests.integration.agent_support import (
    agent_config,
    eventually,
    finished,
    kinds,
    log_lines,
    metric_points,
    push_dataset,
    reports,
    run_stage,
    running_agent,
    send,
)
from verlyard_agent import runner
from verlyard_agent.stages.base import AttemptContext, StageResult
from verlyard_shared import codec, subjects
from verlyard_shared.embedded.nats import EmbeddedNats
from verlyard_shared.embedded.ports import free_port
from verlyard_shared.nats_accounts import AgentCredentials, new_agent_credentials
from verlyard_shared.nats_auth import agent_inbox_prefix, agent_nats_user
from verlyard_shared.nats_topology import connect_nats, consumer_config, ensure_topology
from verlyard_shared.reports import AgentHello
from verlyard_shared.topology import agent_command_consumer

A, B = "gpu-a", "gpu-b"


@dataclass
class Secured:
    server: EmbeddedNats
    creds: dict[str, AgentCredentials]

    def violations(self, user: str) -> list[str]:
        text = self.server.log_path.read_text(errors="replace")
        return [line for line in text.splitlines() if f"user:{user}" in line and "Violation" in line]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    # bcrypt cost 4 keeps the test fast; `verlyard nats add-agent` uses the default cost.
    creds = {agent: new_agent_credentials(agent, rounds=4) for agent in (A, B)}
    server = EmbeddedNats(
        tmp_path_factory.mktemp("secured-nats"),
        free_port(),
        user="control",
        password="t" + "0123456789abcdef" * 2,
        users=[agent_nats_user(agent, password_hash=c.password_hash) for agent, c in creds.items()],
        max_memory_store="256MB",
        max_file_store="2GB",
    )
    server.start()
    try:
        yield Secured(server=server, creds=creds)
    finally:
        server.kill()


@pytest.fixture
async def admin(secured: Secured) -> AsyncIterator[JetStreamContext]:
    """The control plane's connection (every subject), on a clean topology with gpu-b's durable."""
    nc = await connect_nats(secured.server.url, name="control", user="control", password=secured.server.password)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            await js.delete_stream(info.config.name or "")
        await ensure_topology(js, agents=[B])
        yield js
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def as_agent(secured: Secured, agent: str) -> AsyncIterator[tuple[NATS, list[Exception]]]:
    creds = secured.creds[agent]
    nc = await connect_nats(
        secured.server.url,
        name=f"raw-{agent}",
        user=creds.user,
        password=creds.password,
        inbox_prefix=agent_inbox_prefix(agent),
    )
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc._error_cb = on_error  # pyright: ignore[reportPrivateUsage]  # collect the server's -ERRs
    try:
        yield nc, errors
    finally:
        await nc.close()


async def refused(errors: list[Exception], action: Callable[[], Awaitable[Any]], subject: str) -> None:
    """`action` fails (or gets nothing) and the server reports a permissions violation naming `subject`."""
    before = len(errors)
    with contextlib.suppress(nats.errors.TimeoutError, TimeoutError, nats.errors.Error):
        await action()

    def seen() -> bool:
        # nats-py lower-cases the server's -ERR text.
        return any("permissions violation" in str(e) and subject.lower() in str(e) for e in errors[before:])

    await eventually(seen, timeout=5)


async def test_agent_works_end_to_end_as_its_restricted_user(
    tmp_path: Path, secured: Secured, admin: JetStreamContext
) -> None:
    rows = "".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n" for i in range(5))
    sha = await push_dataset(tmp_path, admin, "isolated-rows", rows.encode())
    creds = secured.creds[A]
    config = agent_config(tmp_path, secured.server, A, nats_user=creds.user, nats_password=creds.password)
    async with running_agent(config) as agent:  # created its own durable through the filtered subject
        plain = run_stage(A, "command", {"run": ["echo", "hello from a restricted agent"]})
        await send(admin, plain)
        assert (await finished(admin, plain.attempt)).outcome == "succeeded"
        fetching = run_stage(A, "preprocess", {"dataset": "isolated-rows", "val_fraction": 0.2})
        await send(admin, fetching)
        end = await finished(admin, fetching.attempt)
        assert end.outcome == "succeeded", end.reason
        assert (tmp_path / "datasets" / sha).read_text() == rows, "fetched from the vy-datasets object store"
        assert agent.agent_id == A
    assert kinds(await reports(admin, plain.attempt)) == [
        "AttemptAcceptedReport",
        "AttemptStartedReport",
        "AttemptFinishedReport",
    ]
    assert any(isinstance(r, AgentHello) and r.agent == A for r in await reports(admin))
    assert ("stdout", "hello from a restricted agent") in [(s, t) for _, s, t in await log_lines(admin, plain.attempt)]
    assert any("fetching it from the object store" in t for _, _, t in await log_lines(admin, fetching.attempt))
    info = await admin.consumer_info(subjects.STREAM_COMMANDS, subjects.agent_command_consumer(A))
    assert info.num_pending == 0 and info.num_ack_pending == 0, "both commands acked by the restricted user"
    assert secured.violations(creds.user) == [], "the agent never needed a subject it is not allowed"


async def test_agent_metrics_pass_under_the_restricted_user(
    tmp_path: Path, secured: Secured, admin: JetStreamContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def emits(ctx: AttemptContext) -> StageResult:
        for step in (1, 2):
            ctx.metrics(step, {"train/loss": 2.0 / step})
            ctx.progress(step, 2)
        return StageResult(outcome="succeeded", exit_code=0)

    monkeypatch.setattr(runner, "resolve", lambda kind: emits)
    creds = secured.creds[A]
    config = agent_config(tmp_path, secured.server, A, nats_user=creds.user, nats_password=creds.password)
    async with running_agent(config):
        command = run_stage(A, "train", {"model": "x"})
        await send(admin, command)
        assert (await finished(admin, command.attempt)).outcome == "succeeded"

        async def both() -> bool:
            return len(await metric_points(admin, command.attempt)) == 2

        await eventually(both)
    assert secured.violations(creds.user) == []


async def test_agent_a_cannot_touch_agent_b(secured: Secured, admin: JetStreamContext) -> None:
    command_for_b = run_stage(B, "noop", {"sleep_ms": 1})
    await send(admin, command_for_b)
    b_durable = subjects.agent_command_consumer(B)
    stream = subjects.STREAM_COMMANDS
    async with as_agent(secured, A) as (nc, errors):
        js = nc.jetstream(timeout=1.0)  # a refused request times out: keep that short
        got: list[bytes] = []

        async def keep(msg: Any) -> None:
            got.append(msg.data)

        # Read B's commands: a plain subscription, or every inbox (where pulled messages arrive).
        await refused(errors, lambda: nc.subscribe(subjects.commands_of_agent(B), cb=keep), "vy.cmd.gpu-b.>")
        await refused(errors, lambda: nc.subscribe("_INBOX.>", cb=keep), "_INBOX.>")
        await refused(errors, lambda: nc.subscribe("_INBOX.agent-gpu-b.>", cb=keep), "_INBOX.agent-gpu-b.>")
        # Consume B's durable: pull from it, (re)create it, read or delete it.
        next_b = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{b_durable}"
        await refused(errors, lambda: nc.request(next_b, b'{"batch":1}', timeout=1), next_b)
        b_def = agent_command_consumer(B)
        await refused(errors, lambda: js.add_consumer(stream, consumer_config(b_def), timeout=1), b_durable)
        await refused(errors, lambda: js.consumer_info(stream, b_durable, timeout=1), b_durable)
        await refused(errors, lambda: js.delete_consumer(stream, b_durable), b_durable)
        # Point its own durable (or a new one) at B's subjects; the server checks the body's filter
        # against the subject, so only the subject it is allowed (its own filter) gets through.
        a_def = agent_command_consumer(A)
        hijack = consumer_config(a_def)
        hijack.filter_subject = subjects.commands_of_agent(B)
        await refused(errors, lambda: js.add_consumer(stream, hijack, timeout=1), "vy.cmd.gpu-b.>")
        # Through the one create subject it is allowed, a body aimed at B's subjects is refused by the
        # server itself (the filter must equal the subject's; several filters cannot use it).
        own_create = f"$JS.API.CONSUMER.CREATE.{stream}.{a_def.durable}.{subjects.commands_of_agent(A)}"
        for trick in (
            {"filter_subject": subjects.commands_of_agent(B)},
            {"filter_subjects": [subjects.commands_of_agent(B)]},
            {"filter_subject": subjects.commands_of_agent(A), "filter_subjects": [subjects.commands_of_agent(B)]},
        ):
            body = {"stream_name": stream, "config": {"durable_name": a_def.durable, "name": a_def.durable, **trick}}
            answer = json.loads((await nc.request(own_create, json.dumps(body).encode(), timeout=2)).data)
            assert answer["error"]["err_code"] in (10131, 10137), answer
        ephemeral = ConsumerConfig(filter_subject=subjects.commands_of_agent(B))
        await refused(errors, lambda: js.add_consumer(stream, ephemeral, timeout=1), f"CONSUMER.CREATE.{stream}")
        # Read the command stream directly, or administer streams.
        await refused(errors, lambda: js.get_msg(stream, 1), f"STREAM.MSG.GET.{stream}")
        await refused(errors, lambda: js.stream_info(stream), f"STREAM.INFO.{stream}")
        await refused(errors, lambda: js.delete_stream(subjects.STREAM_REPORTS), "STREAM.DELETE")
        # Act as B: report as B, ack B's messages (v1 and v2 ack subjects).
        forged = AgentHello(report_id="forged-1", agent=B, sent_at=command_for_b.issued_at, hostname="b", cpu_slots=64)
        b_hello = subjects.report_subject(B, "hello")
        await refused(errors, lambda: js.publish(b_hello, codec.encode(forged), timeout=1), b_hello)
        v1_ack = f"$JS.ACK.{stream}.{b_durable}.1.1.1.0.0"
        await refused(errors, lambda: nc.publish(v1_ack, b"+ACK"), v1_ack)
        v2_ack = f"$JS.ACK._.ACCHASH.{stream}.{b_durable}.1.1.1.0.0.token"
        await refused(errors, lambda: nc.publish(v2_ack, b"+ACK"), v2_ack)
        # The events stream is the control plane's.
        await refused(errors, lambda: nc.publish("vy.evt.pipeline-x.pipeline_submitted", b"{}"), "vy.evt.")
        await nc.flush()
        assert got == [], "no message of B's reached A"
    # B's command is still there, unacked and undelivered; no report claims to come from B.
    info = await admin.consumer_info(stream, b_durable)
    assert info.delivered is not None
    assert (info.num_pending, info.num_ack_pending, info.delivered.stream_seq) == (1, 0, 0)
    assert [r for r in await reports(admin) if getattr(r, "agent", None) == B] == []
    assert len(secured.violations(secured.creds[A].user)) >= 15


async def test_agent_b_still_gets_its_command_after_a_tried(
    tmp_path: Path, secured: Secured, admin: JetStreamContext
) -> None:
    creds = secured.creds[B]
    config = agent_config(tmp_path, secured.server, B, nats_user=creds.user, nats_password=creds.password)
    async with running_agent(config):
        command = run_stage(B, "noop", {"sleep_ms": 1})
        await send(admin, command)
        assert (await finished(admin, command.attempt)).outcome == "succeeded"
    assert secured.violations(creds.user) == []


async def test_a_wrong_password_or_an_anonymous_client_is_refused(secured: Secured) -> None:
    with pytest.raises(nats.errors.Error):
        await connect_nats(secured.server.url, name="x", user=secured.creds[A].user, password="p" + "0" * 48)
    with pytest.raises(nats.errors.Error):
        await connect_nats(secured.server.url, name="anonymous")
    with pytest.raises(nats.errors.Error):  # B's password does not open A's user
        await connect_nats(secured.server.url, name="x", user=secured.creds[A].user, password=secured.creds[B].password)

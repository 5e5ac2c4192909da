"""EmbeddedNats and the topology adapter against a real nats-server 2.15: auth, durability, idempotent ensure."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import nats
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig

from verlyard_shared import subjects
from verlyard_shared.embedded.nats import MIN_VERSION, EmbeddedNats, _version_of, find_nats_server
from verlyard_shared.nats_topology import TopologyError, connect_nats, consumer_config, ensure_topology
from verlyard_shared.topology import CONSUMERS, agent_command_consumer

T = TypeVar("T")


def test_the_wheel_binary_is_used_never_debians() -> None:
    binary = find_nats_server()
    assert binary.parent != Path("/usr/bin")
    assert _version_of(binary) >= MIN_VERSION


async def test_anonymous_and_wrong_password_clients_are_refused(nats_server: EmbeddedNats) -> None:
    for options in ({}, {"user": nats_server.user, "password": "wrong"}):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await connect_nats(nats_server.url, name="intruder", **options)  # type: ignore[arg-type]


async def test_ensure_topology_is_idempotent_and_concurrent_safe(js: JetStreamContext) -> None:
    # The fixture already ensured it once: a second pass changes nothing
    outcome = await ensure_topology(js)
    assert set(outcome.values()) == {"unchanged"}
    # Agents' consumers are added by concurrent callers without error
    first, second = await asyncio.gather(
        ensure_topology(js, agents=["gpu-1", "gpu-2"]), ensure_topology(js, agents=["gpu-1", "gpu-2"])
    )
    assert first[f"{subjects.STREAM_COMMANDS}/agent-gpu-1"] in ("created", "unchanged")
    info = await js.consumer_info(subjects.STREAM_COMMANDS, "agent-gpu-1")
    declared = agent_command_consumer("gpu-1")
    assert info.config.filter_subject == subjects.commands_of_agent("gpu-1")
    assert info.config.max_deliver == declared.max_deliver
    # NATS keeps backoff[0] as the first ack deadline (documented in nats_topology.py)
    assert info.config.ack_wait == declared.backoff_s[0]
    assert info.config.backoff == list(declared.backoff_s)
    assert second[f"{subjects.STREAM_COMMANDS}/agent-gpu-2"] in ("created", "unchanged")


async def test_ensure_topology_updates_what_drifted_and_refuses_what_cannot_change(js: JetStreamContext) -> None:
    # Given a consumer and a stream changed by hand
    scheduler = CONSUMERS[0]
    await js.add_consumer(scheduler.stream, consumer_config(scheduler).evolve(max_ack_pending=7))
    events = (await js.stream_info(subjects.STREAM_EVENTS)).config
    events.max_age = 3600.0
    await js.update_stream(events)
    # When the topology is ensured, both are put back
    outcome = await ensure_topology(js)
    assert outcome[f"{scheduler.stream}/{scheduler.durable}"] == "updated:max_ack_pending"
    assert outcome[subjects.STREAM_EVENTS] == "updated:max_age"
    # But a command stream that is not a work queue is an error, not a silent delete
    await js.delete_stream(subjects.STREAM_COMMANDS)
    await js.add_stream(
        StreamConfig(
            name=subjects.STREAM_COMMANDS,
            subjects=[subjects.COMMANDS_ALL],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
        )
    )
    with pytest.raises(TopologyError, match="retention"):
        await ensure_topology(js)


async def test_a_durable_whose_deliver_policy_changed_is_refused(js: JetStreamContext) -> None:
    # A durable on a limits stream (work-queue streams only admit deliver-all consumers).
    consumer = next(c for c in CONSUMERS if c.stream == subjects.STREAM_METRICS)
    assert consumer.deliver_policy == "all"
    await js.delete_consumer(consumer.stream, consumer.durable)
    await js.add_consumer(consumer.stream, consumer_config(consumer).evolve(deliver_policy=DeliverPolicy.NEW))
    with pytest.raises(TopologyError, match="deliver"):
        await ensure_topology(js)


async def test_an_acknowledged_message_survives_sigkill_and_clients_reconnect(
    nats_server_factory: Callable[[], EmbeddedNats],
) -> None:
    server = nats_server_factory()
    nc: NATS = await connect_nats(server.url, name="durability", user=server.user, password=server.password)
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        ack = await js.publish(subjects.metric_subject("p1", "train"), b"{}", headers={"Nats-Msg-Id": "m-1"})
        # sync_interval: always -> the ack means fsynced; SIGKILL right after it loses nothing
        server.kill()
        server.start()
        # The client may not have noticed the kill yet: its first request can vanish; retry briefly.
        info = await _retry(lambda: nc.jetstream(timeout=0.5).stream_info(subjects.STREAM_METRICS))
        assert info.state.last_seq == ack.seq and info.state.messages == 1
        # And Msg-Id dedupe survives the restart
        again = await js.publish(subjects.metric_subject("p1", "train"), b"{}", headers={"Nats-Msg-Id": "m-1"})
        assert again.duplicate
        # A paused server (SIGSTOP) times requests out; resumed, it answers again
        server.pause()
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request("$JS.API.INFO", b"", timeout=0.5)
        server.resume()
        assert (await _retry(js.account_info)).streams == 5
    finally:
        server.resume()
        await nc.close()


async def _retry(call: Callable[[], Awaitable[T]], timeout: float = 10.0) -> T:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await call()
        except nats.errors.Error:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


def test_embedded_config_is_accepted_by_nats_server(tmp_path: Path) -> None:
    import os
    import subprocess

    server = EmbeddedNats(tmp_path / "n", 4999, user="verlyard", password="-odd pass#word", monitor_port=8999)
    server.config_path.parent.mkdir(parents=True)
    server.config_path.write_text(server.render())
    env = {**os.environ, "VERLYARD_NATS_PASSWORD": '"-odd pass#word"'}
    checked = subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(server.config_path)], env=env, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr
    deploy = Path(__file__).resolve().parents[2] / "deploy" / "nats" / "nats-server.conf"
    for name in ("NATS_API_PASSWORD", "NATS_SCHEDULER_PASSWORD", "NATS_SSH_RUNNER_PASSWORD", "NATS_AGENT_PASSWORD"):
        env[name] = "p0123456789abcdef"
    checked = subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(deploy)], env=env, capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr


async def test_nats_url_fixture_carries_credentials(nats_url: str) -> None:
    client = await nats.connect(nats_url, allow_reconnect=False)
    try:
        assert client.is_connected
    finally:
        await client.close()


def test_consumer_config_is_a_pull_durable_with_explicit_acks() -> None:
    config: ConsumerConfig = consumer_config(CONSUMERS[0])
    assert config.deliver_subject is None and config.durable_name == CONSUMERS[0].durable


async def test_a_nak_without_delay_is_redelivered_at_once_despite_the_backoff(js: JetStreamContext) -> None:
    reports = CONSUMERS[0]
    assert reports.stream == subjects.STREAM_REPORTS
    await js.publish(subjects.report_subject("gpu-1", "progress"), b"{}")
    sub = await js.pull_subscribe_bind(reports.durable, reports.stream)
    (first,) = await sub.fetch(1, timeout=5)
    await first.nak()
    # backoff[0] is 1 s: a redelivery within 0.5 s shows the backoff does not apply to naks
    (again,) = await sub.fetch(1, timeout=0.5)
    assert again.metadata.num_delivered == 2
    await again.ack()

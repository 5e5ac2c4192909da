"""Integration (scaling out, docs/operations.md): a 3-node nats-server cluster with R3 streams loses
nothing when a node is killed mid-run.

Three nats-server processes (the wheel's 2.15.1, the config `render_config` makes with a `cluster`
block, routes between all three, JetStream with `sync_interval: always`) run the verlyard topology
with 3 replicas (`ensure_topology(replicas=3)`). Three real agents (`verlyard agent` processes, each
logged in as its own restricted user) run as separate "hosts": each in its own network namespace,
reaching the cluster over a veth pair, when this machine allows that (root with `ip netns`), else as
plain processes. Meanwhile the real outbox relay publishes committed Postgres events into VY_EVENTS.

The first test plays the scheduler: it sends RunStage commands (retrying a failed publish with the
same Nats-Msg-Id, as the scheduler's re-derivation does) and, a third of the way in, SIGKILLs a node:
the one leading VY_COMMANDS when an agent is connected to it, else the one with the most agents
(clients pick a random server), so an agent always loses its connection. Then every command was
acted on exactly once (one work folder, one accepted/started/finished report each, every command
acked), every report arrived once (no report id twice in VY_REPORTS), the events stream equals the
log (every committed event once, in order), and the dropped agents reconnected.

The second runs the real scheduler (in-process, as the leader) over the cluster: diamond pipelines
submitted to Postgres are placed, run by the agents and folded from their reports; after the first
stages succeed a node is killed (preferring the VY_REPORTS leader) and more pipelines are submitted.
Every pipeline succeeds with exactly one `stage.succeeded` per stage and no attempt is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats.errors
import pytest
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from tests.integration.agent_support import eventually, run_stage
from tests.integration.scheduler_kit import DIAMOND, history, submit, wait_terminal
from verlyard_api.relay import MSG_ID_HEADER, OutboxRelay
from verlyard_scheduler.service import SchedulerConfig, SchedulerService
from verlyard_shared import codec, subjects
from verlyard_shared.embedded.nats import ClusterConfig, EmbeddedNats, NatsServerError
from verlyard_shared.embedded.ports import free_port
from verlyard_shared.envelope import Metadata, NewEvent
from verlyard_shared.events import AgentRegistered, AttemptLost, PipelineCancelRequested, StageSucceeded
from verlyard_shared.ids import new_id, pipeline_stream
from verlyard_shared.nats_accounts import AgentCredentials, new_agent_credentials
from verlyard_shared.nats_auth import agent_nats_user
from verlyard_shared.nats_topology import connect_nats, ensure_topology
from verlyard_shared.reports import (
    AgentHello,
    AttemptAcceptedReport,
    AttemptFinishedReport,
    AttemptStartedReport,
)
from verlyard_shared.store.port import ANY
from verlyard_shared.store.postgres import PostgresEventStore

AGENTS = ("host-1", "host-2", "host-3")
COMMANDS = 36
EVENTS = 60
PIPELINES = 8


# ---- the "hosts": network namespaces when possible -----------------------------------------------


def _netns_possible() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"vyp{secrets.token_hex(3)}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, check=False).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return made


@dataclass
class Hosts:
    """Where each agent runs: `prefix` wraps its argv, `server_ip` is how it reaches the cluster."""

    netns: bool
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    made: list[str] = field(default_factory=list[str])

    def setup(self, index: int) -> tuple[list[str], str]:
        if not self.netns:
            return [], "127.0.0.1"
        ns, host_if, ns_if = f"vy{self.tag}h{index}", f"vy{self.tag}a{index}", f"vy{self.tag}b{index}"
        net = f"10.{200 + index}.{int(self.tag[:2], 16)}"
        steps = [
            ["ip", "netns", "add", ns],
            ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
            ["ip", "link", "set", ns_if, "netns", ns],
            ["ip", "addr", "add", f"{net}.1/30", "dev", host_if],
            ["ip", "link", "set", host_if, "up"],
            ["ip", "netns", "exec", ns, "ip", "addr", "add", f"{net}.2/30", "dev", ns_if],
            ["ip", "netns", "exec", ns, "ip", "link", "set", ns_if, "up"],
            ["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
        ]
        self.made.append(ns)
        for step in steps:
            subprocess.run(step, check=True, capture_output=True)
        return ["ip", "netns", "exec", ns], f"{net}.1"

    def teardown(self) -> None:
        for ns in self.made:  # deleting the namespace deletes its end of the veth pair, and so both
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


# ---- the cluster -------------------------------------------------------------------------------------


@dataclass
class Cluster:
    nodes: list[EmbeddedNats]
    creds: dict[str, AgentCredentials]
    password: str

    def urls(self, ip: str = "127.0.0.1", *, first: int = 0) -> str:
        """The client URLs, starting with node `first` (agents spread over the nodes)."""
        order = self.nodes[first:] + self.nodes[:first]
        return ",".join(f"nats://{ip}:{node.port}" for node in order)

    def node_named(self, name: str) -> EmbeddedNats:
        return next(n for n in self.nodes if n.config_path.parent.name == name)


def _nodes(folder: Path, creds: dict[str, AgentCredentials], password: str) -> list[EmbeddedNats]:
    # Listening on every address: agents in other network namespaces reach it over their veth.
    client_ports = [free_port() for _ in range(3)]
    route_ports = [free_port() for _ in range(3)]
    routes = tuple(f"nats-route://127.0.0.1:{p}" for p in route_ports)
    return [
        EmbeddedNats(
            folder / f"n{i + 1}",
            client_ports[i],
            host="0.0.0.0",
            user="control",
            password=password,
            users=[agent_nats_user(a, password_hash=c.password_hash) for a, c in creds.items()],
            cluster=ClusterConfig(name="vy-test", listen_host="127.0.0.1", port=route_ports[i], routes=routes),
            server_name=f"n{i + 1}",
            max_memory_store="128MB",
            max_file_store="1GB",
        )
        for i in range(3)
    ]


def _started(folder: Path, creds: dict[str, AgentCredentials], password: str) -> list[EmbeddedNats]:
    """Three started nodes. The ports are chosen before the nodes start, and the first nodes' route
    dials (ephemeral source ports) can take a later node's port meanwhile (CI: "bind: address already
    in use"): then the whole cluster starts again on fresh ports."""
    for attempt in range(3):
        nodes = _nodes(folder / f"try{attempt}", creds, password)
        try:
            for node in nodes:
                node.start()
        except NatsServerError as exc:
            for node in nodes:
                node.kill()
            if "address already in use" not in str(exc) or attempt == 2:
                raise
            continue
        return nodes
    raise AssertionError("unreachable")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    creds = {agent: new_agent_credentials(agent, rounds=4) for agent in AGENTS}
    password = "c" + secrets.token_hex(16)
    nodes = _started(tmp_path, creds, password)
    try:
        yield Cluster(nodes=nodes, creds=creds, password=password)
    finally:
        for node in nodes:
            node.kill()


@contextlib.asynccontextmanager
async def control(cluster: Cluster) -> AsyncIterator[NATS]:
    nc = await connect_nats(cluster.urls(), name="control", user="control", password=cluster.password)
    try:
        yield nc
    finally:
        await nc.close()


async def _ensure_r3(js: JetStreamContext) -> None:
    """ensure_topology(replicas=3) once the cluster has elected its JetStream meta leader."""
    deadline = time.monotonic() + 30
    while True:
        try:
            await ensure_topology(js, agents=AGENTS, replicas=3)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


# ---- reading what arrived ------------------------------------------------------------------------------


class ReportLog:
    """Every message of VY_REPORTS read once by sequence (direct gets; the work queue keeps them)."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.next_seq = 1
        self.items: list[Any] = []

    async def catch_up(self) -> list[Any]:
        try:
            info = await self.js.stream_info(subjects.STREAM_REPORTS)
            while self.next_seq <= info.state.last_seq:
                try:
                    msg = await self.js.get_msg(subjects.STREAM_REPORTS, self.next_seq)
                except NotFoundError:  # consumed by a scheduler (work queue): gone
                    msg = None
                if msg is not None and msg.data:
                    self.items.append(codec.decode_report(msg.data))
                self.next_seq += 1
        except Exception:  # a leader change in progress: read on next time
            pass
        return self.items


async def _through_leader_changes(call: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run a JetStream API call again while a leader change after the kill times it out (up to 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return await call(*args)
        except (TimeoutError, nats.errors.TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def _events_in_stream(js: JetStreamContext) -> list[str]:
    info = await js.stream_info(subjects.STREAM_EVENTS)
    sub = await js.subscribe(
        subjects.EVENTS_ALL, stream=subjects.STREAM_EVENTS, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL
    )
    ids: list[str] = []
    try:
        while len(ids) < info.state.messages:
            msg = await sub.next_msg(timeout=10)
            ids.append((msg.headers or {}).get(MSG_ID_HEADER, ""))
    finally:
        await sub.unsubscribe()
    return ids


async def _send_until_acked(js: JetStreamContext, subject: str, data: bytes, msg_id: str) -> int:
    """Publish as the scheduler does: a failed publish is tried again with the same Msg-Id."""
    tries = 0
    deadline = time.monotonic() + 30
    while True:
        tries += 1
        try:
            await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id}, timeout=2)
            return tries
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _append_events(store: PostgresEventStore, count: int, pause_s: float) -> None:
    pipeline = new_id()
    for n in range(count):
        event = NewEvent(event_id=new_id(), event=PipelineCancelRequested(pipeline_id=pipeline, reason=f"r{n}"))
        await store.append(pipeline_stream(pipeline), ANY, [event], Metadata(actor="test", correlation_id=pipeline))
        await asyncio.sleep(pause_s)


AGENT_ARGV = [sys.executable, "-m", "verlyard_shared.cli", "agent", "--id"]


def _start_agent(argv: list[str], env: dict[str, str], log_file: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


@contextlib.asynccontextmanager
async def fleet(tmp_path: Path, cluster: Cluster, registered: Callable[[], Awaitable[bool]]) -> AsyncIterator[Path]:
    """The three agents as separate hosts, once `registered()`; yields their log file. Killed at the end."""
    hosts = Hosts(netns=_netns_possible())
    agents: list[subprocess.Popen[bytes]] = []
    log_path = tmp_path / "agents.log"
    log_file = log_path.open("ab")
    try:
        for index, agent in enumerate(AGENTS, start=1):
            prefix, ip = hosts.setup(index)
            creds = cluster.creds[agent]
            env = {
                **os.environ,
                # Each agent starts on another node, so the killed node always drops one of them.
                "VERLYARD_NATS_URL": cluster.urls(ip, first=index - 1),
                "VERLYARD_NATS_USER": creds.user,
                "VERLYARD_NATS_PASSWORD": creds.password,
                "VERLYARD_HOME": str(tmp_path / agent),
                "VERLYARD_HEARTBEAT_S": "1",
                "VERLYARD_AGENT_SLOTS": "4",
                "VERLYARD_LOG_FORMAT": "json",
            }
            agents.append(_start_agent([*prefix, *AGENT_ARGV, agent], env, log_file))

        await eventually(registered, timeout=40, every=0.2)
        yield log_path
    finally:
        for proc in agents:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        log_file.close()
        hosts.teardown()


def _agents_on(node: EmbeddedNats) -> set[str]:
    """The agent users connected to `node`, from its monitoring endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{node.monitor_port}/connz?auth=true", timeout=2) as response:
        data = json.load(response)
    users = {str(c.get("authorized_user", "")) for c in data.get("connections") or []}
    return {u.removeprefix("agent-") for u in users if u.startswith("agent-")}


async def _kill_busy_node(js: JetStreamContext, cluster: Cluster, stream: str) -> tuple[str, set[str]]:
    """SIGKILL (a crash, mid-run) the node leading `stream` when an agent is connected to it, else the
    node with the most agents (clients pick a random server): returns its name and its agents."""
    info = (await js.stream_info(stream)).cluster
    assert info is not None and info.leader is not None
    load = {n.config_path.parent.name: await asyncio.to_thread(_agents_on, n) for n in cluster.nodes}
    victim = info.leader if load[info.leader] else max(load, key=lambda name: len(load[name]))
    cluster.node_named(victim).kill()
    return victim, load[victim]


async def _reconnected(log_path: Path, agents: set[str]) -> None:
    """Every agent that was on the killed node logged a disconnect and a reconnect."""
    assert agents, "no agent was connected to the killed node"

    def seen() -> bool:
        lines = log_path.read_text().splitlines()
        for agent in agents:
            mine = [line for line in lines if f'"verlyard-agent-{agent}"' in line]
            if not any('"nats_disconnected"' in line for line in mine):
                return False
            if not any('"nats_reconnected"' in line for line in mine):
                return False
        return True

    await eventually(seen, timeout=15, every=0.2)


# ---- the test --------------------------------------------------------------------------------------------


async def test_a_killed_node_loses_no_command_report_or_event(
    tmp_path: Path, cluster: Cluster, pg_pool: asyncpg.Pool, pg_store: PostgresEventStore
) -> None:
    relay_stop = asyncio.Event()
    async with control(cluster) as nc:
        js = nc.jetstream(timeout=5)
        await _ensure_r3(js)
        commands_info = await js.stream_info(subjects.STREAM_COMMANDS)
        assert commands_info.config.num_replicas == 3
        assert commands_info.cluster is not None and len(commands_info.cluster.replicas or []) == 2
        relay = OutboxRelay(pg_pool, js, batch_size=20)
        relay_task = asyncio.create_task(relay.run(relay_stop))
        log = ReportLog(js)

        async def hellos() -> bool:
            return {r.agent for r in await log.catch_up() if isinstance(r, AgentHello)} == set(AGENTS)

        try:
            async with fleet(tmp_path, cluster, hellos) as agents_log:
                appending = asyncio.create_task(_append_events(pg_store, EVENTS, pause_s=0.05))
                sent: dict[str, str] = {}  # attempt -> agent
                killed, dropped = "", set[str]()
                for n in range(COMMANDS):
                    agent = AGENTS[n % len(AGENTS)]
                    command = run_stage(agent, "noop", {"sleep_ms": 100})
                    await _send_until_acked(
                        js, subjects.command_subject(agent, "run_stage"), codec.encode(command), command.command_id
                    )
                    sent[command.attempt] = agent
                    if n == COMMANDS // 3:
                        killed, dropped = await _kill_busy_node(js, cluster, subjects.STREAM_COMMANDS)
                    await asyncio.sleep(0.06)
                await appending

                async def all_finished() -> bool:
                    done = {r.attempt for r in await log.catch_up() if isinstance(r, AttemptFinishedReport)}
                    return done >= set(sent)

                await eventually(all_finished, timeout=60, every=0.3)
                head = await pg_store.head_position()

                async def relayed() -> bool:
                    return await pg_store.get_tracking("relay") >= head

                await eventually(relayed, timeout=30, every=0.2)
                relay_stop.set()
                await asyncio.wait_for(relay_task, 15)

                # Every command acted on once: one accepted, started and finished report (by report id)
                # per attempt, each succeeded, and exactly one work folder for it on its own host.
                items = await log.catch_up()
                ids = [r.report_id for r in items]
                assert len(ids) == len(set(ids)), "a report was stored twice in VY_REPORTS"
                for attempt, agent in sent.items():
                    mine = [r for r in items if getattr(r, "attempt", None) == attempt]
                    kinds = [type(r) for r in mine]
                    assert kinds.count(AttemptAcceptedReport) == 1, (attempt, kinds)
                    assert kinds.count(AttemptStartedReport) == 1, (attempt, kinds)
                    finished = [r for r in mine if isinstance(r, AttemptFinishedReport)]
                    assert [f.outcome for f in finished] == ["succeeded"], (attempt, finished)
                    assert {r.agent for r in mine} == {agent}
                    folders = list((tmp_path / agent).glob(f"agent/**/attempts/{attempt}"))
                    assert len(folders) == 1, (attempt, folders)
                for agent in AGENTS:
                    durable = subjects.agent_command_consumer(agent)
                    info = await _through_leader_changes(js.consumer_info, subjects.STREAM_COMMANDS, durable)
                    assert (info.num_pending, info.num_ack_pending) == (0, 0), f"{agent}: commands left unacked"
                # Every committed event in the events stream once, in commit order.
                committed = [e.event_id for e in await pg_store.read_all(after=0, limit=100_000)]
                assert len(committed) == EVENTS
                assert await _through_leader_changes(_events_in_stream, js) == committed
                assert killed and len([n for n in cluster.nodes if n.is_running()]) == 2
                await _reconnected(agents_log, dropped)
        finally:
            relay_stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(relay_task, 15)


async def test_pipelines_through_the_real_scheduler_survive_a_node_kill(
    tmp_path: Path, cluster: Cluster, pg_url: str, pg_pool: asyncpg.Pool, pg_store: PostgresEventStore
) -> None:
    """The scheduler's path: pipelines in Postgres -> placements -> commands over the cluster -> agents
    -> reports -> the scheduler (durable `scheduler-reports`); the VY_REPORTS leader is killed mid-run."""
    stop = asyncio.Event()
    async with control(cluster) as nc:
        js = nc.jetstream(timeout=5)
        await _ensure_r3(js)
        service = SchedulerService(dsn=pg_url, store=pg_store, js=js, pool=pg_pool, config=SchedulerConfig())
        task = asyncio.create_task(service.run(stop))
        try:
            await asyncio.wait_for(service.leading.wait(), timeout=10)

            async def registered() -> bool:  # the scheduler took every agent's hello
                events = await pg_store.read_all(after=0, limit=100_000)
                return {e.event.agent for e in events if isinstance(e.event, AgentRegistered)} == set(AGENTS)

            async with fleet(tmp_path, cluster, registered) as agents_log:
                first = [await submit(pg_store, DIAMOND, name=f"d{i}") for i in range(PIPELINES // 2)]

                async def some_succeeded() -> bool:
                    done = [
                        e
                        for e in await pg_store.read_all(after=0, limit=100_000)
                        if isinstance(e.event, StageSucceeded)
                    ]
                    return len(done) >= PIPELINES // 2

                await eventually(some_succeeded, timeout=40, every=0.1)
                killed, dropped = await _kill_busy_node(js, cluster, subjects.STREAM_REPORTS)
                second = [await submit(pg_store, DIAMOND, name=f"e{i}") for i in range(PIPELINES - len(first))]
                states = await wait_terminal(pg_store, first + second, timeout=60)
                assert {s.status for s in states.values()} == {"succeeded"}, states
                for pid in first + second:
                    log = await history(pg_store, pid)
                    succeeded = [e.event.stage for e in log if isinstance(e.event, StageSucceeded)]
                    assert sorted(succeeded) == sorted(DIAMOND), (pid, succeeded)  # one success per stage
                    assert not [e for e in log if isinstance(e.event, AttemptLost)], pid
                assert killed and len([n for n in cluster.nodes if n.is_running()]) == 2
                await _reconnected(agents_log, dropped)
        finally:
            stop.set()
            await asyncio.wait_for(task, 15)

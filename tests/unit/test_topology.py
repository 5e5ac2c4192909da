"""Reliability T3: the shipped NATS config, the embedded one, and every stream/consumer definition.

Fails when: `sync_interval` is not `always`; storage is not file; the commands stream is not a work
queue; a duplicate window is under 120 s; a consumer lacks `ack_wait`, has an unbounded or disabled
`max_deliver`, or lacks `backoff`; or the config admits anonymous clients. Each checker is also run
against a broken copy, so a checker that checks nothing fails too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.js.api import AckPolicy, RetentionPolicy, StorageType

from verlyard_shared import subjects
from verlyard_shared.embedded.nats import EmbeddedNats, render_deploy_config
from verlyard_shared.nats_topology import consumer_config, declared, stream_config
from verlyard_shared.topology import CONSUMERS, STREAMS, ConsumerDef, StreamDef, agent_command_consumer

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_CONF = ROOT / "deploy" / "nats" / "nats-server.conf"
MIN_DUPLICATE_WINDOW_S = 120.0
MAX_DELIVER_BOUND = 100


# ---- a small parser for the NATS config format (maps, arrays, strings, numbers, $VARIABLES) --------


@dataclass(frozen=True)
class Var:
    """A `$NAME` reference, resolved by nats-server from the environment."""

    name: str


_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|\#[^\n]*|//[^\n]*)
  | (?P<punct>[{}\[\],;])
  | (?P<sep>[:=])
  | (?P<dq>"(?:[^"\\]|\\.)*")
  | (?P<sq>'[^']*')
  | (?P<var>\$[A-Za-z_][A-Za-z0-9_]*)
  | (?P<word>[^\s{}\[\],;:="'\#]+(?::[^\s{}\[\],;="'\#]+)*)
    """,
    re.VERBOSE,
)


def _tokens(text: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ValueError(f"cannot tokenise nats config at {text[pos : pos + 30]!r}")
        pos = match.end()
        kind = match.lastgroup or ""
        if kind != "ws":
            out.append((kind, match.group()))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        token = self.tokens[self.i]
        self.i += 1
        return token

    def body(self, closing: str | None) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while (token := self.peek()) is not None:
            if token[1] == closing:
                self.take()
                return result
            if token[0] == "punct" and token[1] in ",;":
                self.take()
                continue
            kind, key = self.take()
            if kind not in ("word", "dq"):
                raise ValueError(f"expected a key, got {key!r}")
            key = msgspec.json.decode(key) if kind == "dq" else key
            if (nxt := self.peek()) is not None and nxt[0] == "sep":
                self.take()
            if key in result:
                raise ValueError(f"duplicate key {key!r}")
            result[key] = self.value()
        if closing is not None:
            raise ValueError(f"missing {closing!r}")
        return result

    def value(self) -> Any:
        kind, text = self.take()
        if text == "{":
            return self.body("}")
        if text == "[":
            items: list[Any] = []
            while (token := self.peek()) is not None and token[1] != "]":
                if token[1] in ",;":
                    self.take()
                    continue
                items.append(self.value())
            self.take()
            return items
        if kind == "dq":
            return msgspec.json.decode(text)
        if kind == "sq":
            return text[1:-1]
        if kind == "var":
            return Var(text[1:])
        if re.fullmatch(r"-?\d+", text):
            return int(text)
        if text in ("true", "false"):
            return text == "true"
        return text


def parse_nats_conf(text: str) -> dict[str, Any]:
    return _Parser(text).body(None)


# ---- the checks -----------------------------------------------------------------------------------


def _walk_keys(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [k for k, v in value.items() for k in (k, *_walk_keys(v))]
    if isinstance(value, list):
        return [k for item in value for k in _walk_keys(item)]
    return []


SPANNING = {">", "vy.>", "vy.cmd.>", "vy.rpt.>", "_INBOX.>", "$JS.>", "$JS.API.>", "$JS.ACK.>"}
"""Subjects that would let one agent reach every agent's traffic."""
BCRYPT = re.compile(r"^\$2[aby]?\$\d\d\$[./A-Za-z0-9]{53}$")


def config_problems(conf: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    jetstream = conf.get("jetstream")
    if not isinstance(jetstream, dict):
        problems.append("jetstream is not enabled with a block")
        jetstream = {}
    if jetstream.get("sync_interval") != "always":
        problems.append(f"jetstream.sync_interval is {jetstream.get('sync_interval')!r}, not 'always'")
    if not jetstream.get("store_dir"):
        problems.append("jetstream.store_dir is missing (file storage needs a place)")
    keys = _walk_keys(conf)
    if "no_auth_user" in keys:
        problems.append("no_auth_user admits anonymous clients")
    auth = conf.get("authorization")
    users = auth.get("users") if isinstance(auth, dict) else None
    if not isinstance(users, list) or not users:
        problems.append("no authorization users: anonymous clients would be admitted")
        users = []
    if isinstance(auth, dict) and ("token" in auth or "password" in auth):
        problems.append("authorization uses a shared token/password instead of users")
    for user in users:
        if not isinstance(user, dict) or not user.get("user"):
            problems.append(f"a user without a name: {user!r}")
            continue
        password = user.get("password")
        if not isinstance(password, Var) and not (isinstance(password, str) and BCRYPT.fullmatch(password)):
            problems.append(
                f"user {user['user']!r}: the password must come from an environment variable or be a bcrypt hash"
            )
        if str(user["user"]).startswith("agent-"):
            # T11: an agent user is confined to allow-lists (docs/adr/0015), never the whole bus.
            perms = user.get("permissions")
            pub = perms.get("publish", {}).get("allow") if isinstance(perms, dict) else None
            sub = perms.get("subscribe", {}).get("allow") if isinstance(perms, dict) else None
            if not isinstance(pub, list) or not isinstance(sub, list):
                problems.append(f"agent user {user['user']!r} has no publish/subscribe allow-lists")
            elif any(
                str(x) in (">", "vy.>", "vy.cmd.>", "vy.rpt.>", "_INBOX.>", "$JS.>", "$JS.API.>") for x in pub + sub
            ):
                problems.append(f"agent user {user['user']!r} is allowed a subject that spans other agents")
    http = str(conf.get("http", ""))
    if http and not http.startswith("127.0.0.1:"):
        problems.append(f"monitoring ({http}) is not on loopback: it has no authentication")
    return problems


def topology_problems(streams: tuple[StreamDef, ...], consumers: tuple[ConsumerDef, ...]) -> list[str]:
    problems: list[str] = []
    by_name = {s.name: s for s in streams}
    for stream in streams:
        if stream.storage != "file":
            problems.append(f"{stream.name}: storage is {stream.storage}, not file")
            continue
        config = stream_config(stream)
        if config.storage != StorageType.FILE:
            problems.append(f"{stream.name}: storage maps to {config.storage}, not file")
        if (
            stream.duplicate_window_s < MIN_DUPLICATE_WINDOW_S
            or (config.duplicate_window or 0) < MIN_DUPLICATE_WINDOW_S
        ):
            problems.append(f"{stream.name}: duplicate window {stream.duplicate_window_s}s < {MIN_DUPLICATE_WINDOW_S}s")
    commands = by_name.get(subjects.STREAM_COMMANDS)
    if commands is None or commands.retention != "workqueue":
        problems.append("the commands stream is missing or not a work queue")
    elif stream_config(commands).retention != RetentionPolicy.WORK_QUEUE:
        problems.append("the commands stream does not map to a work-queue StreamConfig")
    for consumer in consumers:
        name = f"{consumer.stream}/{consumer.durable}"
        if consumer.stream not in by_name:
            problems.append(f"{name}: no such stream")
        if not consumer.ack_wait_s or consumer.ack_wait_s <= 0:
            problems.append(f"{name}: no ack_wait")
        if consumer.max_deliver in (-1, 0) or not 1 <= consumer.max_deliver <= MAX_DELIVER_BOUND:
            problems.append(f"{name}: max_deliver {consumer.max_deliver} is unbounded or disabled")
        if not consumer.backoff_s or any(b <= 0 for b in consumer.backoff_s):
            problems.append(f"{name}: no backoff")
        if consumer.max_deliver <= len(consumer.backoff_s):
            problems.append(f"{name}: NATS requires max_deliver > len(backoff)")
        if problems and problems[-1].startswith(name):
            continue
        config = consumer_config(consumer)
        if config.ack_policy != AckPolicy.EXPLICIT or config.durable_name != consumer.durable:
            problems.append(f"{name}: not a durable with explicit acks")
        if config.deliver_subject is not None:
            problems.append(f"{name}: not a pull consumer")
        if not config.ack_wait or not config.backoff or config.max_deliver != consumer.max_deliver:
            problems.append(f"{name}: ack_wait/backoff/max_deliver lost in the mapping")
    return problems


# ---- the tests ------------------------------------------------------------------------------------


def _embedded_conf() -> tuple[EmbeddedNats, str]:
    # monitor_port given: no socket is opened to find one.
    server = EmbeddedNats(Path("/srv/verlyard/nats"), 4333, user="verlyard", password="secret", monitor_port=8333)
    return server, server.render()


def test_shipped_config_is_the_template() -> None:
    assert DEPLOY_CONF.read_text() == render_deploy_config(), (
        "deploy/nats/nats-server.conf differs from render_deploy_config(): regenerate it (see its header)"
    )


@pytest.mark.parametrize("which", ["deploy", "embedded"])
def test_config_is_durable_and_authenticated(which: str) -> None:
    text = DEPLOY_CONF.read_text() if which == "deploy" else _embedded_conf()[1]
    conf = parse_nats_conf(text)
    assert config_problems(conf) == []
    assert conf["jetstream"]["sync_interval"] == "always"
    users = {u["user"]: u for u in conf["authorization"]["users"]}
    if which == "embedded":
        assert [u["password"] for u in users.values()] == [Var("VERLYARD_NATS_PASSWORD")]
    else:
        assert {name: u["password"] for name, u in users.items()} == {
            "api": Var("NATS_API_PASSWORD"),
            "scheduler": Var("NATS_SCHEDULER_PASSWORD"),
            "ssh-runner": Var("NATS_SSH_RUNNER_PASSWORD"),
            "agent-compose-gpu-0": Var("NATS_AGENT_PASSWORD"),
        }
        assert "permissions" not in users["api"], "services use every subject"
        allowed = users["agent-compose-gpu-0"]["permissions"]["subscribe"]["allow"]
        assert allowed == ["_INBOX.agent-compose-gpu-0.>"]


def test_embedded_config_keeps_data_under_data_dir_and_no_secret() -> None:
    server, text = _embedded_conf()
    conf = parse_nats_conf(text)
    assert conf["jetstream"]["store_dir"] == "/srv/verlyard/nats"
    assert conf["listen"] == "127.0.0.1:4333"
    assert conf["authorization"]["users"][0]["user"] == "verlyard"
    assert server.password not in text


@pytest.mark.parametrize(
    ("mutation", "expected"),
    [
        (lambda t: t.replace("sync_interval: always", "sync_interval: 2m"), "sync_interval"),
        (lambda t: t.replace("  sync_interval: always\n", ""), "sync_interval"),
        (lambda t: re.sub(r"authorization \{.*\n\}\n", "", t, flags=re.S), "anonymous"),
        (lambda t: t.replace("server_name:", "no_auth_user: control\nserver_name:"), "no_auth_user"),
        (lambda t: t.replace("$NATS_API_PASSWORD", '"hunter2"'), "environment variable"),
        (lambda t: t.replace('"_INBOX.agent-compose-gpu-0.>"', '"_INBOX.>"'), "spans other agents"),
        (lambda t: t.replace('"vy.rpt.compose-gpu-0.>"', '"vy.rpt.>"'), "spans other agents"),
        (lambda t: re.sub(r", permissions: \{.*?\n    \} \}", " }", t, flags=re.S), "allow-lists"),
        (lambda t: t.replace('http: "127.0.0.1:', 'http: "0.0.0.0:'), "loopback"),
    ],
)
def test_config_checker_catches_a_broken_config(mutation: Any, expected: str) -> None:
    broken = mutation(DEPLOY_CONF.read_text())
    assert broken != DEPLOY_CONF.read_text()
    assert any(expected in p for p in config_problems(parse_nats_conf(broken)))


def test_streams_and_consumers_are_bounded() -> None:
    streams, consumers = declared(agents=("gpu-1", "gpu_2"))
    assert streams == STREAMS
    assert set(CONSUMERS) < set(consumers)
    assert agent_command_consumer("gpu-1") in consumers
    assert topology_problems(streams, consumers) == []


def _replace_stream(name: str, **changes: Any) -> tuple[StreamDef, ...]:
    return tuple(msgspec.structs.replace(s, **changes) if s.name == name else s for s in STREAMS)


@pytest.mark.parametrize(
    ("streams", "consumers", "expected"),
    [
        (_replace_stream(subjects.STREAM_COMMANDS, retention="limits"), CONSUMERS, "work queue"),
        (_replace_stream(subjects.STREAM_EVENTS, duplicate_window_s=60.0), CONSUMERS, "duplicate window"),
        (_replace_stream(subjects.STREAM_LOGS, storage="memory"), CONSUMERS, "storage"),
        (STREAMS, (msgspec.structs.replace(CONSUMERS[0], ack_wait_s=0.0),), "ack_wait"),
        (STREAMS, (msgspec.structs.replace(CONSUMERS[0], max_deliver=-1),), "max_deliver"),
        (STREAMS, (msgspec.structs.replace(CONSUMERS[0], max_deliver=0),), "max_deliver"),
        (STREAMS, (msgspec.structs.replace(CONSUMERS[0], max_deliver=1_000_000),), "unbounded"),
        (STREAMS, (msgspec.structs.replace(CONSUMERS[0], backoff_s=()),), "backoff"),
        (STREAMS, (msgspec.structs.replace(CONSUMERS[0], max_deliver=3, backoff_s=(1.0, 2.0, 3.0)),), "len(backoff)"),
    ],
)
def test_topology_checker_catches_a_broken_definition(
    streams: tuple[StreamDef, ...], consumers: tuple[ConsumerDef, ...], expected: str
) -> None:
    assert any(expected in p for p in topology_problems(streams, consumers))

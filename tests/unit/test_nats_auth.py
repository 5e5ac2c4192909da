"""Unit: per-agent NATS users (docs/adr/0015) — permissions, rendering, the registry and the CLI.

The permissions are checked here with NATS's own wildcard rules (`*` one token, `>` the rest): no
subject allowed to agent A matches a subject of agent B's. The same permissions against a real
nats-server: tests/integration/test_nats_isolation.py.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import bcrypt
import pytest

from tests.unit.test_topology import config_problems, parse_nats_conf
from verlyard_shared import subjects
from verlyard_shared.cli import main
from verlyard_shared.embedded.nats import ClusterConfig, ConfigUser, TlsConfig, render_config, render_deploy_config
from verlyard_shared.nats_accounts import (
    AccountsError,
    add_agent,
    load_registry,
    registered_users,
    remove_agent,
    write_credentials_env,
)
from verlyard_shared.nats_auth import agent_inbox_prefix, agent_nats_user, agent_permissions, agent_user


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` is one token, a final `>` one or more."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def b_subjects(agent: str) -> list[str]:
    """Subjects only agent `agent` (or the control plane) may use."""
    durable = subjects.agent_command_consumer(agent)
    cmd = subjects.STREAM_COMMANDS
    return [
        subjects.command_subject(agent, "run_stage"),
        subjects.report_subject(agent, "hello"),
        subjects.report_subject(agent, "attempt_finished"),
        f"$JS.API.CONSUMER.CREATE.{cmd}.{durable}.vy.cmd.{agent}.>",
        f"$JS.API.CONSUMER.CREATE.{cmd}.{durable}",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{cmd}.{durable}",
        f"$JS.API.CONSUMER.MSG.NEXT.{cmd}.{durable}",
        f"$JS.API.CONSUMER.INFO.{cmd}.{durable}",
        f"$JS.API.CONSUMER.DELETE.{cmd}.{durable}",
        f"$JS.ACK.{cmd}.{durable}.1.7.7.1700000000.0",
        f"$JS.ACK.hub.ACCHASH.{cmd}.{durable}.1.7.7.1700000000.0.tok",
        f"{agent_inbox_prefix(agent)}.abc.1",
    ]


def control_plane_subjects() -> list[str]:
    return [
        "vy.evt.pipeline-1.pipeline_submitted",
        f"$JS.API.STREAM.CREATE.{subjects.STREAM_COMMANDS}",
        f"$JS.API.STREAM.DELETE.{subjects.STREAM_REPORTS}",
        f"$JS.API.STREAM.MSG.GET.{subjects.STREAM_COMMANDS}",
        f"$JS.API.STREAM.PURGE.{subjects.STREAM_COMMANDS}",
        f"$JS.API.CONSUMER.CREATE.{subjects.STREAM_COMMANDS}",
        f"$JS.API.CONSUMER.CREATE.{subjects.STREAM_REPORTS}.scheduler-reports.vy.rpt.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{subjects.STREAM_REPORTS}.scheduler-reports",
        "_INBOX.Xk3dQ9aa0ZbC1dE2fG3hI4.1",
        "$O.vy-datasets.C.abc",
    ]


@pytest.mark.parametrize(("a", "b"), [("gpu-a", "gpu-b"), ("gpu", "gpu-1"), ("x_1", "x_10"), ("agent-1", "1")])
def test_no_subject_allowed_to_one_agent_reaches_another(a: str, b: str) -> None:
    perms = agent_permissions(a)
    assert perms.publish is not None and perms.subscribe is not None
    for pattern in (*perms.publish, *perms.subscribe):
        for subject in b_subjects(b):
            assert not matches(pattern, subject), f"{a} may use {subject!r} through {pattern!r}"


def test_an_agent_reaches_none_of_the_control_planes_subjects() -> None:
    perms = agent_permissions("gpu-a")
    assert perms.publish is not None and perms.subscribe is not None
    for pattern in (*perms.publish, *perms.subscribe):
        for subject in control_plane_subjects():
            assert not matches(pattern, subject), f"the agent may use {subject!r} through {pattern!r}"


def test_an_agent_reaches_its_own_subjects() -> None:
    perms = agent_permissions("gpu-a")
    assert perms.publish is not None and perms.subscribe is not None
    durable, cmd = "agent-gpu-a", subjects.STREAM_COMMANDS
    publish = [
        subjects.report_subject("gpu-a", "hello"),
        subjects.metric_subject("p1", "train"),
        subjects.log_subject("p1", "train"),
        f"$JS.API.CONSUMER.CREATE.{cmd}.{durable}.vy.cmd.gpu-a.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{cmd}.{durable}",
        f"$JS.ACK.{cmd}.{durable}.1.7.7.1700000000.0",
        f"$JS.ACK.hub.ACCHASH.{cmd}.{durable}.1.7.7.1700000000.0.tok",
        "$JS.API.STREAM.INFO.OBJ_vy-datasets",
        "$JS.API.DIRECT.GET.OBJ_vy-datasets.$O.vy-datasets.M.bmFtZQ",
    ]
    for subject in publish:
        assert any(matches(p, subject) for p in perms.publish), subject
    assert any(matches(p, f"{agent_inbox_prefix('gpu-a')}.nuid.1") for p in perms.subscribe)


def test_agent_user_names() -> None:
    assert agent_user("gpu-a") == "agent-gpu-a"
    assert agent_inbox_prefix("gpu-a") == "_INBOX.agent-gpu-a"
    with pytest.raises(ValueError, match="subject token"):
        agent_user("a.b")
    with pytest.raises(ValueError, match="too long"):
        agent_user("x" * 60)


def test_registered_agents_render_as_users_that_pass_the_t3_guard(tmp_path: Path) -> None:
    registry = tmp_path / "agents.json"
    creds = add_agent(registry, "gpu-a", rounds=4)
    add_agent(registry, "gpu-b", rounds=4)
    text = render_deploy_config(registered_users(registry))
    conf = parse_nats_conf(text)
    assert config_problems(conf) == []
    users = {u["user"]: u for u in conf["authorization"]["users"]}
    assert {"api", "scheduler", "ssh-runner", "agent-compose-gpu-0", "agent-gpu-a", "agent-gpu-b"} == set(users)
    assert bcrypt.checkpw(creds.password.encode(), users["agent-gpu-a"]["password"].encode())
    assert creds.password not in text
    assert users["agent-gpu-a"]["permissions"]["subscribe"]["allow"] == ["_INBOX.agent-gpu-a.>"]


def test_registry_add_rotate_remove_and_file_modes(tmp_path: Path) -> None:
    registry = tmp_path / "home" / "agents.json"
    first = add_agent(registry, "gpu-a", rounds=4)
    assert stat.S_IMODE(registry.stat().st_mode) == 0o600
    with pytest.raises(AccountsError, match="already registered"):
        add_agent(registry, "gpu-a", rounds=4)
    second = add_agent(registry, "gpu-a", replace=True, rounds=4)
    assert second.password != first.password
    stored = load_registry(registry)["gpu-a"]["password_hash"]
    assert bcrypt.checkpw(second.password.encode(), stored.encode())
    assert not bcrypt.checkpw(first.password.encode(), stored.encode()), "rotation revokes the old password"
    env_file = tmp_path / "gpu-a.env"
    write_credentials_env(env_file, second, nats_url="nats://cp:4222")
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    lines = env_file.read_text().splitlines()
    assert "VERLYARD_NATS_USER=agent-gpu-a" in lines and f"VERLYARD_NATS_PASSWORD={second.password}" in lines
    with pytest.raises(AccountsError, match="exists"):
        write_credentials_env(env_file, second)
    assert remove_agent(registry, "gpu-a") and not remove_agent(registry, "gpu-a")
    assert load_registry(registry) == {}


def test_a_broken_registry_is_a_clear_error(tmp_path: Path) -> None:
    registry = tmp_path / "agents.json"
    registry.write_text("[]")
    with pytest.raises(AccountsError, match="not a verlyard NATS agent registry"):
        load_registry(registry)
    registry.write_text(json.dumps({"agents": {"a": {}}}))
    with pytest.raises(AccountsError, match="no password_hash"):
        load_registry(registry)


def test_cli_add_agent_config_and_permissions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VERLYARD_HOME", str(tmp_path))
    monkeypatch.setattr("verlyard_shared.nats_accounts.DEFAULT_ROUNDS", 4)
    assert main(["nats", "add-agent", "gpu-a", "--nats-url", "nats://cp:4222"]) == 0
    out = capsys.readouterr().out
    assert "VERLYARD_AGENT_ID=gpu-a" in out and "VERLYARD_NATS_URL=nats://cp:4222" in out
    assert main(["nats", "add-agent", "gpu-a"]) == 2
    assert "already registered" in capsys.readouterr().err
    assert main(["nats", "config"]) == 0
    assert 'user: "agent-gpu-a"' in capsys.readouterr().out
    assert main(["nats", "permissions", "gpu-a"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["subscribe"] == ["_INBOX.agent-gpu-a.>"] and "vy.rpt.gpu-a.>" in body["publish"]
    assert main(["nats", "list"]) == 0
    assert capsys.readouterr().out.startswith("gpu-a\tagent-gpu-a\t")
    assert main(["nats", "remove-agent", "gpu-a"]) == 0
    assert main(["nats", "remove-agent", "gpu-a"]) == 2


CA = "/etc/nats/ca.pem"


def test_tls_and_cluster_blocks_render_and_pass_the_t3_guard() -> None:
    text = render_config(
        listen_host="0.0.0.0",
        port=4222,
        monitor_port=8222,
        store_dir="/data/jetstream",
        users=[ConfigUser.of(agent_nats_user("gpu-a", password_env="NATS_AGENT_PASSWORD"))],
        tls=TlsConfig(
            cert_file="/etc/nats/server.pem",
            key_file="/etc/nats/server-key.pem",
            ca_file="/etc/nats/ca.pem",
            verify=True,
        ),
        cluster=ClusterConfig(
            name="verlyard",
            listen_host="0.0.0.0",
            port=6222,
            routes=("nats-route://nats-1:6222", "nats-route://nats-2:6222", "nats-route://nats-3:6222"),
            tls=TlsConfig(
                cert_file="/etc/nats/route.pem",
                key_file="/etc/nats/route-key.pem",
                ca_file="/etc/nats/ca.pem",
                verify=True,
            ),
        ),
    )
    conf = parse_nats_conf(text)
    assert config_problems(conf) == []
    assert conf["tls"]["verify"] is True and conf["tls"]["ca_file"] == "/etc/nats/ca.pem"
    assert conf["cluster"]["routes"][2] == "nats-route://nats-3:6222"
    assert conf["cluster"]["tls"]["cert_file"] == "/etc/nats/route.pem"
    with pytest.raises(ValueError, match="route URL"):
        render_config(
            listen_host="0.0.0.0",
            port=4222,
            monitor_port=8222,
            store_dir="/d",
            users=[ConfigUser(name="api", password_env="X")],
            cluster=ClusterConfig(name="c", listen_host="0.0.0.0", port=6222, routes=("nats-route://u:pw@h:6222",)),
        )


def test_a_user_needs_exactly_one_password_source() -> None:
    for user in (ConfigUser(name="api"), ConfigUser(name="api", password_env="X", password_hash="$2b$04$" + "a" * 53)):
        with pytest.raises(ValueError, match="exactly one"):
            render_config(listen_host="0.0.0.0", port=1, monitor_port=2, store_dir="/d", users=[user])
    with pytest.raises(ValueError, match="bcrypt"):
        render_config(
            listen_host="0.0.0.0",
            port=1,
            monitor_port=2,
            store_dir="/d",
            users=[ConfigUser(name="a", password_hash="x")],
        )


def test_the_embedded_stack_gives_each_service_and_the_local_agent_its_own_user() -> None:
    from verlyard_shared.embedded.nats import EmbeddedNats
    from verlyard_shared.embedded.stack import _service_env  # pyright: ignore[reportPrivateUsage]
    from verlyard_shared.nats_auth import service_user

    server = EmbeddedNats(
        Path("/srv/verlyard/nats"),
        4333,
        user="verlyard",
        password="secret",
        monitor_port=8333,
        users=[
            service_user("api", password_env="NATS_API_PASSWORD"),
            service_user("scheduler", password_env="NATS_SCHEDULER_PASSWORD"),
            agent_nats_user("box", password_env="NATS_AGENT_PASSWORD"),
        ],
        passwords={"NATS_API_PASSWORD": "a1", "NATS_SCHEDULER_PASSWORD": "s1", "NATS_AGENT_PASSWORD": "g1"},
    )
    text = server.render()
    conf = parse_nats_conf(text)
    assert config_problems(conf) == []
    assert [u["user"] for u in conf["authorization"]["users"]] == ["verlyard", "api", "scheduler", "agent-box"]
    assert not any(p in text for p in ("a1", "s1", "g1", "secret")), "passwords travel in the environment only"
    logins = {"api": ("api", "a1"), "scheduler": ("scheduler", "s1"), "agent": ("agent-box", "g1")}
    base = {"VERLYARD_NATS_URL": "nats://127.0.0.1:4333"}
    assert _service_env(base, "agent", logins, "box") == {
        **base,
        "VERLYARD_AGENT_ID": "box",
        "VERLYARD_NATS_USER": "agent-box",
        "VERLYARD_NATS_PASSWORD": "g1",
    }
    assert _service_env(base, "api", logins, "box")["VERLYARD_NATS_USER"] == "api"
    with pytest.raises(ValueError, match="no password"):
        EmbeddedNats(
            Path("/x"), 1, user="v", password="p", monitor_port=2, users=[service_user("api", password_env="P")]
        )

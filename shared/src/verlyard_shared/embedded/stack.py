"""Entrypoint: `verlyard up`, the embedded stack. Postgres and nats-server from wheels under
VERLYARD_HOME, migrations and JetStream topology, then api, scheduler and one local agent, each its
own supervised OS process. Ctrl-C stops everything; a second `up` finds the same data."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from verlyard_shared.embedded.ports import free_port, port_is_free
from verlyard_shared.embedded.supervisor import ServiceSpec, Supervisor
from verlyard_shared.settings import Settings

log = structlog.get_logger("verlyard.up")

NATS_USER = "verlyard"
"""The stack's own NATS user (topology at start-up, operators' tools); each service and the local agent
log in as their own user (docs/adr/0015): `api`, `scheduler` and `agent-<id>`, limited to its subjects."""


class StackError(RuntimeError):
    """The embedded stack cannot start; the message says why and what to do."""


@dataclass
class StackOptions:
    home: Path
    api_port: int = 8400
    agent: bool = True
    agent_slots: int = 2


def _secret(path: Path) -> str:
    """A random secret kept in a 0600 file, created on first use."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def _load_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        loaded: dict[str, Any] = json.loads(path.read_text())
    except ValueError:
        return {}
    return loaded


def _port(state: dict[str, Any], key: str) -> int:
    """Reuse the port chosen on the first start when it is still free, so URLs stay stable."""
    previous = state.get(key)
    if isinstance(previous, int) and port_is_free(previous):
        return previous
    state[key] = free_port()
    return int(state[key])


async def _prepare(database_url: str, nats_url: str, nats_user: str | None, nats_password: str | None) -> list[str]:
    from verlyard_shared.nats_topology import connect_nats, ensure_topology
    from verlyard_shared.store.migrate import migrate
    from verlyard_shared.store.postgres import connect_pool

    pool = await connect_pool(database_url, min_size=1, max_size=2)
    try:
        applied = await migrate(pool)
    finally:
        await pool.close()
    nc = await connect_nats(nats_url, name="verlyard-up", user=nats_user, password=nats_password)
    try:
        await ensure_topology(nc.jetstream())
    finally:
        await nc.close()
    return applied


def local_agent_id() -> str:
    """The local agent's id: the host name made a subject token (as `verlyard agent` does), short
    enough for its NATS user name `agent-<id>`."""
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return name[:57] or "agent"


def _service_env(env: dict[str, str], name: str, logins: dict[str, tuple[str, str]], agent_id: str) -> dict[str, str]:
    """The environment of one service: its own NATS login when the stack runs NATS."""
    out = dict(env)
    if name not in ("api", "ssh-runner"):
        out.pop("VERLYARD_SECRET_KEY", None)  # only the services that seal or open SSH credentials hold the key
    if name == "agent":
        out["VERLYARD_AGENT_ID"] = agent_id
    if name in logins:
        out["VERLYARD_NATS_USER"], out["VERLYARD_NATS_PASSWORD"] = logins[name]
    return out


def _lock(run_dir: Path) -> Any:
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / "stack.lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise StackError(f"another `verlyard up` already runs with VERLYARD_HOME={run_dir.parent}") from None
    return handle


def run_stack(options: StackOptions, settings: Settings) -> int:
    """Run the embedded stack in the foreground until SIGINT/SIGTERM; return the exit code."""
    home = options.home.resolve()
    run_dir = home / "run"
    lock = _lock(run_dir)
    state_path = home / "stack.json"
    state = _load_state(state_path)
    if not port_is_free(options.api_port, host=settings.api_host):
        raise StackError(f"port {options.api_port} is in use: pass --port or stop what listens there")

    postgres = nats = None
    stop = False

    def _on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)

    try:
        database_url = settings.database_url
        if database_url is None:
            from verlyard_shared.embedded.postgres import EmbeddedPostgres

            postgres = EmbeddedPostgres(home / "postgres", port=_port(state, "postgres_port"))
            postgres.init()
            postgres.start()
            database_url = postgres.url
            log.info("postgres_started", data=str(home / "postgres"), port=state["postgres_port"])
        nats_url, nats_user, nats_password = settings.nats_url, settings.nats_user, settings.nats_password
        # service -> (NATS user, password) when the stack runs its own NATS; else all share the settings'.
        logins: dict[str, tuple[str, str]] = {}
        agent_id = settings.agent_id or local_agent_id()
        if nats_url is None:
            from verlyard_shared.embedded.nats import EmbeddedNats
            from verlyard_shared.nats_accounts import REGISTRY_NAME, registered_users
            from verlyard_shared.nats_auth import agent_nats_user, agent_user, service_user

            nats_user, nats_password = NATS_USER, _secret(home / "secrets" / "nats-password")
            logins = {
                "api": ("api", _secret(home / "secrets" / "nats-api-password")),
                "scheduler": ("scheduler", _secret(home / "secrets" / "nats-scheduler-password")),
                "agent": (agent_user(agent_id), _secret(home / "secrets" / "nats-agent-password")),
                "ssh-runner": ("ssh-runner", _secret(home / "secrets" / "nats-ssh-runner-password")),
            }
            users = [
                service_user("api", password_env="NATS_API_PASSWORD"),
                service_user("scheduler", password_env="NATS_SCHEDULER_PASSWORD"),
                service_user("ssh-runner", password_env="NATS_SSH_RUNNER_PASSWORD"),
                agent_nats_user(agent_id, password_env="NATS_AGENT_PASSWORD"),
                # Agents on other hosts registered with `verlyard nats add-agent` (bcrypt hashes).
                *(u for u in registered_users(home / REGISTRY_NAME) if u.agent != agent_id),
            ]
            passwords = {
                "NATS_API_PASSWORD": logins["api"][1],
                "NATS_SCHEDULER_PASSWORD": logins["scheduler"][1],
                "NATS_SSH_RUNNER_PASSWORD": logins["ssh-runner"][1],
                "NATS_AGENT_PASSWORD": logins["agent"][1],
            }
            nats = EmbeddedNats(
                home / "nats",
                port=_port(state, "nats_port"),
                user=nats_user,
                password=nats_password,
                users=users,
                passwords=passwords,
            )
            nats.start()
            nats_url = nats.url
            log.info("nats_started", data=str(home / "nats"), port=state["nats_port"])
        state["api_port"] = options.api_port
        state_path.write_text(json.dumps(state, indent=2) + "\n")

        applied = asyncio.run(_prepare(database_url, nats_url, nats_user, nats_password))
        log.info("migrations_applied", applied=applied)

        env = {
            **os.environ,
            "VERLYARD_HOME": str(home),
            "VERLYARD_DATABASE_URL": database_url,
            "VERLYARD_NATS_URL": nats_url,
            "VERLYARD_API_HOST": settings.api_host,
            "VERLYARD_API_PORT": str(options.api_port),
            "VERLYARD_API_URL": f"http://{settings.api_host}:{options.api_port}",
            "VERLYARD_AGENT_SLOTS": str(options.agent_slots),
            "VERLYARD_LOG_FORMAT": "json",
        }
        if nats_user is not None and nats_password is not None:
            env["VERLYARD_NATS_USER"], env["VERLYARD_NATS_PASSWORD"] = nats_user, nats_password
        names = ["api", "scheduler"] + (["agent"] if options.agent else [])
        if settings.secret_key:
            # SSH hosts can exist only with a key (the API refuses to add one without it): then the runner
            # that drives them runs too (docs/adr/0011).
            names.append("ssh-runner")
        supervisor = Supervisor(
            run_dir,
            [
                ServiceSpec(
                    name=name,
                    argv=[sys.executable, "-m", "verlyard_shared.cli", name],
                    env=_service_env(env, name, logins, agent_id),
                    log_path=home / "logs" / f"{name}.log",
                )
                for name in names
            ],
        )
        supervisor.start_all()
        log.info("stack_up", api=env["VERLYARD_API_URL"], home=str(home), logs=str(home / "logs"))
        try:
            while not stop:
                supervisor.poll()
                time.sleep(0.2)
        finally:
            log.info("stack_stopping")
            supervisor.stop_all()
    finally:
        if nats is not None:
            with contextlib.suppress(Exception):
                nats.stop()
        if postgres is not None:
            with contextlib.suppress(Exception):
                postgres.stop()
        lock.close()
    log.info("stack_stopped")
    return 0

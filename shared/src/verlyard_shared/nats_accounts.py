"""Adapter: NATS credentials for agents — generate, keep the registry, render the server config.

`verlyard nats add-agent ID` makes a random password for the user `agent-<ID>`, stores only its
bcrypt hash in the registry (a JSON file the control plane keeps: `$VERLYARD_HOME/nats-agents.json`
by default), and writes the password once to an env file for that GPU host (mode 0600:
`VERLYARD_AGENT_ID`, `VERLYARD_NATS_USER`, `VERLYARD_NATS_PASSWORD`, the systemd unit's
EnvironmentFile). `verlyard nats config` renders the server config with every registered agent as
its own user, limited to its own subjects (`verlyard_shared.nats_auth`); reload nats-server after
(SIGHUP, `nats-server --signal reload`). The embedded stack reads the same registry at start-up.
"""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from verlyard_shared.nats_auth import NatsUser, agent_nats_user, agent_user

DEFAULT_ROUNDS = 11
"""bcrypt cost of agent passwords (nats-server checks one hash per connect, not per message)."""
REGISTRY_NAME = "nats-agents.json"


class AccountsError(ValueError):
    """A bad agent id, a missing bcrypt module or an unreadable registry; the message says which."""


@dataclass(frozen=True, kw_only=True)
class AgentCredentials:
    agent: str
    user: str
    password: str
    password_hash: str


def new_password() -> str:
    """48 hex digits behind a letter: safe as a NATS config value, in a URL and in an env file."""
    return "p" + secrets.token_hex(24)


def hash_password(password: str, *, rounds: int = DEFAULT_ROUNDS) -> str:
    try:
        import bcrypt
    except ModuleNotFoundError:
        raise AccountsError("bcrypt is not installed: pip install 'bcrypt>=4.1'") from None
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds)).decode()


def new_agent_credentials(agent: str, *, rounds: int = DEFAULT_ROUNDS) -> AgentCredentials:
    try:
        user = agent_user(agent)
    except ValueError as exc:
        raise AccountsError(str(exc)) from None
    password = new_password()
    return AgentCredentials(
        agent=agent, user=user, password=password, password_hash=hash_password(password, rounds=rounds)
    )


# ---- the registry (hashes only) ------------------------------------------------------------------


def load_registry(path: Path) -> dict[str, dict[str, Any]]:
    """agent id -> {"user", "password_hash", "added_at"}; an absent file is an empty registry."""
    try:
        raw: Any = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise AccountsError(f"cannot read the NATS agent registry {path}: {exc}") from None
    agents = raw.get("agents") if isinstance(raw, dict) else None
    if not isinstance(agents, dict):
        raise AccountsError(f"{path} is not a verlyard NATS agent registry (no 'agents' object)")
    out: dict[str, dict[str, Any]] = {}
    for agent, entry in agents.items():  # pyright: ignore[reportUnknownVariableType]
        if not isinstance(entry, dict) or not isinstance(entry.get("password_hash"), str):  # pyright: ignore[reportUnknownMemberType]
            raise AccountsError(f"{path}: agent {agent!r} has no password_hash")
        out[str(agent)] = dict(entry)  # pyright: ignore[reportUnknownArgumentType]
    return out


def _write_private(path: Path, text: str, mode: int) -> None:
    """Write atomically (temp file + rename) with `mode` from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_registry(path: Path, agents: Mapping[str, Mapping[str, Any]]) -> None:
    body = {"agents": {agent: dict(agents[agent]) for agent in sorted(agents)}}
    _write_private(path, json.dumps(body, indent=2) + "\n", 0o600)


def add_agent(registry: Path, agent: str, *, replace: bool = False, rounds: int = DEFAULT_ROUNDS) -> AgentCredentials:
    """Register `agent` with a new password (rotate with `replace=True`); returns the credentials."""
    agents = load_registry(registry)
    if agent in agents and not replace:
        raise AccountsError(f"agent {agent!r} is already registered; pass --rotate for a new password")
    creds = new_agent_credentials(agent, rounds=rounds)
    agents[agent] = {
        "user": creds.user,
        "password_hash": creds.password_hash,
        "added_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    save_registry(registry, agents)
    return creds


def remove_agent(registry: Path, agent: str) -> bool:
    agents = load_registry(registry)
    if agents.pop(agent, None) is None:
        return False
    save_registry(registry, agents)
    return True


def registered_users(registry: Path) -> list[NatsUser]:
    """The registry's agents as `NatsUser`s (bcrypt hashes, per-agent permissions), sorted by id."""
    return [
        agent_nats_user(agent, password_hash=str(entry["password_hash"]))
        for agent, entry in sorted(load_registry(registry).items())
    ]


def credentials_env(creds: AgentCredentials, *, nats_url: str | None = None) -> str:
    """The env file for the agent's host (systemd EnvironmentFile / docker --env-file)."""
    lines = [
        f"# verlyard agent {creds.agent}: its own NATS user (docs/adr/0015). Keep this file 0600.",
        f"VERLYARD_AGENT_ID={creds.agent}",
        f"VERLYARD_NATS_USER={creds.user}",
        f"VERLYARD_NATS_PASSWORD={creds.password}",
    ]
    if nats_url is not None:
        lines.append(f"VERLYARD_NATS_URL={nats_url}")
    return "\n".join(lines) + "\n"


def write_credentials_env(path: Path, creds: AgentCredentials, *, nats_url: str | None = None) -> None:
    if path.exists():
        raise AccountsError(f"{path} exists; move it away first (it may hold another agent's password)")
    _write_private(path, credentials_env(creds, nats_url=nats_url), 0o600)

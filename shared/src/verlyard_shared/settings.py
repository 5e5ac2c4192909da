"""Adapter: settings from `VERLYARD_*` environment variables, with one clear error per bad value."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import msgspec


class SettingsError(ValueError):
    """A `VERLYARD_*` variable has a bad value; the message names the variable and what is wrong."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    home: Path
    """VERLYARD_HOME: data folder of the embedded stack."""
    database_url: str | None = None
    nats_url: str | None = None
    api_url: str = "http://127.0.0.1:8400"
    api_host: str = "127.0.0.1"
    api_port: int = 8400
    token: str | None = None
    secret_key: str | None = None
    trainer_python: str | None = None
    log_format: Literal["json", "console", "auto"] = "auto"
    log_level: str = "info"
    agent_id: str | None = None
    agent_slots: int = 2
    agent_labels: dict[str, str] = {}
    nats_user: str | None = None
    nats_password: str | None = None
    nats_creds: str | None = None
    nats_ca_file: str | None = None
    """VERLYARD_NATS_CA_FILE: the CA (PEM) that signed the NATS server's certificate; default: the system's CAs."""
    nats_cert_file: str | None = None
    """VERLYARD_NATS_CERT_FILE: a client certificate (PEM) for a server that verifies clients (mutual TLS)."""
    nats_key_file: str | None = None
    """VERLYARD_NATS_KEY_FILE: the private key (PEM) of VERLYARD_NATS_CERT_FILE."""
    lease_s: float = 30.0
    heartbeat_s: float = 5.0
    agent_cancel_grace_s: float = 10.0
    """VERLYARD_AGENT_CANCEL_GRACE_S: SIGTERM to a stage's process group, then SIGKILL after this long."""
    agent_drain_timeout_s: float = 1500.0
    """VERLYARD_AGENT_DRAIN_TIMEOUT_S: after SIGTERM, how long running stages may finish before they are stopped."""
    datasets_dir: Path | None = None
    """VERLYARD_DATASETS_DIR: where the API stores pushed datasets (default `$VERLYARD_HOME/datasets`)."""
    max_dataset_bytes: int = 2 * 1024**3
    """VERLYARD_MAX_DATASET_BYTES: the largest dataset upload (413 past it)."""


_LEVELS = {"debug", "info", "warning", "error", "critical"}


def _int(env: Mapping[str, str], name: str, default: int, *, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={value} is out of range [{low}, {high}]")
    return value


def _float(env: Mapping[str, str], name: str, default: float, *, low: float, high: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={value} is out of range [{low}, {high}]")
    return value


def _url(env: Mapping[str, str], name: str, schemes: tuple[str, ...]) -> str | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    for part in raw.split(","):
        parsed = urlparse(part.strip())
        if parsed.scheme not in schemes or not parsed.hostname:
            raise SettingsError(
                f"{name} must be a URL like {schemes[0]}://host:port, got a value with scheme {parsed.scheme!r}"
            )
    return raw


def parse_labels(raw: str, *, name: str = "VERLYARD_AGENT_LABELS") -> dict[str, str]:
    """`gpu=h100,zone=a` -> {"gpu": "h100", "zone": "a"}."""
    labels: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in raw.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SettingsError(f"{name}: {item!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read every `VERLYARD_*` variable; raise SettingsError naming the first bad one."""
    env = os.environ if env is None else env
    fmt = env.get("VERLYARD_LOG_FORMAT", "auto") or "auto"
    if fmt not in ("json", "console", "auto"):
        raise SettingsError(f"VERLYARD_LOG_FORMAT={fmt!r} must be one of json, console, auto")
    level = (env.get("VERLYARD_LOG_LEVEL", "info") or "info").lower()
    if level not in _LEVELS:
        raise SettingsError(f"VERLYARD_LOG_LEVEL={level!r} must be one of {sorted(_LEVELS)}")
    api_url = _url(env, "VERLYARD_API_URL", ("http", "https")) or "http://127.0.0.1:8400"
    port = _int(env, "VERLYARD_API_PORT", 8400, low=1, high=65535)
    nats_cert_file = env.get("VERLYARD_NATS_CERT_FILE") or None
    nats_key_file = env.get("VERLYARD_NATS_KEY_FILE") or None
    if (nats_cert_file is None) != (nats_key_file is None):
        raise SettingsError("VERLYARD_NATS_CERT_FILE and VERLYARD_NATS_KEY_FILE go together: set both or neither")
    agent_id = env.get("VERLYARD_AGENT_ID") or None
    if agent_id is not None:
        from verlyard_shared.subjects import token

        try:
            token(agent_id)
        except ValueError:
            raise SettingsError(f"VERLYARD_AGENT_ID={agent_id!r} may hold only letters, digits, '_' and '-'") from None
    return Settings(
        home=Path(env.get("VERLYARD_HOME") or "./.verlyard").expanduser().resolve(),
        database_url=_url(env, "VERLYARD_DATABASE_URL", ("postgresql", "postgres")),
        nats_url=_url(env, "VERLYARD_NATS_URL", ("nats", "tls", "nats+tls")),
        api_url=api_url.rstrip("/"),
        api_host=env.get("VERLYARD_API_HOST") or "127.0.0.1",
        api_port=port,
        token=env.get("VERLYARD_TOKEN") or None,
        secret_key=env.get("VERLYARD_SECRET_KEY") or None,
        trainer_python=env.get("VERLYARD_TRAINER_PYTHON") or None,
        log_format=fmt,  # type: ignore[arg-type]
        log_level=level,
        agent_id=agent_id,
        agent_slots=_int(env, "VERLYARD_AGENT_SLOTS", 2, low=0, high=1024),
        agent_labels=parse_labels(env.get("VERLYARD_AGENT_LABELS", "")),
        nats_user=env.get("VERLYARD_NATS_USER") or None,
        nats_password=env.get("VERLYARD_NATS_PASSWORD") or None,
        nats_creds=env.get("VERLYARD_NATS_CREDS") or None,
        nats_ca_file=env.get("VERLYARD_NATS_CA_FILE") or None,
        nats_cert_file=nats_cert_file,
        nats_key_file=nats_key_file,
        lease_s=_float(env, "VERLYARD_LEASE_S", 30.0, low=1.0, high=86_400.0),
        heartbeat_s=_float(env, "VERLYARD_HEARTBEAT_S", 5.0, low=0.05, high=3_600.0),
        agent_cancel_grace_s=_float(env, "VERLYARD_AGENT_CANCEL_GRACE_S", 10.0, low=0.0, high=3_600.0),
        agent_drain_timeout_s=_float(env, "VERLYARD_AGENT_DRAIN_TIMEOUT_S", 1500.0, low=0.0, high=7 * 86_400.0),
        datasets_dir=Path(env["VERLYARD_DATASETS_DIR"]).expanduser().resolve()
        if env.get("VERLYARD_DATASETS_DIR")
        else None,
        max_dataset_bytes=_int(env, "VERLYARD_MAX_DATASET_BYTES", 2 * 1024**3, low=1, high=2**50),
    )


# Every variable `load_settings` reads; tests check compose.yaml and docs against this list.
ENV_NAMES: tuple[str, ...] = (
    "VERLYARD_HOME",
    "VERLYARD_DATABASE_URL",
    "VERLYARD_NATS_URL",
    "VERLYARD_API_URL",
    "VERLYARD_API_HOST",
    "VERLYARD_API_PORT",
    "VERLYARD_TOKEN",
    "VERLYARD_SECRET_KEY",
    "VERLYARD_TRAINER_PYTHON",
    "VERLYARD_LOG_FORMAT",
    "VERLYARD_LOG_LEVEL",
    "VERLYARD_AGENT_ID",
    "VERLYARD_AGENT_SLOTS",
    "VERLYARD_AGENT_LABELS",
    "VERLYARD_NATS_USER",
    "VERLYARD_NATS_PASSWORD",
    "VERLYARD_NATS_CREDS",
    "VERLYARD_NATS_CA_FILE",
    "VERLYARD_NATS_CERT_FILE",
    "VERLYARD_NATS_KEY_FILE",
    "VERLYARD_LEASE_S",
    "VERLYARD_HEARTBEAT_S",
    "VERLYARD_AGENT_CANCEL_GRACE_S",
    "VERLYARD_AGENT_DRAIN_TIMEOUT_S",
    "VERLYARD_DATASETS_DIR",
    "VERLYARD_MAX_DATASET_BYTES",
)

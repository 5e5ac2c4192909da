"""Entrypoint: CLI commands that talk to the API over HTTP (`verlyard token create`, `verlyard replay`).

The API is at VERLYARD_API_URL; the token is VERLYARD_TOKEN, or the embedded stack's
`$VERLYARD_HOME/admin-token`. Errors become one line for the user (the API's `detail`).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import httpx

from verlyard_shared.cli import CliError
from verlyard_shared.settings import Settings

TIMEOUT_S = 30.0
REPLAY_TIMEOUT_S = 900.0


def resolve_token(settings: Settings) -> str:
    """VERLYARD_TOKEN, else the embedded stack's admin token file."""
    if settings.token:
        return settings.token
    path = settings.home / "admin-token"
    try:
        token = path.read_text().strip()
    except FileNotFoundError:
        raise CliError(
            f"no token: set VERLYARD_TOKEN, or run the embedded stack (`verlyard up`) which writes {path}"
        ) from None
    except PermissionError:
        raise CliError(f"cannot read {path}: it belongs to the user that ran `verlyard up`") from None
    if not token:
        raise CliError(f"{path} is empty")
    return token


def api_client(settings: Settings, *, timeout: float = TIMEOUT_S) -> httpx.Client:
    return httpx.Client(
        base_url=settings.api_url,
        headers={"Authorization": f"Bearer {resolve_token(settings)}", "User-Agent": "verlyard-cli"},
        timeout=timeout,
    )


def call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    """The JSON body of a successful response; CliError with the API's detail otherwise."""
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the API at {client.base_url}: {exc}") from None
    if response.status_code >= 400:
        try:
            body = response.json()
            message = f"{body.get('error', 'error')}: {body.get('detail', response.text)}"
        except ValueError:
            message = response.text.strip() or response.reason_phrase
        raise CliError(f"{response.status_code} {message}")
    return response.json()


def token_create(settings: Settings, *, role: str, name: str | None, as_json: bool) -> int:
    """Create a token; print it (once) on stdout, its details on stderr."""
    body: dict[str, Any] = {"role": role} | ({"name": name} if name else {})
    with api_client(settings) as client:
        created = call(client, "POST", "/api/v1/tokens", json=body)
    if as_json:
        print(json.dumps(created))
    else:
        print(created["token"])
        print(
            f"created {created['role']} token {created['name']!r} (id {created['id']}); it is shown only once",
            file=sys.stderr,
        )
    return 0


def replay(settings: Settings, *, verify: bool, as_json: bool) -> int:
    """Verify (compare) or rebuild the read models; exit 1 when verify finds a difference."""
    with api_client(settings, timeout=REPLAY_TIMEOUT_S) as client:
        report = call(client, "POST", "/api/v1/admin/replay", params={"verify": "true" if verify else "false"})
    if as_json:
        print(json.dumps(report))
        return 0 if report["ok"] else 1
    scope = f"up to position {report['position']} ({report['pipelines']} pipelines, {report['tokens']} tokens)"
    if report["mode"] == "rebuild":
        print(f"rebuilt every read model from the event log {scope}")
        return 0
    if report["ok"]:
        print(f"ok: the read models match the event log {scope}")
        return 0
    print(f"{len(report['differences'])} difference(s) between the read models and the event log {scope}:")
    for d in report["differences"]:
        field = d["field"] or "(whole row)"
        print(f"  {d['kind']} {d['id']} {field}: expected {json.dumps(d['expected'])}, found {json.dumps(d['found'])}")
    if report.get("truncated"):
        print("  ... (more differences not shown)")
    print("run `verlyard replay` (without --verify) to rebuild them from the log")
    return 1

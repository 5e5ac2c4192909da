"""Entrypoint: the CLI's HTTP client of the API (one error mapping for every command: `call`, `stream`)
and the admin commands `verlyard token create` and `verlyard replay` (the others: cli_commands.py).

The API is at VERLYARD_API_URL; the token is VERLYARD_TOKEN, or the embedded stack's
`$VERLYARD_HOME/admin-token`. Errors become one line for the user (the API's `detail`).
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

import httpx

from verlyard_shared.cli import CliError
from verlyard_shared.cli_render import api_error_message, unreachable_message
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


class ApiCallError(CliError):
    """The API answered with an error status; the message is the one line shown to the user."""

    def __init__(self, message: str, *, status: int, body: Any) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def api_client(settings: Settings, *, timeout: float = TIMEOUT_S) -> httpx.Client:
    return httpx.Client(
        base_url=settings.api_url,
        headers={"Authorization": f"Bearer {resolve_token(settings)}", "User-Agent": "verlyard-cli"},
        timeout=timeout,
    )


def transport_error(client: httpx.Client, exc: httpx.HTTPError) -> CliError:
    """A failed connection or a timeout -> one line naming the API's address."""
    url = str(client.base_url).rstrip("/")
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return CliError(unreachable_message(url))
    if isinstance(exc, httpx.TimeoutException):
        return CliError(f"the API at {url} did not answer in time ({type(exc).__name__})")
    return CliError(f"lost the connection to the API at {url}: {exc or type(exc).__name__}")


def raise_for_error(response: httpx.Response) -> None:
    """ApiCallError with the API's detail (and a bad spec's issues, one per line) for a 4xx/5xx."""
    if response.status_code < 400:
        return
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    message = api_error_message(response.status_code, body, response.text if body is None else "")
    raise ApiCallError(message, status=response.status_code, body=body)


def call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    """The JSON body of a successful response; CliError with the API's detail otherwise."""
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise transport_error(client, exc) from None
    raise_for_error(response)
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise CliError(f"the API answered {method} {path} with something that is not JSON") from None


@contextlib.contextmanager
def stream(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
    """A streaming response (SSE, followed logs) whose errors read like `call`'s."""
    try:
        with client.stream(method, path, **kwargs) as response:
            if response.status_code >= 400:
                response.read()
                raise_for_error(response)
            yield response
    except httpx.HTTPError as exc:
        raise transport_error(client, exc) from None


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

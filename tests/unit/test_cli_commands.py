"""Unit: the CLI's API commands against an in-memory HTTP transport (no sockets): errors are one line
(never a traceback) with the right exit code; hosts answer clearly from a server without the hosts API."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from verlyard_shared import cli, cli_commands
from verlyard_shared.cli_render import NO_VALID_TOKEN

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Callable[[Handler], list[httpx.Request]]:
    """Route the CLI's HTTP client to `handler`; returns the list the requests are recorded in."""
    monkeypatch.setenv("VERLYARD_TOKEN", "vy_test")
    monkeypatch.setenv("VERLYARD_API_URL", "http://api.test:8400")

    def install(handler: Handler) -> list[httpx.Request]:
        seen: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return handler(request)

        def client(settings: Any, *, timeout: float = 30.0) -> httpx.Client:
            return httpx.Client(
                base_url=settings.api_url,
                transport=httpx.MockTransport(record),
                headers={"Authorization": f"Bearer {settings.token}"},
            )

        monkeypatch.setattr(cli_commands, "api_client", client)
        return seen

    return install


def error(status: int, code: str, detail: str, **extra: Any) -> httpx.Response:
    return httpx.Response(status, json={"error": code, "detail": detail} | extra)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_hosts_on_a_server_without_the_hosts_api_answer_one_clear_line(
    api: Callable[[Handler], list[httpx.Request]], capsys: pytest.CaptureFixture[str]
) -> None:
    api(lambda request: error(404, "not_found", "Not Found"))
    for argv in (["hosts", "ls"], ["hosts", "rm", "gpu-box"], ["hosts", "probe", "gpu-box"]):
        code, out, err = run(argv, capsys)
        assert code == 2 and out == ""
        assert err == "verlyard: error: hosts are not available on this server yet (HTTP 404)\n"


def test_hosts_404_for_one_unknown_host_keeps_the_apis_detail(
    api: Callable[[Handler], list[httpx.Request]], capsys: pytest.CaptureFixture[str]
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path == "/api/v1/hosts":
            return httpx.Response(200, json={"items": [], "next": None})
        return error(404, "not_found", "no host gpu-box")

    api(handler)
    code, _, err = run(["hosts", "rm", "gpu-box"], capsys)
    assert code == 2 and err == "verlyard: error: 404 not_found: no host gpu-box\n"


def test_hosts_add_sends_the_password_from_stdin_and_never_prints_it(
    api: Callable[[Handler], list[httpx.Request]], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = api(lambda request: httpx.Response(201, json={"name": "box", "host_key_fingerprint": "SHA256:abc"}))
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret-canary\n"))
    code, out, err = run(
        ["hosts", "add", "box", "--address", "10.0.0.5:2222", "--user", "ml", "--password-stdin"], capsys
    )
    assert code == 0 and out == "added host box (host key SHA256:abc pinned)\n"
    assert json.loads(seen[0].content) == {
        "name": "box",
        "address": "10.0.0.5",
        "port": 2222,
        "user": "ml",
        "password": "s3cret-canary",
    }
    assert "s3cret-canary" not in out + err


def test_connection_refused_names_the_url_and_verlyard_up(
    api: Callable[[Handler], list[httpx.Request]], capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    api(refuse)
    code, out, err = run(["ls"], capsys)
    assert code == 2 and out == ""
    assert err == "verlyard: error: cannot reach the API at http://api.test:8400 (is `verlyard up` running?)\n"


def test_401_says_how_to_get_a_token(
    api: Callable[[Handler], list[httpx.Request]], capsys: pytest.CaptureFixture[str]
) -> None:
    api(lambda request: error(401, "unauthorized", "missing or invalid bearer token"))
    code, _, err = run(["status", "p-1"], capsys)
    assert code == 2 and err == f"verlyard: error: {NO_VALID_TOKEN}\n"


def test_submit_422_lists_the_issues_with_their_lines(
    api: Callable[[Handler], list[httpx.Request]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    seen = api(
        lambda request: error(
            422,
            "invalid_spec",
            "1 problem in the spec: stages.a.kind: unknown",
            issues=[{"path": "stages.a.kind", "message": "unknown stage kind 'nope'", "line": 3}],
        )
    )
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\nstages:\n  a: {kind: nope}\n")
    code, out, err = run(["submit", str(spec)], capsys)
    assert code == 2 and out == ""
    assert err == (
        "verlyard: error: 422 invalid_spec: 1 problem in the spec\n"
        "  stages.a.kind (line 3): unknown stage kind 'nope'\n"
    )
    assert seen[0].headers["content-type"] == "application/yaml"


def test_submit_of_a_missing_file_is_one_line(
    api: Callable[[Handler], list[httpx.Request]], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    seen = api(lambda request: httpx.Response(500))
    code, _, err = run(["submit", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and err == f"verlyard: error: cannot read {tmp_path / 'nope.yaml'}: no such file\n"
    assert seen == []


def test_ls_follows_cursors_with_all(
    api: Callable[[Handler], list[httpx.Request]], capsys: pytest.CaptureFixture[str]
) -> None:
    def page(request: httpx.Request) -> httpx.Response:
        cursor = request.url.params.get("cursor")
        item = {"id": cursor or "first", "name": "n", "status": "pending", "stage_statuses": {}, "created_at": None}
        return httpx.Response(200, json={"items": [item], "next": None if cursor else "c2"})

    seen = api(page)
    code, out, _ = run(["ls", "--all", "--limit", "1", "--json"], capsys)
    assert code == 0 and [i["id"] for i in json.loads(out)["items"]] == ["first", "c2"]
    assert [r.url.params.get("limit") for r in seen] == ["1", "1"]


def test_usage_errors_exit_2_and_help_lists_the_hosts_actions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["agents", "drain"])
    assert exited.value.code == 2
    with pytest.raises(SystemExit):
        cli.main(["hosts", "--help"])
    out = capsys.readouterr().out
    assert all(action in out for action in ("add", "ls", "rm", "probe"))
    with pytest.raises(SystemExit):
        cli.main(["submit", "--help"])
    assert "3 the pipeline was cancelled" in capsys.readouterr().out.replace("\n", " ")

"""Integration: SSH hosts through the API against a real OpenSSH server (tests/plugins/ssh.py).

add (host key pinned and shown, credential checked, first probe) → list/get (never a secret) → probe
(GPUs or none, driver/CUDA, disk, verl in the trainer's Python) → remove; a wrong password and a
changed host key are clear errors; the key-rotation drill keeps every host usable and start-up fails
closed without the key (T12). The canary password and key, used throughout, are then searched for in
every API response, every log event, every database row and every process's argv: never found.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import pytest
import structlog

from tests.integration.api_app import ApiEnv, api_env, served
from tests.integration.test_cli import Result, finish, start_cli
from tests.plugins.ssh import (
    CANARY_PASSWORD,
    KEY_USER,
    PW_USER,
    SshServer,
    canary_key,
    key_canaries,
    new_sshd,
)
from verlyard_api.app import open_vault
from verlyard_shared.hosts.vault import KeyRing

pytestmark = pytest.mark.timeout(120)


def ring_text(*ids: str) -> str:
    return ",".join(f"{i}:{base64.b64encode(bytes([n + 1]) * 32).decode()}" for n, i in enumerate(ids))


class Recorder:
    """Every response body the tests saw (searched for canaries at the end)."""

    def __init__(self) -> None:
        self.bodies: list[str] = []


@pytest.fixture
async def api(pg_pool: asyncpg.Pool) -> AsyncIterator[ApiEnv]:
    async with api_env(pg_pool) as env:
        env.deps.services.key_ring = KeyRing.parse(ring_text("k1"))
        yield env


async def call(env: ApiEnv, seen: list[str], method: str, path: str, who: str = "admin", **kw: Any) -> Any:
    response = await env.client.request(method, path, headers=env.auth(who), **kw)
    seen.append(response.text)
    return response


def pw_body(server: SshServer, name: str = "box", **extra: Any) -> dict[str, Any]:
    return {"name": name, "address": f"127.0.0.1:{server.port}", "user": PW_USER, "password": CANARY_PASSWORD} | extra


def key_body(server: SshServer, name: str = "keybox", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "address": "127.0.0.1",
        "port": server.port,
        "user": KEY_USER,
        "private_key": canary_key(),
        "root": f"/tmp/verlyard-hosts-test/{name}",
    } | extra


async def database_text(pool: asyncpg.Pool) -> str:
    """Every row of every table as JSON text (bytea columns come out hex: the sealed credential stays sealed)."""
    tables = await pool.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    parts: list[str] = []
    for t in tables:
        rows = await pool.fetch(f'SELECT row_to_json(x)::text AS j FROM "{t["tablename"]}" x')
        parts.extend(r["j"] for r in rows)
    return "\n".join(parts)


def argv_text() -> str:
    out: list[str] = []
    for proc in psutil.process_iter(["cmdline"]):
        out.append(" ".join(proc.info.get("cmdline") or []))
    return "\n".join(out)


def assert_no_canary(text: str, where: str) -> None:
    assert CANARY_PASSWORD not in text, f"the canary password leaked into {where}"
    for fragment in key_canaries():
        assert fragment not in text, f"the canary private key leaked into {where}"


async def test_add_probe_list_remove_with_password_and_key(
    api: ApiEnv, sshd: SshServer, pg_pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="asyncssh")  # its own debug log included
    seen: list[str] = []
    with structlog.testing.capture_logs() as logs:
        added = await call(api, seen, "POST", "/api/v1/hosts", json=pw_body(sshd, labels={"zone": "loop"}))
        assert added.status_code == 201, added.text
        host = added.json()
        # The host key is pinned and shown; the credential is not.
        assert host["host_key_fingerprint"] == sshd.host_fingerprint
        assert host["auth"] == "password" and host["key_id"] == "k1" and host["agent"] == "ssh-box"
        assert host["state"] == "ok" and host["root"] == f"/home/{PW_USER}/.verlyard"
        probe = host["probe"]
        assert probe["ok"] is True and probe["home"] == f"/home/{PW_USER}"
        if shutil.which("nvidia-smi") is None:
            assert probe["gpus"] == [] and "no GPUs" in probe["gpu_note"]
        assert probe["disk_free_bytes"] > 0 and probe["disk_total_bytes"] >= probe["disk_free_bytes"]
        assert probe["verl_version"] is None and probe["verl_error"]  # the system python3 has no verl

        # Concurrently with a live connection, nobody's argv holds a secret.
        assert_no_canary(argv_text(), "a process's argv")

        keyed = await call(api, seen, "POST", "/api/v1/hosts", json=key_body(sshd))
        assert keyed.status_code == 201, keyed.text
        assert keyed.json()["auth"] == "key" and keyed.json()["root"] == "/tmp/verlyard-hosts-test/keybox"

        dup = await call(api, seen, "POST", "/api/v1/hosts", json=pw_body(sshd))
        assert dup.status_code == 409 and dup.json()["error"] == "host_exists"

        listed = await call(api, seen, "GET", "/api/v1/hosts", who="viewer")
        assert listed.status_code == 200
        assert [h["name"] for h in listed.json()["items"]] == ["box", "keybox"]
        assert (await call(api, seen, "GET", "/api/v1/hosts/keybox", who="viewer")).json()["user"] == KEY_USER

        probed = await call(api, seen, "POST", "/api/v1/hosts/keybox/probe", who="member")
        assert probed.status_code == 200, probed.text
        assert probed.json()["probe"]["ok"] is True and probed.json()["probed_at"] is not None

        # Roles: viewers and members cannot add or remove; viewers cannot probe.
        assert (
            await call(api, seen, "POST", "/api/v1/hosts", who="member", json=pw_body(sshd, "m"))
        ).status_code == 403
        assert (await call(api, seen, "DELETE", "/api/v1/hosts/box", who="member")).status_code == 403
        assert (await call(api, seen, "POST", "/api/v1/hosts/box/probe", who="viewer")).status_code == 403

        removed = await call(api, seen, "DELETE", "/api/v1/hosts/box")
        assert removed.status_code == 200 and removed.json() == {"name": "box", "status": "removed"}
        assert (await call(api, seen, "DELETE", "/api/v1/hosts/box")).status_code == 404
        assert (await call(api, seen, "POST", "/api/v1/hosts/box/probe")).status_code == 404

    events = await pg_pool.fetch("SELECT type, stream_id FROM events WHERE stream_id LIKE 'host-%' ORDER BY position")
    assert [(e["stream_id"], e["type"]) for e in events] == [
        ("host-box", "host.added"),
        ("host-box", "host.probed"),
        ("host-keybox", "host.added"),
        ("host-keybox", "host.probed"),
        ("host-keybox", "host.probed"),
        ("host-box", "host.removed"),
    ]
    ciphertext = await pg_pool.fetchval("SELECT secret_ciphertext FROM hosts WHERE name = 'keybox'")
    assert canary_key().encode() not in bytes(ciphertext)
    # T12: nowhere but the ciphertext.
    assert_no_canary("\n".join(seen), "an API response")
    assert_no_canary(repr(logs), "the logs")
    assert_no_canary(caplog.text, "the standard library's logs (asyncssh)")
    assert "Auth for user" in caplog.text  # the capture did see asyncssh's debug output
    assert_no_canary(await database_text(pg_pool), "the database")
    assert_no_canary(sshd.log_file.read_text(), "sshd's log")


async def test_wrong_password_and_bad_input_are_clear_errors(
    api: ApiEnv, sshd: SshServer, pg_pool: asyncpg.Pool
) -> None:
    seen: list[str] = []
    with structlog.testing.capture_logs() as logs:
        wrong = await call(
            api, seen, "POST", "/api/v1/hosts", json=pw_body(sshd) | {"password": "not-" + CANARY_PASSWORD}
        )
        assert wrong.status_code == 422, wrong.text
        assert wrong.json()["error"] == "ssh_auth_failed"
        assert "refused the credentials" in wrong.json()["detail"]
        assert f"{PW_USER}@127.0.0.1:{sshd.port}" in wrong.json()["detail"]

        closed = await call(api, seen, "POST", "/api/v1/hosts", json=pw_body(sshd) | {"address": "127.0.0.1:1"})
        assert closed.status_code == 422 and closed.json()["error"] == "host_unreachable", closed.text

        for bad in (
            {"address": "-oProxyCommand=x"},
            {"user": "root;rm"},
            {"trainer_python": "python3; rm -rf /"},
            {"password": None},
        ):
            answer = await call(api, seen, "POST", "/api/v1/hosts", json=pw_body(sshd) | bad)
            assert answer.status_code in (400, 422), (bad, answer.text)
        both = await call(api, seen, "POST", "/api/v1/hosts", json=pw_body(sshd) | {"private_key": canary_key()})
        assert both.status_code == 422 and "exactly one" in both.json()["detail"]
        bad_name = await call(api, seen, "POST", "/api/v1/hosts", json=pw_body(sshd, "Bad_Name"))
        assert bad_name.status_code == 400
        garbage_key = await call(api, seen, "POST", "/api/v1/hosts", json=key_body(sshd) | {"private_key": "nope"})
        assert garbage_key.status_code == 422 and garbage_key.json()["error"] == "invalid_credential"

        expected = await call(
            api, seen, "POST", "/api/v1/hosts", json=pw_body(sshd, host_key_fingerprint="SHA256:AAAA")
        )
        assert expected.status_code == 409 and expected.json()["error"] == "host_key_changed"

    assert await pg_pool.fetchval("SELECT count(*) FROM hosts") == 0
    assert await pg_pool.fetchval("SELECT count(*) FROM events WHERE stream_id LIKE 'host-%'") == 0
    assert_no_canary("\n".join(seen), "an API response")
    assert_no_canary(repr(logs), "the logs")


async def test_changed_host_key_is_refused(api: ApiEnv, sshd_factory: list[SshServer], pg_pool: asyncpg.Pool) -> None:
    server = new_sshd(sshd_factory)
    seen: list[str] = []
    added = await call(api, seen, "POST", "/api/v1/hosts", json=key_body(server, "moved"))
    assert added.status_code == 201, added.text
    pinned = added.json()["host_key_fingerprint"]
    assert pinned == server.host_fingerprint

    await asyncio.to_thread(server.new_host_key)
    assert server.host_fingerprint != pinned
    refused = await call(api, seen, "POST", "/api/v1/hosts/moved/probe")
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "host_key_changed"
    assert "differs from the one pinned" in refused.json()["detail"]
    # The failed probe is recorded; the pinned key is unchanged.
    row = await pg_pool.fetchrow("SELECT host_key_fingerprint, last_probe FROM hosts WHERE name = 'moved'")
    assert row["host_key_fingerprint"] == pinned
    assert '"ok": false' in row["last_probe"]
    listed = (await call(api, seen, "GET", "/api/v1/hosts")).json()["items"]
    assert listed[0]["state"] == "unreachable"


async def test_key_rotation_drill_and_fail_closed_start(api: ApiEnv, sshd: SshServer, pg_pool: asyncpg.Pool) -> None:
    seen: list[str] = []
    svc = api.deps.services
    # No key configured: hosts cannot be added, and nothing is stored.
    svc.key_ring = None
    none = await call(api, seen, "POST", "/api/v1/hosts", json=pw_body(sshd))
    assert none.status_code == 409 and none.json()["error"] == "secret_key_missing"
    assert await open_vault(pg_pool, None) is None  # no hosts: starting without a key is fine

    svc.key_ring = KeyRing.parse(ring_text("k1"))
    for body in (pw_body(sshd, "a"), key_body(sshd, "b")):
        assert (await call(api, seen, "POST", "/api/v1/hosts", json=body)).status_code == 201

    # Start-up fails closed: hosts exist and no key, or a key id the ring lacks.
    with pytest.raises(SystemExit, match="VERLYARD_SECRET_KEY is not set"):
        await open_vault(pg_pool, None)
    with pytest.raises(SystemExit, match="k1"):
        await open_vault(pg_pool, ring_text("k9"))
    with pytest.raises(SystemExit, match="VERLYARD_SECRET_KEY"):
        await open_vault(pg_pool, "k1:not-base64!")

    # Rotation: the new key first, the old one still there to open; re-seal; then drop the old key.
    two = ",".join([ring_text("k2", "x").split(",")[0].replace("AQEB", "AgIC"), ring_text("k1")])
    svc.key_ring = KeyRing.parse(two)
    assert (await open_vault(pg_pool, two)) is not None
    rotated = await call(api, seen, "POST", "/api/v1/admin/hosts/rotate-key")
    assert rotated.status_code == 200, rotated.text
    assert rotated.json() == {"key_id": "k2", "resealed": 2, "already_current": 0}
    assert (await call(api, seen, "POST", "/api/v1/admin/hosts/rotate-key", who="member")).status_code == 403
    only_new = two.split(",")[0]
    svc.key_ring = KeyRing.parse(only_new)
    await open_vault(pg_pool, only_new)
    for name in ("a", "b"):
        probed = await call(api, seen, "POST", f"/api/v1/hosts/{name}/probe")
        assert probed.status_code == 200 and probed.json()["key_id"] == "k2", probed.text
    again = await call(api, seen, "POST", "/api/v1/admin/hosts/rotate-key")
    assert again.json() == {"key_id": "k2", "resealed": 0, "already_current": 2}
    # The old key alone no longer opens them.
    svc.key_ring = KeyRing.parse(ring_text("k1"))
    stale = await call(api, seen, "POST", "/api/v1/hosts/a/probe")
    assert stale.status_code == 409 and stale.json()["error"] == "secret_key_mismatch"
    assert_no_canary("\n".join(seen), "an API response")
    assert_no_canary(await database_text(pg_pool), "the database")


async def test_probe_finds_verl_in_the_trainer_python(api: ApiEnv, sshd: SshServer, trainer_python: str) -> None:
    seen: list[str] = []
    added = await call(
        api, seen, "POST", "/api/v1/hosts", json=key_body(sshd, "trainer", trainer_python=trainer_python)
    )
    assert added.status_code == 201, added.text
    probe = added.json()["probe"]
    assert probe["verl_version"] == "0.9.1", probe
    assert probe["verl_error"] is None and probe["trainer_python"] == trainer_python


async def test_the_cli_adds_lists_probes_rotates_and_removes(
    api: ApiEnv, sshd: SshServer, pg_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    """`verlyard hosts ...` as a user types it: the password from stdin, the key from a file (mode 0600),
    the pinned fingerprint printed; nothing secret in its output or its argv."""
    key_file = tmp_path / "id_ed25519"
    key_file.write_text(canary_key())
    key_file.chmod(0o600)
    async with served(api.app) as url:

        async def cli(*argv: str, stdin: bytes | None = None) -> Result:
            return await finish(await start_cli(url, api.tokens["admin"], tmp_path, *argv, stdin=stdin), stdin)

        added = await cli(
            "hosts",
            "add",
            "pwbox",
            "--address",
            f"127.0.0.1:{sshd.port}",
            "--user",
            PW_USER,
            "--password-stdin",
            stdin=CANARY_PASSWORD.encode() + b"\n",
        )
        assert added.code == 0, added.err
        assert f"added host pwbox (host key {sshd.host_fingerprint} pinned)" in added.out
        assert "GPUs: none" in added.out and "disk:" in added.out
        keyed = await cli(
            "hosts",
            "add",
            "keybox",
            "--address",
            f"127.0.0.1:{sshd.port}",
            "--user",
            KEY_USER,
            "--key",
            str(key_file),
            "--root",
            "/tmp/verlyard-hosts-test/cli",
            "--label",
            "zone=loop",
            "--json",
        )
        assert keyed.code == 0, keyed.err
        assert json.loads(keyed.out)["labels"] == {"zone": "loop"}
        listed = await cli("hosts", "ls")
        assert listed.code == 0 and listed.out.split()[:6] == ["NAME", "ADDRESS", "USER", "STATE", "GPUS", "HOST"]
        assert "keybox" in listed.out and "pwbox" in listed.out and sshd.host_fingerprint in listed.out
        probed = await cli("hosts", "probe", "pwbox")
        assert probed.code == 0 and f"host pwbox: {PW_USER}@127.0.0.1:{sshd.port}" in probed.out
        rotated = await cli("hosts", "rotate-key")
        assert rotated.code == 0 and "credentials sealed with key k1: 0 re-encrypted, 2 already current" in rotated.out
        wrong = await cli(
            "hosts",
            "add",
            "bad",
            "--address",
            f"127.0.0.1:{sshd.port}",
            "--user",
            PW_USER,
            "--password-stdin",
            stdin=b"not-the-password\n",
        )
        assert wrong.code == 2 and "refused the credentials" in wrong.err and "not-the-password" not in wrong.err
        removed = await cli("hosts", "rm", "pwbox")
        assert removed.code == 0 and removed.out == "removed host pwbox\n"
        for result in (added, keyed, listed, probed, rotated, wrong, removed):
            assert_no_canary(result.out + result.err, "the CLI's output")

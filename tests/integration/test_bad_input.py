"""Bad input everywhere (reliability, issue 9): hostile pipeline specs (deep nesting, huge, cycles, unicode,
YAML bombs and aliases, tags, wrong types), oversized bodies, hostile dataset files, invalid tokens and
forged agent reports. Each gets a clear error (4xx with the JSON error shape, or an audited rejection)
and changes nothing stored: the `events` count (and the read models) are the same afterwards."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from nats.js import JetStreamContext

from tests.integration.api_app import ApiEnv, api_env
from verlyard_api.adapters.dataset_store import DatasetStore
from verlyard_shared import codec
from verlyard_shared.events import AttemptStarted, ReportRejected, StageSucceeded
from verlyard_shared.ids import new_id
from verlyard_shared.reports import AttemptAcceptedReport, AttemptFinishedReport, CheckpointReport
from verlyard_shared.store.postgres import PostgresEventStore
from verlyard_shared.subjects import report_subject

from .fake_agent import FakeAgent
from .scheduler_kit import history, scheduler, submit, until


@pytest.fixture
async def api(pg_pool: asyncpg.Pool, js: JetStreamContext, tmp_path: Path) -> AsyncIterator[ApiEnv]:
    async with api_env(pg_pool) as env:
        env.deps.services.datasets = DatasetStore(tmp_path / "datasets", js=js)
        env.deps.services.max_dataset_bytes = 64 * 1024
        yield env


async def stored(pool: asyncpg.Pool) -> tuple[int, int, int, int]:
    """What a bad request must not change: events, pipelines, stages, token secrets."""
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM pipelines),"
            " (SELECT count(*) FROM stages), (SELECT count(*) FROM token_secrets)"
        )
    assert row is not None
    return (row[0], row[1], row[2], row[3])


def assert_error(response: Any, *statuses: int, case: str = "") -> dict[str, Any]:
    assert response.status_code in statuses, f"{case}: {response.status_code}: {response.text[:500]}"
    body: dict[str, Any] = response.json()
    assert isinstance(body.get("error"), str) and body["error"], (case, body)
    assert isinstance(body.get("detail"), str) and body["detail"], (case, body)
    assert "Traceback" not in response.text, case
    return body


def _nested_yaml(depth: int) -> str:
    return "name: deep\nstages:\n  a:\n    kind: noop\n    with:\n      x: " + "[" * depth + "]" * depth + "\n"


def _nested_json(depth: int) -> str:
    inner = "[" * depth + "]" * depth
    return '{"name": "deep", "stages": {"a": {"kind": "noop", "with": {"x": ' + inner + "}}}}"


BILLION_LAUGHS = """\
name: lol
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
stages:
  a:
    kind: noop
    with: {bomb: *h}
"""

YAML_SPECS: dict[str, str] = {
    "deep nesting": _nested_yaml(5000),
    "billion laughs": BILLION_LAUGHS,
    "recursive alias": "name: r\nstages: &s\n  a:\n    kind: noop\n    with: *s\n",
    "python tag": "name: t\nstages:\n  a:\n    kind: !!python/object/apply:os.system ['touch /tmp/pwned']\n",
    "unknown tag": "name: t\nstages:\n  a: !include /etc/passwd\n",
    "cycle": (
        "name: c\nstages:\n  a: {kind: noop, needs: [b]}\n"
        "  b: {kind: noop, needs: [c]}\n  c: {kind: noop, needs: [a]}\n"
    ),
    "self dependency": "name: c\nstages:\n  a: {kind: noop, needs: [a]}\n",
    "duplicate keys": "name: d\nstages:\n  a: {kind: noop}\n  a: {kind: command, with: {run: [rm, -rf, /]}}\n",
    "stages as a list": "name: w\nstages:\n  - kind: noop\n",
    "kind as a number": "name: w\nstages:\n  a: {kind: 7}\n",
    "negative timeout": "name: w\nstages:\n  a: {kind: noop, timeout: -5s}\n",
    "huge retry": "name: w\nstages:\n  a: {kind: noop, retry: {max_attempts: 99999999999999999999999}}\n",
    "float overflow priority": "name: w\npriority: 1e999\nstages:\n  a: {kind: noop}\n",
    "null stages": "name: w\nstages:\n",
    "not a mapping": "- just\n- a\n- list\n",
    "a bare string": "hello\n",
    "rtl override in a stage name": 'name: u\nstages:\n  "pre\u202epx": {kind: noop}\n',
    "zero-width space in the name": 'name: "tra\u200bin"\nstages:\n  a: {kind: noop}\n',
    "fullwidth letters in a stage name": "name: u\nstages:\n  \uff50\uff52\uff45\uff50: {kind: noop}\n",
    "NUL in the name": 'name: "a\\0b"\nstages:\n  a: {kind: noop}\n',
    "NUL in a param value": 'name: n\nstages:\n  a: {kind: noop, with: {x: "a\\0b"}}\n',
    "NUL in a param key": 'name: n\nstages:\n  a: {kind: noop, with: {"a\\0b": 1}}\n',
    "NUL in a label": 'name: n\nlabels: {team: "a\\0b"}\nstages:\n  a: {kind: noop}\n',
    "NUL in a command argument": 'name: n\nstages:\n  a: {kind: command, with: {run: [echo, "a\\0b"]}}\n',
    "emoji pipeline name": "name: \U0001f680\nstages:\n  a: {kind: noop}\n",
    "path traversal stage name": 'name: p\nstages:\n  "../../etc": {kind: noop}\n',
    "command as a shell string": "name: s\nstages:\n  a: {kind: command, with: {run: 'rm -rf / ; echo'}}\n",
    "too many stages": "name: many\nstages:\n" + "".join(f"  s{i}: {{kind: noop}}\n" for i in range(1500)),
    "huge": "name: huge\nstages:\n  a:\n    kind: noop\n    with:\n      blob: " + "x" * (1024 * 1024 + 10) + "\n",
}

JSON_BODIES: dict[str, str] = {
    "deep nesting": _nested_json(5000),
    "NaN": '{"name": "n", "priority": NaN, "stages": {"a": {"kind": "noop"}}}',
    "Infinity": '{"name": "n", "stages": {"a": {"kind": "noop", "timeout": Infinity}}}',
    "huge integer": '{"name": "n", "priority": ' + "9" * 5000 + ', "stages": {"a": {"kind": "noop"}}}',
    "lone surrogate": '{"name": "\\ud800", "stages": {"a": {"kind": "noop"}}}',
    "stages as a string": '{"name": "n", "stages": "a"}',
    "array at the top": '[{"name": "n"}]',
    "trailing garbage": '{"name": "n", "stages": {"a": {"kind": "noop"}}} xx',
    "invalid utf-8": '{"name": "\xff\xfe", "stages": {}}',
    "NUL escape in a param": '{"name": "n", "stages": {"a": {"kind": "noop", "with": {"x": "\\u0000"}}}}',
}


async def test_hostile_yaml_specs_are_refused_and_store_nothing(api: ApiEnv, pg_pool: asyncpg.Pool) -> None:
    before = await stored(pg_pool)
    for name, text in YAML_SPECS.items():
        response = await api.client.post(
            "/api/v1/pipelines",
            content=text.encode("utf-8", "surrogatepass"),
            headers=api.auth("member") | {"Content-Type": "application/yaml"},
        )
        body = assert_error(response, 400, 413, 422, case=name)
        assert body["error"] in ("invalid_body", "invalid_spec", "too_large"), (name, body)
        assert await stored(pg_pool) == before, name
    assert not await asyncio.to_thread(os.path.exists, "/tmp/pwned")


async def test_hostile_json_bodies_are_refused_and_store_nothing(api: ApiEnv, pg_pool: asyncpg.Pool) -> None:
    before = await stored(pg_pool)
    for name, text in JSON_BODIES.items():
        raw = text.encode("latin-1") if name == "invalid utf-8" else text.encode()
        response = await api.client.post(
            "/api/v1/pipelines", content=raw, headers=api.auth("member") | {"Content-Type": "application/json"}
        )
        assert_error(response, 400, 413, 422, case=name)
        assert await stored(pg_pool) == before, name


OVERSIZED_TARGETS = [
    ("/api/v1/pipelines", "application/json"),
    ("/api/v1/pipelines", "application/yaml"),
    ("/api/v1/tokens", "application/json"),
    ("/api/v1/pipelines/00000000-0000-0000-0000-000000000000/cancel", "application/json"),
]


async def test_oversized_bodies_are_413_and_store_nothing(api: ApiEnv, pg_pool: asyncpg.Pool) -> None:
    before = await stored(pg_pool)
    big = b'{"name": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    for path, content_type in OVERSIZED_TARGETS:
        response = await api.client.post(path, content=big, headers=api.auth("admin") | {"Content-Type": content_type})
        assert_error(response, 413, case=path)
        assert await stored(pg_pool) == before, path


async def test_a_valid_spec_is_still_accepted(api: ApiEnv, pg_pool: asyncpg.Pool) -> None:
    """The control: the same client and headers store a good spec (so the refusals above are about input)."""
    before = await stored(pg_pool)
    await api.submit({"name": "fine", "stages": {"a": {"kind": "noop"}}})
    after = await stored(pg_pool)
    assert after[0] == before[0] + 1 and after[1] == before[1] + 1


# ---- datasets --------------------------------------------------------------------------------------------


def _upload_headers(api: ApiEnv) -> dict[str, str]:
    return api.auth("member") | {"Content-Type": "application/octet-stream"}


HOSTILE_DATASET_QUERIES = [
    "name=../../etc/passwd",
    "name=%2e%2e",
    "name=a%00b",
    "name=" + "n" * 300,
    "name=sales%E2%80%AEtxt",
    "name=ok&filename=a%00.jsonl",
    "name=ok&filename=a%1b%5b31m.jsonl",
    "",
]


async def test_hostile_dataset_names_are_refused_and_store_nothing(
    api: ApiEnv, pg_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    before = await stored(pg_pool)
    for query in HOSTILE_DATASET_QUERIES:
        response = await api.client.post(
            f"/api/v1/datasets?{query}", content=b'{"a": 1}\n', headers=_upload_headers(api)
        )
        assert_error(response, 400, 422, case=query)
        assert await stored(pg_pool) == before, query
    folder = tmp_path / "datasets"
    assert not folder.exists() or all(p.name in (".incoming",) for p in folder.iterdir())


async def test_a_dataset_filename_is_reduced_to_its_last_component(api: ApiEnv) -> None:
    response = await api.client.post(
        "/api/v1/datasets?name=ok&filename=../../../etc/shadow.jsonl",
        content=b'{"a": 1}\n',
        headers=_upload_headers(api),
    )
    assert response.status_code == 201, response.text
    assert response.json()["filename"] == "shadow.jsonl"


async def test_an_oversized_dataset_is_413_and_leaves_no_file(
    api: ApiEnv, pg_pool: asyncpg.Pool, tmp_path: Path
) -> None:
    before = await stored(pg_pool)
    response = await api.client.post(
        "/api/v1/datasets?name=big", content=b"x" * (65 * 1024), headers=_upload_headers(api)
    )
    assert_error(response, 413)
    assert await stored(pg_pool) == before
    incoming = tmp_path / "datasets" / ".incoming"
    assert not incoming.exists() or not list(incoming.iterdir())


HOSTILE_FILES: dict[str, tuple[str, bytes]] = {
    "json bomb": ("bomb.json", b"[" * 200_000 + b"]" * 200_000),
    "deep jsonl line": ("deep.jsonl", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"),
    "invalid utf-8": ("bad.jsonl", b'{"prompt": "\xff\xfe\xfd"}\n' * 10),
    "NUL bytes": ("nul.jsonl", b"\x00" * 4096),
    "one huge line": ("line.jsonl", b'{"prompt": "' + b"y" * 60_000 + b'"}\n'),
    "csv with a quote bomb": ("q.csv", b'a,b\n"' + b'""' * 20_000 + b"\n"),
    "binary as parquet": ("x.parquet", b"PAR1" + bytes(range(256)) * 10),
    "empty": ("empty.jsonl", b""),
}


async def test_hostile_dataset_files_never_break_the_api(api: ApiEnv, pg_pool: asyncpg.Pool) -> None:
    """Content is the agent's to validate (dataprep); the API stores bytes by sha256 and its preview
    says what is wrong instead of failing: either a clear 4xx and nothing stored, or 201 and a preview."""
    for i, (name, (filename, content)) in enumerate(HOSTILE_FILES.items()):
        before = await stored(pg_pool)
        response = await api.client.post(
            f"/api/v1/datasets?name=hostile_{i}&filename={filename}", content=content, headers=_upload_headers(api)
        )
        if response.status_code >= 400:
            assert_error(response, 400, 413, 422, case=name)
            assert await stored(pg_pool) == before, name
            continue
        assert response.status_code == 201, (name, response.text)
        shown = await api.client.get(f"/api/v1/datasets/{response.json()['id']}", headers=api.auth("viewer"))
        assert shown.status_code == 200, (name, shown.text)
        assert "preview" in shown.json(), name


# ---- tokens ----------------------------------------------------------------------------------------------


INVALID_AUTHORIZATIONS = [
    b"",
    b"Bearer",
    b"Bearer ",
    b"Basic YWRtaW46YWRtaW4=",
    b"Bearer vy_" + b"A" * 64,
    b"Bearer " + b"x" * 100_000,
    b"Bearer \xe2\x98\x83\xe2\x98\x83",
    b"Bearer a b c",
    b"Bearer ../../etc/passwd",
    b"bearer' OR '1'='1",
    b"Bearer \x00\x01",
]


async def test_invalid_tokens_are_401_and_store_nothing(api: ApiEnv, pg_pool: asyncpg.Pool) -> None:
    before = await stored(pg_pool)
    for authorization in INVALID_AUTHORIZATIONS:
        headers = [(b"authorization", authorization), (b"content-type", b"application/json")]
        response = await api.client.post(
            "/api/v1/pipelines",
            content=json.dumps({"name": "x", "stages": {"a": {"kind": "noop"}}}).encode(),
            headers=headers,
        )
        case = authorization[:40].decode("latin-1")
        body = assert_error(response, 400, 401, case=case)
        if response.status_code == 401:
            assert response.headers["WWW-Authenticate"].startswith("Bearer"), case
            assert body["error"] == "unauthorized", case
        assert await stored(pg_pool) == before, case


async def test_a_viewer_token_cannot_write(api: ApiEnv, pg_pool: asyncpg.Pool) -> None:
    before = await stored(pg_pool)
    response = await api.client.post(
        "/api/v1/pipelines", json={"name": "x", "stages": {"a": {"kind": "noop"}}}, headers=api.auth("viewer")
    )
    assert_error(response, 403)
    response = await api.client.post("/api/v1/tokens", json={"role": "admin"}, headers=api.auth("member"))
    assert_error(response, 403)
    assert await stored(pg_pool) == before


# ---- forged agent reports --------------------------------------------------------------------------------


def _header(agent: str, pid: str, stage: str, attempt: str) -> dict[str, Any]:
    return {
        "report_id": new_id(),
        "agent": agent,
        "sent_at": datetime.now(UTC),
        "pipeline_id": pid,
        "stage": stage,
        "attempt": attempt,
    }


async def test_forged_agent_reports_are_rejected_and_change_nothing(
    pg_url: str, pg_store: PostgresEventStore, nats_url: str, js: JetStreamContext
) -> None:
    """Unknown attempt, another agent's attempt, a body naming another agent than its subject, an unknown
    pipeline, a replayed report: the stage stays on its one running attempt; the only thing written is
    the audit trail (`report.rejected`) for reports about a known pipeline."""
    agent = await FakeAgent(nats_url, "a0", heartbeat_s=0.2).start()
    agent.hang.add("train")
    try:
        async with scheduler(pg_url, nats_url, lease_s=5.0, reconcile_s=0.5):
            pid = await submit(pg_store, {"train": {}})

            async def running() -> str | None:
                for e in await history(pg_store, pid):
                    if isinstance(e.event, AttemptStarted):
                        return e.event.attempt
                return None

            await until(running, timeout=10, what="the attempt to start")
            attempt = await running()
            assert attempt is not None
            base = [e for e in await history(pg_store, pid) if not isinstance(e.event, ReportRejected)]

            async def publish(subject_agent: str, report: Any, msg_id: str | None = None) -> None:
                await js.publish(
                    report_subject(subject_agent, "finished" if isinstance(report, AttemptFinishedReport) else "x"),
                    codec.encode(report),
                    headers={"Nats-Msg-Id": msg_id or report.report_id},
                )

            forged_unknown = AttemptFinishedReport(**_header("a0", pid, "train", "not-an-attempt"), outcome="succeeded")
            other_agent = AttemptFinishedReport(**_header("a1", pid, "train", attempt), outcome="succeeded")
            wrong_subject = AttemptFinishedReport(**_header("a1", pid, "train", attempt), outcome="succeeded")
            unknown_pipeline = AttemptFinishedReport(
                **_header("a0", "0190a000-0000-7000-8000-00000000dead", "train", attempt), outcome="succeeded"
            )
            unknown_stage = CheckpointReport(**_header("a0", pid, "nope", attempt), step=1, path="/x")
            replayed = AttemptAcceptedReport(**_header("a0", pid, "train", attempt))
            await publish("a0", forged_unknown)
            await publish("a1", other_agent)
            await publish("a0", wrong_subject)  # body says a1, subject says a0: terminated at the edge
            await publish("a0", unknown_pipeline)
            await publish("a0", unknown_stage)
            await publish("a0", replayed)
            await publish("a0", replayed, msg_id=new_id())  # the same report again past Msg-Id dedupe

            async def audited() -> int:
                return sum(isinstance(e.event, ReportRejected) for e in await history(pg_store, pid))

            await until(lambda: _at_least(audited, 3), timeout=10, what="the forged reports to be audited")

            async def settled() -> bool:
                info = await js.consumer_info("VY_REPORTS", "scheduler-reports")
                return info.num_pending == 0 and info.num_ack_pending == 0

            await until(settled, timeout=10, what="every forged report settled (none redelivered)")
            log = await history(pg_store, pid)
            rejected = [e.event for e in log if isinstance(e.event, ReportRejected)]
            assert {r.attempt for r in rejected} == {"not-an-attempt", attempt}, rejected
            assert {r.agent for r in rejected} == {"a0", "a1"}
            assert all(r.reason for r in rejected)
            rest = [e for e in log if not isinstance(e.event, ReportRejected)]
            # Nothing but the audit trail was written: the stage is still on its one running attempt.
            assert [e.event for e in rest] == [e.event for e in base], [type(e.event).__name__ for e in rest]
            assert not any(isinstance(e.event, StageSucceeded) for e in log)
            ghost = await pg_store.read_stream("pipeline-0190a000-0000-7000-8000-00000000dead")
            assert list(ghost) == []
    finally:
        await agent.stop()


async def _at_least(count: Any, n: int) -> bool:
    return bool(await count() >= n)

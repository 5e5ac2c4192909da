"""Integration (T10): schemathesis over the API's own OpenAPI document (`/schema/openapi.json`) with every
check, against the real app served by uvicorn on a real Postgres: with an admin token, 0 server errors and
0 schema violations (status codes, content types, headers, bodies, negative data rejected); without a
token, 0 2xx on every protected route.

The app, its pool and uvicorn run on an event loop in a background thread, because schemathesis calls the
API synchronously (requests) from the test's thread. The database is seeded (pipelines, attempts, metrics,
logs, an agent, a dataset) and path parameters draw the seeded ids half of the time, so the success
responses are checked against the schema too, not only the 404s of random ids.

Streaming: `/stream` is fuzzed like the rest (schemathesis reads a few messages of an event stream, then
stops); the SSE twins of events and logs (`follow=true`) stay open while there is something to wait for,
so the fuzzed document leaves `follow` out and `test_followers_stream_documented_events` checks those twins'
events against the document with chosen cases.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

import asyncssh
import msgspec
import pytest
import requests
import schemathesis
from schemathesis.core.failures import Failure
from schemathesis.engine import Status, events, from_schema
from schemathesis.schemas import BaseSchema

from tests.integration.api_app import ApiEnv, api_env, served
from tests.integration.telemetry_kit import placed
from verlyard_api.adapters.dataset_store import DatasetStore
from verlyard_api.adapters.pg_telemetry import store_logs, store_metrics
from verlyard_api.telemetry import LogRow, MetricRow
from verlyard_shared.embedded.nats import EmbeddedNats
from verlyard_shared.embedded.postgres import EmbeddedPostgres
from verlyard_shared.envelope import Metadata, NewEvent
from verlyard_shared.events import AgentRegistered, AttemptStarted, GpuInfo, StageSucceeded
from verlyard_shared.hosts.probe import ProbeResult
from verlyard_shared.hosts.ssh import HostKey, HostKeyChanged, SshClient, Target
from verlyard_shared.hosts.vault import Credential, KeyRing
from verlyard_shared.ids import agent_stream, new_id
from verlyard_shared.nats_topology import connect_nats
from verlyard_shared.store.migrate import migrate
from verlyard_shared.store.port import ANY
from verlyard_shared.store.postgres import connect_pool

T = TypeVar("T")

SEED: Final = 20_240_510
"""One seed for every operation (schemathesis mixes in the operation's name): the same cases every run."""
MAX_EXAMPLES: Final = 15
"""Fuzzed cases per operation and generation mode with a token, on top of the deterministic coverage cases."""
MAX_EXAMPLES_WITHOUT_TOKEN: Final = 8
"""Without a token every case ends at the authentication middleware: fewer show the same."""
REQUEST_TIMEOUT_S: Final = 20.0
"""A response that hangs fails its case instead of the whole run."""
STREAM_TIMEOUT_S: Final = 1.5
"""How long a live stream is read when fewer than `max-stream-events` messages come."""
ACCEPTED: Final = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]
"""schemathesis's default statuses for valid data (5xx stays a failure: `not_a_server_error` checks it)."""
PUBLIC_PATHS: Final = frozenset({"/healthz"})


@dataclass
class LiveApi:
    """The served app: its base URL, one token per role, and the ids of the seeded resources."""

    url: str
    env: ApiEnv
    seeded: dict[str, list[str]] = field(default_factory=dict)

    def auth(self, role: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.env.tokens[role]}"}


class _LoopThread:
    """An event loop in a daemon thread; `run` executes a coroutine there and waits for its result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="schemathesis-api", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


async def _seed(env: ApiEnv) -> dict[str, list[str]]:
    """A running pipeline (prep succeeded, train running with 80 metric points and 30 log lines), an agent, a
    dataset: the ids path parameters draw from."""
    ctx = env.ctx
    running = (await env.submit())["id"]
    await env.scheduler(
        running,
        placed(running, "prep", "a-prep", 1),
        AttemptStarted(pipeline_id=running, stage="prep", attempt="a-prep", agent="g1"),
        StageSucceeded(pipeline_id=running, stage="prep", attempt="a-prep", outputs={"rows": 10}),
        placed(running, "train", "a-train", 1),
        AttemptStarted(pipeline_id=running, stage="train", attempt="a-train", agent="g1"),
    )
    now = datetime.now(UTC)
    await store_metrics(
        ctx.pool,
        [
            MetricRow(pipeline_id=running, stage="train", attempt="a-train", step=s, key=k, value=v, recorded_at=now)
            for s in range(1, 41)
            for k, v in (("loss", 4.0 - s / 20), ("lr", 1e-5))
        ],
    )
    await store_logs(
        ctx.pool,
        [
            LogRow(
                pipeline_id=running,
                stage="train",
                attempt="a-train",
                offset=i,
                stream="stdout",
                text=f"step {i} loss {4.0 - i / 20}",
                recorded_at=now,
            )
            for i in range(30)
        ],
    )
    await ctx.store.append(
        agent_stream("g1"),
        ANY,
        [
            NewEvent(
                event_id=new_id(),
                event=AgentRegistered(
                    agent="g1", hostname="gpu-1", gpus=(GpuInfo(index=0, name="NVIDIA H100"),), cpu_slots=8
                ),
            )
        ],
        Metadata(actor="scheduler", correlation_id=new_id()),
    )
    rows = b"".join(msgspec.json.encode({"prompt": f"q{i}", "answer": f"a{i}"}) + b"\n" for i in range(20))
    response = await env.client.post(
        "/api/v1/datasets?name=sales_sft&filename=sales.jsonl",
        content=rows,
        headers=env.auth("member") | {"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text
    dataset = response.json()
    # SSH hosts, added through the API with a fake SSH client (no host is reached): several, because the
    # fuzzed DELETE removes some before the fuzzed probes run.
    hosts = [f"box{i}" for i in range(8)]
    for name in hosts:
        added = await env.client.post(
            "/api/v1/hosts",
            json={"name": name, "address": "gpu.example.com", "user": "ml", "password": "pw"},
            headers=env.auth("admin"),
        )
        assert added.status_code == 201, added.text
    return {
        "pipelines": [running],
        "stages": ["train", "prep"],
        "agents": ["g1"],
        "datasets": [dataset["id"], dataset["name"]],
        "hosts": hosts,
    }


_FAKE_HOST_KEY = asyncssh.generate_private_key("ssh-ed25519")


class FakeSsh(SshClient):
    """Reaches no host: every host answers with the same key and a GPU-less probe."""

    async def first_contact(
        self, target: Target, credential: Credential, *, trainer_python: str, expect_fingerprint: str | None = None
    ) -> tuple[HostKey, ProbeResult]:
        key = HostKey(
            openssh=_FAKE_HOST_KEY.export_public_key("openssh").decode().strip(),
            fingerprint=_FAKE_HOST_KEY.get_fingerprint("sha256"),
        )
        if expect_fingerprint is not None and expect_fingerprint != key.fingerprint:
            raise HostKeyChanged(f"host {target.name} presented {key.fingerprint}")
        return key, await self.probe(target, credential, trainer_python=trainer_python)

    async def probe(self, target: Target, credential: Credential, *, trainer_python: str) -> ProbeResult:
        return ProbeResult(ok=True, home="/home/ml", gpu_note="nvidia-smi is not installed: no GPUs")


@pytest.fixture(scope="module")
def live_api(
    pg_server: EmbeddedPostgres, nats_server: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveApi]:
    name = f"schemathesis_{secrets.token_hex(4)}"
    url = pg_server.create_database(name)
    thread = _LoopThread()
    stack = contextlib.AsyncExitStack()
    try:
        pool = thread.run(connect_pool(url, min_size=1, max_size=10))
        stack.push_async_callback(pool.close)
        thread.run(migrate(pool))
        env = thread.run(stack.enter_async_context(api_env(pool)))
        env.deps.services.datasets = DatasetStore(Path(tmp_path_factory.mktemp("datasets")))
        env.deps.services.key_ring = KeyRing.parse("k1:" + base64.b64encode(bytes(32)).decode())
        env.deps.services.ssh = FakeSsh()
        # Connected, so /readyz is ready (200) rather than a 503 that would count as a server error.
        nc = thread.run(connect_nats(nats_server.authed_url, name="schemathesis-api"))
        stack.push_async_callback(nc.close)
        env.deps.nc = nc
        seeded = thread.run(_seed(env))
        base = thread.run(stack.enter_async_context(served(env.app)))
        yield LiveApi(url=base, env=env, seeded=seeded)
    finally:
        with contextlib.suppress(Exception):
            thread.run(stack.aclose(), timeout=30)
        thread.close()
        pg_server.drop_database(name)


def _config(
    live: LiveApi, headers: dict[str, str], extra: dict[str, Any] | None = None, *, examples: int = MAX_EXAMPLES
) -> schemathesis.Config:
    bind = {"probability": 0.5}
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "base-url": live.url,
            "headers": headers,
            "request-timeout": REQUEST_TIMEOUT_S,
            "continue-on-failure": True,
            "workers": 1,
            "dictionaries": {name: {"values": values} for name, values in live.seeded.items()},
            "parameters": {
                "path.pipeline_id": bind | {"dictionary": "pipelines"},
                "path.stage": bind | {"dictionary": "stages"},
                "path.agent_id": bind | {"dictionary": "agents"},
                "path.ref": bind | {"dictionary": "datasets"},
                "path.name": bind | {"dictionary": "hosts"},
            },
            "generation": {"max-examples": examples, "database": "none"},
            "operations": [
                # A JSON Schema cannot say what a valid YAML spec is, nor the spec's cross-field rules (needs
                # name existing stages, no cycles, kind-specific `with`): the server's 400/422 name the issue.
                {
                    "include-path": ["/api/v1/pipelines"],
                    "include-method": ["POST"],
                    "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "400", "422"]}},
                },
                # The dataset's name comes from `name`, else `filename`, else Content-Disposition: a rule across
                # parameters (422 when none gives a valid name).
                {
                    "include-path": ["/api/v1/datasets"],
                    "include-method": ["POST"],
                    "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "422"]}},
                },
                # A host's address, user, program and folder have rules a JSON Schema pattern does not carry
                # whole (422 names the field); a name already registered is 409.
                {
                    "include-path": ["/api/v1/hosts"],
                    "include-method": ["POST"],
                    "checks": {"positive_data_acceptance": {"expected-statuses": [*ACCEPTED, "409", "422"]}},
                },
                # A live stream with nothing new to send stays open: read a few messages, then stop.
                {
                    "include-path-regex": "/stream$",
                    "max-stream-events": 3,
                    "request-timeout": STREAM_TIMEOUT_S,
                },
            ],
            **(extra or {}),
        }
    )


def _served_document(live: LiveApi) -> dict[str, Any]:
    """The app's own OpenAPI document: /schema/openapi.json needs a token of any role."""
    response = requests.get(f"{live.url}/schema/openapi.json", headers=live.auth("viewer"), timeout=10)
    response.raise_for_status()
    document: dict[str, Any] = response.json()
    return document


def _without_follow(document: dict[str, Any]) -> dict[str, Any]:
    """The document with `follow` taken out of the routes that have an SSE twin: a follower stays open while
    there is something to wait for (the attempt, new events), so fuzzing it would mostly measure timeouts;
    `test_followers_stream_documented_events` checks those twins with chosen cases instead."""
    followed = 0
    for item in document["paths"].values():
        for operation in item.values():
            if not isinstance(operation, dict) or "parameters" not in operation:
                continue
            kept = [p for p in operation["parameters"] if not (p["in"] == "query" and p["name"] == "follow")]
            followed += len(operation["parameters"]) - len(kept)
            operation["parameters"] = kept
    assert followed == 2, followed  # events and logs; a new follower route needs a look here
    return document


def _load(live: LiveApi, headers: dict[str, str], *, examples: int = MAX_EXAMPLES) -> BaseSchema:
    config = _config(live, headers, examples=examples)
    schema = schemathesis.openapi.from_dict(_without_follow(_served_document(live)), config=config)

    @schema.hook
    def filter_failure(
        context: schemathesis.HookContext, failure: Failure, case: schemathesis.Case, response: schemathesis.Response
    ) -> bool:
        # uvicorn (h11) refuses a request whose framing headers are garbage (a generated `Content-Length: x`)
        # with its own plain-text 400 before the app sees it; every response of the app has an X-Request-Id.
        if response.status_code == 400 and "x-request-id" not in response.headers:
            return False
        # The pipeline list's cursor is opaque (the `next` of a page, passed back unchanged): no schema can say
        # which strings are cursors, so refusing a string that is not one is right.
        if "positive_data_acceptance" in type(failure).checks and response.status_code == 400:
            return _error_code(response) != "invalid_cursor"
        return True

    del filter_failure  # registered on the schema
    return schema


def _error_code(response: schemathesis.Response) -> str | None:
    try:
        body = msgspec.json.decode(response.content)
    except msgspec.DecodeError:
        return None
    return body.get("error") if isinstance(body, dict) else None


@dataclass
class Run:
    """What one schemathesis run did: every response by operation, every failed check, every error."""

    statuses: dict[str, list[tuple[str, str, int]]] = field(default_factory=dict)
    """scenario ("GET /api/v1/agents", "Stateful tests") -> (method, path, status) of every response the app
    gave (uvicorn's own 400s for garbage framing headers, without an X-Request-Id, are left out)."""
    failures: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def report(self) -> str:
        return "\n\n".join([*self.failures, *self.errors])


def run_schemathesis(schema: BaseSchema) -> Run:
    """Every phase (examples, coverage, fuzzing, stateful where links exist) with every check enabled."""
    run = Run()
    seen: set[tuple[str, str, str]] = set()
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            recorder = event.recorder
            codes = run.statuses.setdefault(recorder.label, [])
            codes.extend(
                (i.request.method.upper(), urlsplit(i.request.uri).path, i.response.status_code)
                for i in recorder.interactions.values()
                if i.response is not None and "x-request-id" in i.response.headers
            )
            for case_id, checks in recorder.checks.items():
                for check in checks:
                    if check.status != Status.FAILURE or check.failure_info is None:
                        continue
                    failure = check.failure_info.failure
                    key = (recorder.label, check.name, failure.title)
                    if key in seen:
                        continue
                    seen.add(key)
                    interaction = recorder.interactions.get(case_id)
                    status = interaction.response.status_code if interaction and interaction.response else None
                    run.failures.append(
                        f"{recorder.label} [{check.name}] {failure.title} (HTTP {status})\n{failure.message}\n"
                        f"{check.failure_info.code_sample}"
                    )
        elif isinstance(event, events.NonFatalError):
            run.errors.append(f"{event.label}: error {type(event.value).__name__}: {event.value}")
        elif isinstance(event, events.FatalError):
            raise event.exception
    return run


def test_with_an_admin_token_every_check_passes(live_api: LiveApi) -> None:
    """T10: 0 server errors and 0 schema violations over every operation, positive and negative data."""
    run = run_schemathesis(_load(live_api, live_api.auth("admin")))
    assert not run.failures and not run.errors, run.report()
    documented = {label for label in run.statuses}
    assert len(documented) >= 20, sorted(documented)
    # The seeded resources were reached: success responses were checked against the schema too.
    assert all(any(200 <= s < 300 for _, _, s in codes) for codes in run.statuses.values()), run.statuses


def test_without_a_token_no_protected_route_answers_2xx(live_api: LiveApi) -> None:
    """T10: the same run without a token: only /healthz answers 2xx, and every 401 conforms to the schema."""
    run = run_schemathesis(_load(live_api, {}, examples=MAX_EXAMPLES_WITHOUT_TOKEN))
    assert not run.failures and not run.errors, run.report()
    operations = [label for label in run.statuses if label.startswith("/", label.find(" ") + 1)]
    assert len(operations) >= 20, sorted(run.statuses)
    for label, codes in run.statuses.items():
        method = label.split(" ", 1)[0] if label in operations else None
        if method is not None:
            expected = 200 if label.split(" ", 1)[1] in PUBLIC_PATHS else 401
            assert any(m == method and s == expected for m, _, s in codes), (label, codes)
        # The operation's own method: 401. Another method on the same path (schemathesis probes those): routing
        # answers 405 before authentication, which is no 2xx either.
        unexpected = {
            (m, p, s)
            for m, p, s in codes
            if p not in PUBLIC_PATHS and s != 401 and not (s == 405 and method is not None and m != method)
        }
        assert not unexpected, (label, sorted(unexpected))


def test_followers_stream_documented_events(live_api: LiveApi) -> None:
    """The SSE twins left out of the fuzzing (`follow=true`), and /stream, answer `text/event-stream` with events
    that match the documented event schema (schemathesis reads the first few and checks each one)."""
    # Every case below has at least 3 messages ready, or ends: reading never waits for the timeout.
    config = _config(live_api, live_api.auth("viewer"), {"max-stream-events": 3, "request-timeout": 10})
    schema = schemathesis.openapi.from_dict(_served_document(live_api), config=config)
    pid = live_api.seeded["pipelines"][0]
    logs = "/api/v1/pipelines/{pipeline_id}/stages/{stage}/logs"
    for path, path_parameters, query, wanted in [
        ("/api/v1/events", {}, {"follow": "true"}, 3),
        ("/api/v1/pipelines/{pipeline_id}/stream", {"pipeline_id": pid}, {}, 3),
        (logs, {"pipeline_id": pid, "stage": "train"}, {"follow": "true", "offset": "27"}, 3),
        # prep's attempt has ended without a line: the follower sends `end` (within END_GRACE_S) and closes.
        (logs, {"pipeline_id": pid, "stage": "prep"}, {"follow": "true"}, 1),
    ]:
        case = schema[path]["GET"].Case(path_parameters=path_parameters, query=query)
        response = case.call_and_validate(headers=live_api.auth("viewer"))
        assert response.status_code == 200, (path, response.status_code)
        assert response.headers["content-type"][0].startswith("text/event-stream"), path
        assert response.content.count(b"\ndata: ") + response.content.startswith(b"data: ") >= wanted, (
            path,
            response.content[:500],
        )

"""Browser-test fixtures: one real stack (`verlyard up`: embedded Postgres + NATS JetStream, api, scheduler,
one local agent) and one headless Chromium for the whole session.

Chromium is Debian's `chromium` (scripts/system-deps.sh installs it), driven by Playwright's Python package
with `executable_path`: Playwright never downloads a browser here. Without /usr/bin/chromium the tests
skip locally and FAIL under CI (`CI` set), like the other system dependencies.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import httpx
import pytest
from nats.aio.client import Client as NATS
from playwright.sync_api import Browser, Page, Playwright, sync_playwright

from tests.integration.telemetry_kit import publish_logs, publish_metrics
from verlyard_shared import codec, subjects
from verlyard_shared.embedded.ports import free_port
from verlyard_shared.nats_topology import connect_nats
from verlyard_shared.reports import Report

CHROMIUM = Path(os.environ.get("VERLYARD_CHROMIUM", "/usr/bin/chromium"))
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "docs" / "screenshots"
T = TypeVar("T")


class LoopThread:
    """An asyncio loop on its own thread: Playwright's sync API owns the test thread's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="browser-tests-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class Stack:
    home: Path
    url: str
    tokens: dict[str, str]
    """role -> a bearer token of that role (admin is the stack's own first token)."""
    nc: NATS
    loop: LoopThread
    database_url: str

    def client(self, role: str = "admin") -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.tokens[role]}"}, timeout=10)

    def submit(self, spec: dict[str, Any], role: str = "member") -> str:
        with self.client(role) as c:
            response = c.post("/api/v1/pipelines", json=spec)
            assert response.status_code == 201, response.text
            return str(response.json()["id"])

    def pipeline(self, pipeline_id: str) -> dict[str, Any]:
        with self.client("viewer") as c:
            data: dict[str, Any] = c.get(f"/api/v1/pipelines/{pipeline_id}").json()
            return data

    def wait(self, pipeline_id: str, check: Any, what: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            state = self.pipeline(pipeline_id)
            if check(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}: {json.dumps(state)[:2000]}")
            time.sleep(0.2)

    def metrics(self, pipeline_id: str, stage: str, attempt: str, points: list[tuple[int, str, float]]) -> None:
        """Publish a MetricBatch as an agent does: NATS -> the API's persister -> Postgres -> the live stream."""
        self.loop.run(publish_metrics(self.nc.jetstream(), pipeline_id, stage, attempt, points))

    def sql(self, query: str, *args: Any) -> None:
        """Run one statement on the stack's Postgres (bulk test data the API then reads)."""

        async def run() -> None:
            conn = await asyncpg.connect(self.database_url)
            try:
                await conn.execute(query, *args)
            finally:
                await conn.close()

        self.loop.run(run(), timeout=120)

    def report(self, report: Report) -> None:
        """Publish an agent's report (checkpoint, progress) as the agent does; the scheduler records it."""
        tag = str(type(report).__struct_config__.tag)  # `rpt.checkpoint` -> subject kind `checkpoint`
        subject = subjects.report_subject(report.agent, tag.rsplit(".", 1)[-1])
        self.loop.run(
            self.nc.jetstream().publish(subject, codec.encode(report), headers={"Nats-Msg-Id": report.report_id})
        )

    def logs(self, pipeline_id: str, stage: str, attempt: str, lines: list[tuple[int, str]]) -> None:
        self.loop.run(publish_logs(self.nc.jetstream(), pipeline_id, stage, attempt, lines))


def _console(home: Path) -> str:
    parts = []
    for path in [home / "up-console.log", *sorted((home / "logs").glob("*.log"))]:
        if path.exists():
            parts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
    return "\n".join(parts)


def _wait_ready(process: subprocess.Popen[bytes], home: Path, url: str, timeout_s: float = 120.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"verlyard up exited {process.returncode}:\n{_console(home)}")
        token_file = home / "admin-token"
        try:
            if token_file.exists():
                token = token_file.read_text().strip()
                headers = {"Authorization": f"Bearer {token}"}
                ready = httpx.get(f"{url}/readyz", headers=headers, timeout=2)
                agents = httpx.get(f"{url}/api/v1/agents", headers=headers, timeout=2)
                if ready.status_code == 200 and agents.status_code == 200 and agents.json()["items"]:
                    return token
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"verlyard up did not become ready in {timeout_s} s:\n{_console(home)}")


@pytest.fixture(scope="session")
def chromium() -> Path:
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: scripts/system-deps.sh installs Debian's chromium")
        pytest.skip(f"{CHROMIUM} is missing (run scripts/system-deps.sh); CI fails instead of skipping")
    return CHROMIUM


@pytest.fixture(scope="session")
def stack(chromium: Path) -> Iterator[Stack]:
    # Outside pytest's 0700 tmp root: the embedded Postgres runs as an unprivileged user when we are root.
    home = Path(tempfile.mkdtemp(prefix="verlyard-browser-"))
    home.chmod(0o755)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VERLYARD_")}
    log = (home / "up-console.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "verlyard_shared.cli", "up", "--home", str(home), "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    loop = LoopThread()
    nc: NATS | None = None
    try:
        admin = _wait_ready(process, home, url)
        tokens = {"admin": admin}
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}, timeout=10) as c:
            for role in ("member", "viewer"):
                response = c.post("/api/v1/tokens", json={"role": role, "name": f"browser-{role}"})
                assert response.status_code == 201, response.text
                tokens[role] = response.json()["token"]
        state = json.loads((home / "stack.json").read_text())
        password = (home / "secrets" / "nats-password").read_text().strip()
        nc = loop.run(
            connect_nats(
                f"nats://127.0.0.1:{state['nats_port']}", name="browser-tests", user="verlyard", password=password
            )
        )
        pg_password = (home / "postgres.password").read_text().strip()
        database_url = f"postgresql://postgres:{pg_password}@127.0.0.1:{state['postgres_port']}/postgres"
        yield Stack(home=home, url=url, tokens=tokens, nc=nc, loop=loop, database_url=database_url)
    finally:
        if nc is not None:
            loop.run(nc.close())
        loop.close()
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        log.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def playwright_driver() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="session")
def browser(playwright_driver: Playwright, chromium: Path) -> Iterator[Browser]:
    browser = playwright_driver.chromium.launch(executable_path=str(chromium), headless=True)
    yield browser
    browser.close()


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 860}, base_url=stack.url)
    context.set_default_timeout(15_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield page
    context.close()
    # 401s after logging out and refused actions are expected in some tests; script errors never are.
    assert not [e for e in errors if "Failed to load resource" not in e], errors


def shot(page: Page, name: str, *, full_page: bool = False) -> None:
    """A screenshot of the viewport (or the whole page) under docs/screenshots/ (the README shows them)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=full_page)

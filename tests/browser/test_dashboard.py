"""Browser: the dashboard in headless Chromium against a real stack (`verlyard up`). Log in, submit a
pipeline from the page (its validation errors shown at their line), watch the DAG finish, watch a loss
chart update live (metrics through the real telemetry path: NATS -> persister -> Postgres -> SSE),
including after a dropped stream connection (resumed with Last-Event-ID) and with steps a resume rolled
back, follow logs, cancel a pipeline, see agents and hosts; roles hide what they cannot do. Each page's
screenshot is saved under docs/screenshots/ (the README shows them)."""

from __future__ import annotations

import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from playwright.sync_api import Page, Request, expect

from tests.browser.conftest import Stack, shot
from verlyard_shared.events import GpuInfo
from verlyard_shared.ids import new_id
from verlyard_shared.reports import AgentHeartbeat, AgentHello, AttemptProgressReport, CheckpointReport, GpuStatus

pytestmark = pytest.mark.timeout(240)

BAD_SPEC = """name: demo-from-the-page
stages:
  prep:
    kind: noop
  train:
    kind: no-such-kind
    needs: [prep]
"""

GOOD_SPEC = """name: demo-from-the-page
labels: {team: nlp}
stages:
  prep:
    kind: noop
    with: {sleep_ms: 300}
  train:
    kind: noop
    needs: [prep]
    with: {sleep_ms: 1500}
  eval:
    kind: noop
    needs: [train]
  export:
    kind: noop
    needs: [train]
  cleanup:
    kind: noop
    needs: [eval, export]
    when: always
"""

TRAINING_SCRIPT = (
    "import time\n"
    "for i in range(240):\n"
    "    print(f'training step {i}: loss going down', flush=True)\n"
    "    time.sleep(0.5)"
)


def login(page: Page, stack: Stack, role: str) -> None:
    page.goto("/ui")
    field = page.get_by_label("API token")
    expect(field).to_be_visible()
    field.fill(stack.tokens[role])
    field.press("Enter")
    expect(page.locator("#who")).to_contain_text(f"({role})")


def test_login_submit_and_watch_the_dag(page: Page, stack: Stack) -> None:
    page.goto("/ui")
    expect(page.get_by_label("API token")).to_be_visible()
    shot(page, "login")
    page.get_by_label("API token").fill("vy_" + "A" * 43)
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_contain_text("not valid")

    login(page, stack, "member")
    expect(page.get_by_role("heading", name="Pipelines")).to_be_visible()
    page.get_by_role("link", name="Submit a pipeline").click()
    expect(page).to_have_url(re.compile(r"#/submit$"))

    editor = page.get_by_label("Pipeline spec (YAML or JSON)")
    editor.fill(BAD_SPEC)
    page.get_by_role("button", name="Submit pipeline").click()
    issue = page.locator("#issues li").first
    expect(issue).to_contain_text("line 6")
    expect(page.locator(".lines li.bad")).to_have_count(1)
    expect(page.locator(".lines li.bad")).to_contain_text("kind: no-such-kind")
    shot(page, "submit-error")

    editor.fill(GOOD_SPEC)
    page.get_by_role("button", name="Submit pipeline").click()
    expect(page).to_have_url(re.compile(r"#/pipelines/[0-9a-f-]+$"))
    pipeline_id = page.url.rsplit("/", 1)[1]
    dag = page.locator("#dag svg")
    expect(dag.locator("a[data-stage]")).to_have_count(5)
    expect(dag.locator("path.edge")).to_have_count(5)
    # Live: the DAG moves without a reload until every stage has succeeded.
    for stage in ("prep", "train", "eval", "export", "cleanup"):
        expect(dag.locator(f'a[data-stage="{stage}"]')).to_have_attribute("data-status", "succeeded", timeout=60_000)
    expect(page.locator("#timeline")).to_contain_text("pipeline.succeeded")
    expect(page.locator("#stages")).to_contain_text("#1")
    assert stack.pipeline(pipeline_id)["status"] == "succeeded"
    # The state is in the URL: a refresh shows the same pipeline, still logged in (sessionStorage).
    page.reload()
    expect(page.locator("#dag svg a[data-stage]")).to_have_count(5)
    expect(page.locator("#who")).to_contain_text("(member)")
    expect(page.locator("main")).not_to_contain_text("null")
    shot(page, "pipeline")


def test_loss_chart_and_logs_follow_live_and_cancel(page: Page, stack: Stack) -> None:
    stream_requests: list[Request] = []
    every_url: list[str] = []

    def seen(request: Request) -> None:
        every_url.append(request.url)
        if "/stream" in request.url and "/stream/head" not in request.url:
            stream_requests.append(request)

    page.on("request", seen)
    spec: dict[str, Any] = {
        "name": "live-loss",
        "stages": {
            "prep": {"kind": "noop"},
            "train": {"kind": "command", "needs": ["prep"], "with": {"run": [sys.executable, "-c", TRAINING_SCRIPT]}},
        },
    }
    pipeline_id = stack.submit(spec)
    state = stack.wait(
        pipeline_id,
        lambda p: any(a["status"] == "running" for a in p["stages"]["train"]["attempts"]),
        "the train stage running",
    )
    attempt = state["stages"]["train"]["attempts"][-1]["id"]
    stack.metrics(pipeline_id, "train", attempt, [(s, "train/loss", 3.0 / s) for s in range(1, 11)])
    stack.metrics(pipeline_id, "train", attempt, [(s, "train/lr", 1e-4) for s in range(1, 11)])

    login(page, stack, "member")
    page.goto(f"/ui#/pipelines/{pipeline_id}/stages/train")
    loss = page.locator('figure[data-key="train/loss"]')
    expect(loss).to_have_attribute("data-points", "10")
    expect(page.locator('figure[data-key="train/lr"]')).to_be_visible()
    expect(page.locator("#logs")).to_contain_text("training step", timeout=30_000)

    # New points arrive through the live stream: the chart redraws without a reload.
    stack.metrics(pipeline_id, "train", attempt, [(s, "train/loss", 3.0 / s) for s in range(11, 21)])
    expect(loss).to_have_attribute("data-points", "20")

    # A dropped connection resumes from its last message id: nothing published meanwhile is missed.
    before = len(stream_requests)
    page.evaluate("window.__verlyardStreams.stream.drop()")
    stack.metrics(pipeline_id, "train", attempt, [(s, "train/loss", 3.0 / s) for s in range(21, 31)])
    expect(loss).to_have_attribute("data-points", "30")
    resumed = [r for r in stream_requests[before:] if "logs=false" in r.url]
    assert resumed and re.fullmatch(r"e\d+\.m\d+\.l\d+", resumed[-1].headers.get("last-event-id", "")), [
        (r.url, r.headers) for r in resumed
    ]

    # The agent's progress and checkpoint reports (recorded by the scheduler) show up live.
    agent = state["stages"]["train"]["attempts"][-1]["agent"]
    ids = {"agent": agent, "pipeline_id": pipeline_id, "stage": "train", "attempt": attempt}
    now = datetime.now(UTC)
    stack.report(AttemptProgressReport(report_id=new_id(), sent_at=now, step=30, total_steps=100, **ids))
    path = "/ckpt/global_step_30"
    stack.report(CheckpointReport(report_id=new_id(), sent_at=now, step=30, path=path, size_bytes=3 << 20, **ids))
    expect(page.locator("#checkpoints")).to_contain_text(path)
    expect(page.locator("#checkpoints")).to_contain_text("3.0 MiB")
    expect(page.locator("#attempts")).to_contain_text("30 / 100")

    # A later attempt that starts over from step 25 rolls back the first attempt's steps after it.
    stack.metrics(pipeline_id, "train", new_id(), [(s, "train/loss", 0.3 + 3.0 / s) for s in range(25, 41)])
    expect(loss.locator("path.rolled")).to_have_count(1)
    expect(loss).to_have_attribute("data-points", "40")
    expect(page.locator("main")).not_to_contain_text("null")
    shot(page, "stage", full_page=True)

    # The token never appears in a URL (EventSource would need it there; fetch sends it as a header).
    assert not [u for u in every_url if any(t in u for t in stack.tokens.values())]

    page.get_by_role("link", name="← live-loss").click()
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel pipeline").click()
    expect(page.locator('#dag a[data-stage="train"]')).to_have_attribute("data-status", "cancelled", timeout=60_000)
    expect(page.locator("#timeline")).to_contain_text("pipeline.cancelled")
    assert stack.pipeline(pipeline_id)["status"] == "cancelled"

    # Retry re-runs the cancelled stage (a second attempt); the page follows it, and cancelling again works.
    page.get_by_role("button", name="Retry failed stages").click()
    expect(page.locator("#timeline")).to_contain_text("pipeline.retry_requested")
    train = page.locator('#dag a[data-stage="train"]')
    expect(train).to_have_attribute("data-status", "running", timeout=60_000)
    expect(page.locator("#stages")).to_contain_text("#2")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Cancel pipeline").click()
    expect(train).to_have_attribute("data-status", "cancelled", timeout=60_000)


def test_the_list_is_live_and_pending_reasons_show(page: Page, stack: Stack) -> None:
    login(page, stack, "viewer")
    expect(page.locator("main")).to_contain_text(re.compile("No pipelines match|Created"))
    expect(page.locator("main .row .muted")).to_have_text("live")
    page.evaluate("window.__notReloaded = true")
    # Submitted elsewhere (the API): it appears at the top of the first page and its status moves on.
    spec = {"name": "arrives-live", "stages": {"a": {"kind": "noop", "with": {"sleep_ms": 1500}}}}
    pipeline_id = stack.submit(spec)
    row = page.locator(f'#pipelines tbody tr[data-id="{pipeline_id}"]')
    expect(page.locator("#pipelines tbody tr").first).to_have_attribute("data-id", pipeline_id)
    expect(row.locator(".badge").first).to_have_text("succeeded", timeout=60_000)
    assert page.evaluate("window.__notReloaded") is True

    # A stage no agent can take waits, and the page says why.
    waiting = stack.submit({"name": "needs-gpus", "stages": {"big": {"kind": "noop", "resources": {"gpus": 64}}}})
    reason = stack.wait(waiting, lambda p: bool(p["stages"]["big"]["pending_reason"]), "a pending reason")
    page.goto(f"/ui#/pipelines/{waiting}")
    expect(page.locator("#stages")).to_contain_text(reason["stages"]["big"]["pending_reason"])
    expect(page.locator('#dag a[data-stage="big"] title')).to_contain_text("pending")
    with stack.client("admin") as client:
        assert client.post(f"/api/v1/pipelines/{waiting}/cancel", json={}).status_code in (200, 202)


def test_a_hundred_thousand_step_series_is_drawn_downsampled(page: Page, stack: Stack) -> None:
    pipeline_id = stack.submit({"name": "long-run", "stages": {"train": {"kind": "noop"}}})
    state = stack.wait(pipeline_id, lambda p: p["status"] == "succeeded", "the pipeline to finish")
    attempt = state["stages"]["train"]["attempts"][-1]["id"]
    # 100,000 steps of loss written straight into the telemetry table (the persister's path is covered
    # above; here it is the read side that is under test).
    stack.sql(
        """INSERT INTO metrics (pipeline_id, stage, attempt, step, key, value, recorded_at)
           SELECT $1, 'train', $2, s, 'train/loss', 3.0 / s + 0.01 * sin(s / 50.0), now()
           FROM generate_series(1, 100000) AS s""",
        pipeline_id,
        attempt,
    )
    login(page, stack, "viewer")
    started = time.monotonic()
    page.goto(f"/ui#/pipelines/{pipeline_id}/stages/train")
    loss = page.locator('figure[data-key="train/loss"]')
    expect(loss).to_contain_text("downsampled")
    drawn = int(loss.get_attribute("data-points") or 0)
    assert 100 <= drawn <= 600, drawn
    assert time.monotonic() - started < 10
    expect(loss.locator("svg")).to_have_attribute("aria-label", re.compile(r"train/loss by step"))
    # The API's SQL pre-aggregation keeps each bucket's extremes and the series' own last point.
    expect(loss).to_contain_text("last: step 100000")


def test_pipelines_list_pages_filters_and_searches(page: Page, stack: Stack) -> None:
    ids = [stack.submit({"name": f"page-{i:03d}", "stages": {"a": {"kind": "noop"}}}) for i in range(12)]
    login(page, stack, "viewer")
    # Pages of 5 (`limit` in the URL; 50 by default) keep the check quick: three pages of the API's cursor.
    page.goto("/ui#/pipelines?limit=5")
    page.get_by_label("Name contains").fill("page-")
    page.get_by_label("Name contains").press("Enter")
    expect(page).to_have_url(re.compile(r"q=page-.*limit=5|limit=5.*q=page-"))
    rows = page.locator("#pipelines tbody tr")
    expect(rows).to_have_count(5)
    expect(rows.first).to_have_attribute("data-id", ids[-1])
    page.get_by_role("link", name="Older").click()
    expect(rows.first).to_have_attribute("data-id", ids[-6])
    page.get_by_role("link", name="Older").click()
    expect(rows).to_have_count(2)
    expect(rows.last).to_have_attribute("data-id", ids[0])
    expect(page.get_by_role("link", name="Older")).to_have_count(0)
    page.get_by_role("link", name="Newer").click()
    expect(rows.first).to_have_attribute("data-id", ids[-6])
    page.get_by_role("link", name="First page").click()
    expect(rows.first).to_have_attribute("data-id", ids[-1])
    # The status filter is the API's too; the rows' statuses follow live until all have succeeded.
    page.get_by_label("Status").select_option("succeeded")
    expect(page).to_have_url(re.compile(r"status=succeeded"))
    expect(rows).to_have_count(5, timeout=60_000)
    for row in rows.all():
        expect(row.locator(".badge").first).to_have_text("succeeded")
    page.goto("/ui#/pipelines?q=page-")
    expect(rows).to_have_count(12)
    # Viewers see no submit link and no actions.
    expect(page.get_by_role("link", name="Submit", exact=True)).to_be_hidden()
    rows.first.get_by_role("link").click()
    expect(page.locator("#dag svg")).to_be_visible()
    expect(page.get_by_role("button", name="Cancel pipeline")).to_have_count(0)


def test_agents_drain_and_hosts(page: Page, stack: Stack) -> None:
    # A second agent with two GPUs and no CPU slot (so it is never given the tests' CPU stages), announced
    # as an agent does: hello, then a heartbeat with its GPUs' memory and utilisation.
    box = "gpu-box-7"
    gpus = tuple(GpuInfo(index=i, name="NVIDIA H100 80GB HBM3", memory_total_mb=81559) for i in range(2))
    stack.report(
        AgentHello(report_id=new_id(), agent=box, sent_at=datetime.now(UTC), hostname=box, gpus=gpus, cpu_slots=0)
    )
    deadline = time.monotonic() + 30
    with stack.client("viewer") as client:
        while not any(a["id"] == box for a in client.get("/api/v1/agents").json()["items"]):
            assert time.monotonic() < deadline, "the second agent never registered"
            time.sleep(0.2)
    busy = (GpuStatus(index=0, utilization_pct=87.0, memory_used_mb=61440), GpuStatus(index=1, memory_used_mb=1024))
    stack.report(AgentHeartbeat(report_id=new_id(), agent=box, sent_at=datetime.now(UTC), gpus=busy))

    login(page, stack, "admin")
    page.get_by_role("link", name="Agents").click()
    row = page.locator(f'#agents tbody tr[data-agent="{box}"]')
    expect(row).to_contain_text("87% busy")
    expect(row).to_contain_text("60.0 / 79.6 GiB")
    expect(row.locator("td[data-heartbeat]")).to_contain_text("ago")
    local = page.locator("#agents tbody tr").filter(has_not_text=box).first
    expect(local).to_contain_text("active")
    shot(page, "agents")
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name=f"Drain {box}").click()
    expect(row).to_contain_text("draining")
    expect(row.get_by_role("button")).to_have_count(0)

    page.get_by_role("link", name="Hosts").click()
    expect(page.get_by_role("heading", name="Hosts")).to_be_visible()
    expect(page.locator("main")).to_contain_text(re.compile("No SSH hosts|no hosts list|Probe"))
    # Only admins drain.
    page.get_by_role("button", name="Log out").click()
    login(page, stack, "member")
    page.goto("/ui#/agents")
    expect(page.locator("#agents tbody tr").first).to_contain_text(re.compile("active|draining"))
    expect(page.get_by_role("button", name=re.compile("^Drain "))).to_have_count(0)


HOST = {
    "name": "rented-a100",
    "address": "203.0.113.7",
    "port": 22,
    "user": "ubuntu",
    "auth": "key",
    "host_key_fingerprint": "SHA256:q1w2e3r4t5y6u7i8o9p0",
    "state": "ready",
    "agent": "ssh-rented-a100",
    "gpus": 2,
    "probe": {
        "ok": True,
        "gpus": [{"index": i, "name": "NVIDIA A100-SXM4-80GB", "memory_total_mb": 81920} for i in range(2)],
        "driver_version": "550.54.15",
        "cuda_version": "12.4",
        "disk_free_bytes": 412 << 30,
        "disk_total_bytes": 980 << 30,
        "trainer_python": "/opt/verl/bin/python",
        "verl_version": "0.9.1",
        "password": "hunter2-never-shown",
        "private_key_pem": "-----BEGIN OPENSSH PRIVATE KEY----- never shown",
        "uptime_s": 86400,
    },
    "probed_at": "2026-11-28T10:00:00Z",
    "private_key": "-----BEGIN OPENSSH PRIVATE KEY----- never shown either",
}


def test_hosts_show_probe_results_and_never_secrets(page: Page, stack: Stack) -> None:
    """The page's rendering of the hosts API (served here by the browser, so the check does not depend
    on a reachable SSH host): probe results shown, fields that look like credentials never; a 404 (an
    API without hosts) is an empty state."""
    page.route("**/api/v1/hosts", lambda route: route.fulfill(json={"items": [HOST], "next": None}))
    login(page, stack, "viewer")
    page.goto("/ui#/hosts")
    row = page.locator('#hosts tr[data-host="rented-a100"]')
    expect(row).to_contain_text("ubuntu@203.0.113.7:22")
    expect(row).to_contain_text("NVIDIA A100-SXM4-80GB")
    expect(row).to_contain_text("412.0 GiB of 980.0 GiB")
    expect(row).to_contain_text("verl 0.9.1")
    expect(row).to_contain_text("uptime_s")
    text = page.locator("main").inner_text()
    assert "hunter2" not in text and "PRIVATE KEY" not in text, text
    shot(page, "hosts")
    page.unroute("**/api/v1/hosts")
    page.route("**/api/v1/hosts", lambda route: route.fulfill(status=404, json={"error": "not_found", "detail": "x"}))
    page.goto("/ui#/agents")
    page.goto("/ui#/hosts")
    expect(page.locator("main")).to_contain_text("no hosts list")


def _luminance(rgb: tuple[float, ...]) -> float:
    def channel(c: float) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(fg: str, bg: str) -> float:
    parse = [tuple(float(x) for x in re.findall(r"[\d.]+", c)) for c in (fg, bg)]
    hi, lo = sorted((_luminance(parse[0]), _luminance(parse[1])), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


_COLOURS = """(selector) => [...document.querySelectorAll(selector)].map((el) => {
  let bgEl = el, bg = "rgba(0, 0, 0, 0)";
  while (bgEl && (bg === "rgba(0, 0, 0, 0)" || bg === "transparent")) {
    bg = getComputedStyle(bgEl).backgroundColor; bgEl = bgEl.parentElement;
  }
  if (bg === "rgba(0, 0, 0, 0)") bg = "rgb(255, 255, 255)";
  return [el.textContent.trim().slice(0, 30), getComputedStyle(el).color, bg];
})"""

_UNLABELLED = """() => [...document.querySelectorAll("input, select, textarea")].filter((el) => {
  if (el.type === "hidden") return false;
  const byFor = el.id && document.querySelector(`label[for="${CSS.escape(el.id)}"]`);
  return !(byFor || el.closest("label") || el.getAttribute("aria-label") || el.getAttribute("aria-labelledby"));
}).map((el) => el.outerHTML)"""


def test_accessibility_labels_keyboard_and_contrast(page: Page, stack: Stack) -> None:
    page.goto("/ui")
    assert page.evaluate(_UNLABELLED) == []
    # Keyboard only: Tab reaches the token field and Enter logs in.
    for _ in range(12):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "token":
            break
    assert page.evaluate("document.activeElement.id") == "token"
    page.keyboard.type(stack.tokens["member"])
    page.keyboard.press("Enter")
    expect(page.locator("#who")).to_contain_text("(member)")
    expect(page.locator("#pipelines")).to_be_visible()

    # Every page's inputs have labels.
    pipeline_id = stack.submit({"name": "a11y", "stages": {"a": {"kind": "noop"}}})
    pages = ("#/pipelines", "#/submit", "#/agents", "#/hosts", f"#/pipelines/{pipeline_id}")
    for route in (*pages, f"#/pipelines/{pipeline_id}/stages/a"):
        page.goto(f"/ui{route}")
        expect(page.locator("main h1").first).to_be_visible()
        assert page.evaluate(_UNLABELLED) == [], route

    # Tab + Enter reach the main actions: the submit link, the editor, the submit button.
    page.goto("/ui#/pipelines")
    expect(page.locator("#pipelines")).to_be_visible()
    page.locator("body").focus()
    for _ in range(30):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.textContent") == "Submit a pipeline":
            break
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"#/submit$"))
    editor = page.get_by_label("Pipeline spec (YAML or JSON)")
    editor.focus()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "submit"
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"#/pipelines/[0-9a-f-]+$"))
    expect(page.locator("#dag svg")).to_be_visible()

    # Contrast of the main colours, from computed styles: body text, muted text, the header, buttons,
    # links, status badges.
    page.goto(f"/ui#/pipelines/{pipeline_id}")
    expect(page.locator("#timeline tbody tr").first).to_be_visible()
    page.goto("/ui#/pipelines")
    expect(page.locator("#pipelines")).to_be_visible()
    shot(page, "pipelines")  # last: the list then holds every test's pipelines, in every status
    low: list[tuple[str, str, str, str, float]] = []
    for selector in ("main h1", "main td", ".muted", ".top a", ".who span", "button", "main a", ".badge", "label"):
        found = page.evaluate(_COLOURS, selector)
        assert found, selector
        low += [(selector, text, fg, bg, round(_contrast(fg, bg), 2)) for text, fg, bg in found]
    low = [row for row in low if row[-1] < 4.5]
    assert not low, low

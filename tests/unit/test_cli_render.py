"""Unit: what the CLI shows. The DAG tree, stage rows and progress from a pipeline's JSON, the lines of
a non-TTY watch, one-line errors (422 issues with lines), exit codes, SSE parsing, the audit shape."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from verlyard_shared.cli_render import (
    AUDIT_KEYS,
    NO_VALID_TOKEN,
    api_error_message,
    audit_event,
    dag_tree,
    event_line,
    exit_code_for,
    final_line,
    fmt_duration,
    pipeline_list_rows,
    pipeline_view,
    spec_content_type,
    sse_messages,
    stage_rows,
    stage_summary,
    state_changes,
    text_bar,
    to_text,
    topo_order,
)

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def attempt(
    number: int, status: str, *, start: float | None = None, end: float | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "id": f"att-{number}",
        "number": number,
        "agent": "gpu-1",
        "status": status,
        "started_at": at(start) if start is not None else None,
        "finished_at": at(end) if end is not None else None,
        "exit_code": None,
        "failure_class": None,
        "resumed_from_step": None,
    } | extra


def stage(
    kind: str, status: str, needs: list[str] | None = None, attempts: list[Any] | None = None, **extra: Any
) -> dict[str, Any]:
    return {
        "status": status,
        "kind": kind,
        "needs": needs or [],
        "pending_reason": None,
        "outputs": {},
        "attempts": attempts or [],
    } | extra


def pipeline(status: str = "running", **stages: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "p-1",
        "name": "sales-sft",
        "status": status,
        "created_at": at(0),
        "finished_at": None,
        "stages": stages,
    }


def running_pipeline() -> dict[str, Any]:
    return pipeline(
        prep=stage("preprocess", "succeeded", attempts=[attempt(1, "succeeded", start=1, end=4)]),
        train=stage(
            "train",
            "running",
            ["prep"],
            [
                attempt(1, "lost", start=5, end=20),
                attempt(2, "running", start=30, step=60, total_steps=100, resumed_from_step=20),
            ],
        ),
        eval=stage("evaluate", "pending", ["train"]),
        cleanup=stage("cleanup", "pending", ["eval"], when="always"),
    )


# ---- the tree ---------------------------------------------------------------------------------------------


def test_dag_tree_indents_each_stage_under_its_deepest_need_and_names_the_others() -> None:
    needs = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "x": []}
    assert topo_order(needs) == ["a", "b", "c", "d", "x"]
    nodes = dag_tree(needs)
    assert [(n.name, n.prefix, n.also_needs) for n in nodes] == [
        ("a", "", ()),
        ("b", "├─ ", ()),
        ("c", "└─ ", ()),
        ("d", "   └─ ", ("b",)),
        ("x", "", ()),
    ]


def test_dag_tree_prefers_the_longer_chain_and_tolerates_unknown_needs() -> None:
    nodes = dag_tree({"prep": [], "train": ["prep"], "tok": [], "eval": ["tok", "train", "ghost"]})
    eval_node = next(n for n in nodes if n.name == "eval")
    assert eval_node.depth == 2 and eval_node.also_needs == ("tok", "ghost")
    assert [n.name for n in nodes] == ["prep", "train", "eval", "tok"]


def test_stage_rows_show_attempt_agent_elapsed_progress_eta_and_loss() -> None:
    rows = {r.name: r for r in stage_rows(running_pipeline(), T0 + timedelta(seconds=70), {"train": 0.5})}
    assert rows["prep"].elapsed_s == 3 and rows["prep"].attempt == 1 and rows["prep"].agent == "gpu-1"
    train = rows["train"]
    assert (train.status, train.attempt, train.step, train.total_steps, train.loss) == ("running", 2, 60, 100, 0.5)
    # 40 steps (20 -> 60) in 40 s since the resumed attempt started: 40 steps left take 40 s.
    assert train.elapsed_s == 40 and train.eta_s == pytest.approx(40)
    assert train.note == "resumed from step 20"
    assert rows["eval"].note == "waiting for train" and rows["eval"].attempt is None


def test_plain_view_is_a_tree_with_a_text_progress_bar_and_no_colour_codes() -> None:
    text = to_text(
        pipeline_view(
            running_pipeline(),
            T0 + timedelta(seconds=70),
            losses={"train": 1.25},
            log_lines=["step 60"],
            log_title="train",
            styled=False,
        )
    )
    lines = text.splitlines()
    assert lines[0] == "pipeline p-1  sales-sft  running  1m10s"
    assert lines[1].split() == ["STAGE", "STATUS", "ATTEMPT", "AGENT", "ELAPSED", "PROGRESS"]
    assert lines[2].split()[:5] == ["prep", "succeeded", "1", "gpu-1", "3.0s"]
    assert lines[3].startswith("└─ train") and "[############--------] 60/100 ETA 40s loss 1.25" in lines[3]
    assert lines[4].startswith("   └─ eval") and lines[5].startswith("      └─ cleanup")
    assert lines[-2:] == ["--- train ---", "step 60"]
    assert "\x1b" not in text and all(line == line.rstrip() for line in lines)


def test_styled_view_renders_a_progress_bar() -> None:
    text = to_text(pipeline_view(running_pipeline(), T0 + timedelta(seconds=70), styled=True))
    assert "━" in text and "60/100" in text


def test_failed_stage_shows_failure_class_exit_code_and_reason() -> None:
    p = pipeline(
        "failed",
        a=stage(
            "command",
            "failed",
            attempts=[attempt(1, "failed", start=0, end=2, failure_class="oom", exit_code=137)],
            reason="CUDA out of memory",
        ),
        b=stage("noop", "skipped", ["a"], reason="a failed"),
    )
    rows = {r.name: r for r in stage_rows(p, T0)}
    assert rows["a"].note == "oom, exit 137: CUDA out of memory"
    assert rows["b"].note == "a failed"


def test_text_bar_and_durations() -> None:
    assert text_bar(5, 10, 10) == "[#####-----]"
    assert text_bar(50, 10, 4) == "[####]" and text_bar(None, 10) == "" and text_bar(3, None) == ""
    assert [fmt_duration(s) for s in (None, 0.25, 42, 185, 7260, 93600)] == [
        "",
        "0.2s",
        "42s",
        "3m05s",
        "2h01m",
        "1d02h",
    ]


# ---- non-TTY watch lines and the outcome ------------------------------------------------------------------


def test_state_changes_print_one_line_per_change_and_nothing_when_nothing_changed() -> None:
    first = pipeline(
        "pending",
        a=stage("noop", "pending"),
        b=stage("noop", "pending", ["a"]),
    )
    assert state_changes(None, first, T0) == ["pipeline p-1 (sales-sft): pending"]
    placed = pipeline("running", a=stage("noop", "running", attempts=[attempt(1, "placed")]), b=first["stages"]["b"])
    assert state_changes(first, placed, T0) == ["a: running (attempt 1 on gpu-1, placed)", "pipeline p-1: running"]
    started = pipeline(
        "running", a=stage("noop", "running", attempts=[attempt(1, "running", start=0)]), b=first["stages"]["b"]
    )
    assert state_changes(placed, started, T0) == ["a: running (attempt 1 on gpu-1)"]
    assert state_changes(started, started, T0) == []
    done = pipeline(
        "succeeded",
        a=stage("noop", "succeeded", attempts=[attempt(1, "succeeded", start=0, end=1.5)]),
        b=stage("noop", "succeeded", ["a"], attempts=[attempt(1, "succeeded", start=2, end=3)]),
    )
    assert state_changes(started, done, T0) == [
        "a: succeeded (attempt 1 on gpu-1, took 1.5s)",
        "b: succeeded (attempt 1 on gpu-1, took 1.0s)",
        "pipeline p-1: succeeded",
    ]


def test_final_line_and_exit_codes() -> None:
    done = pipeline("failed") | {"finished_at": at(75), "failed_stages": ["train"]}
    assert final_line(done, T0 + timedelta(hours=1)) == "pipeline p-1 failed after 1m15s (failed: train)"
    assert [exit_code_for(s) for s in ("succeeded", "failed", "cancelled", "running")] == [0, 1, 3, 2]


# ---- errors -----------------------------------------------------------------------------------------------


def test_a_422_lists_each_issue_with_its_path_and_line() -> None:
    body = {
        "error": "invalid_spec",
        "detail": "2 problems in the spec: stages.train.kind: unknown kind 'trian'; ...",
        "issues": [
            {"path": "stages.train.kind", "message": "unknown kind 'trian'", "line": 4},
            {"path": "stages.eval.needs", "message": "needs unknown stage 'x'", "line": None},
        ],
    }
    assert api_error_message(422, body).splitlines() == [
        "422 invalid_spec: 2 problems in the spec",
        "  stages.train.kind (line 4): unknown kind 'trian'",
        "  stages.eval.needs: needs unknown stage 'x'",
    ]


def test_other_errors_are_one_line_with_the_apis_detail() -> None:
    assert api_error_message(401, {"error": "unauthorized", "detail": "bad token"}) == NO_VALID_TOKEN
    assert api_error_message(404, {"error": "not_found", "detail": "no pipeline x"}) == "404 not_found: no pipeline x"
    assert api_error_message(403, {"error": "forbidden", "detail": "needs\nmember"}) == "403 forbidden: needs member"
    assert api_error_message(502, None, "Bad Gateway\n") == "502 error: Bad Gateway"
    assert api_error_message(409, {"error": "conflict", "detail": "x", "issues": [{"path": "a", "message": "b"}]}) == (
        "409 conflict: x"
    )


# ---- lists, events, files, SSE ----------------------------------------------------------------------------


def test_pipeline_list_rows_and_stage_summary() -> None:
    assert stage_summary({"a": "succeeded", "b": "running", "c": "pending"}) == "1/3 succeeded, 1 running"
    rows = pipeline_list_rows(
        [{"id": "p-1", "name": "n", "status": "running", "stage_statuses": {"a": "succeeded"}, "created_at": at(0)}]
    )
    assert rows == [
        "ID   NAME  STATUS   STAGES         CREATED",
        "p-1  n     running  1/1 succeeded  2025-03-01 12:00:00",
    ]


def test_audit_event_keeps_exactly_the_public_shape_and_event_line_summarises_data() -> None:
    event = {
        "position": 7,
        "event_id": "e",
        "stream_id": "pipeline-p-1",
        "version": 2,
        "type": "stage.placed",
        "recorded_at": at(0),
        "actor": "scheduler",
        "correlation_id": "c",
        "causation_id": None,
        "data": {"pipeline_id": "p-1", "stage": "train", "attempt": "a1", "gpus": [0, 1], "placement": {"x": 1}},
        "schema_version": 1,
    }
    shaped = audit_event(event)
    assert tuple(shaped) == AUDIT_KEYS and "schema_version" not in shaped
    assert event_line(event) == (
        "7  2025-03-01 12:00:00  stage.placed  pipeline-p-1  scheduler  stage=train attempt=a1 gpus=[0,1]"
    )


def test_spec_content_type_by_extension_then_content() -> None:
    assert spec_content_type("p.json", b"name: x") == "application/json"
    assert spec_content_type("p.YML", b"{}") == "application/yaml"
    assert spec_content_type("-", b'  {"name": "x"}') == "application/json"
    assert spec_content_type("spec", b"name: x") == "application/yaml"


def test_sse_messages_parse_events_ids_comments_and_multiline_data() -> None:
    raw = ': hello\nretry: 1000\n\nid: 3\nevent: stage.placed\ndata: {"a":\ndata: 1}\n\ndata: plain\n\n: keep-alive\n\n'
    messages = list(sse_messages(raw.split("\n")))
    assert [(m.event, m.data, m.id) for m in messages] == [
        ("stage.placed", '{"a":\n1}', "3"),
        ("message", "plain", "3"),
    ]

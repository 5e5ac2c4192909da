"""Unit: metric series across attempts (rolled-back steps, the effective curve), LTTB downsampling, the
live stream's cursor, telemetry rows and the Prometheus text."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verlyard_api.cursor import StreamCursor, decode_cursor, decode_offset
from verlyard_api.errors import BadRequest
from verlyard_api.promtext import OpsMetrics, render
from verlyard_api.series import (
    AttemptSpan,
    Point,
    build_metrics,
    downsample,
    effective_curve,
    lttb,
    mark,
    merge_buckets,
    parse_keys,
    rollback_cutoffs,
)
from verlyard_api.telemetry import MAX_LINE_CHARS, BadTelemetry, cut, log_rows, metric_rows
from verlyard_shared.telemetry import LogBatch, LogLine, MetricBatch, MetricPoint

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def test_a_resume_rolls_back_the_steps_after_its_checkpoint() -> None:
    spans = [
        AttemptSpan(attempt="a1", number=1, first_step=1),
        AttemptSpan(attempt="a2", number=2, resumed_from_step=50, first_step=51),
    ]
    assert rollback_cutoffs(spans) == {"a1": 51, "a2": None}
    first = mark([(s, float(s)) for s in range(1, 81)], 51)
    assert [p.step for p in first if p.rolled_back] == list(range(51, 81))
    second = mark([(s, -float(s)) for s in range(51, 101)], None)
    curve = effective_curve([(spans[0], first), (spans[1], second)])
    assert [p.step for p in curve] == list(range(1, 101))
    assert {p.attempt for p in curve if p.step <= 50} == {1} and {p.attempt for p in curve if p.step > 50} == {2}
    assert curve[60].value == -61.0


def test_a_fresh_restart_rolls_back_from_its_own_first_step_and_the_later_attempt_wins_a_shared_step() -> None:
    spans = [
        AttemptSpan(attempt="a1", number=1, first_step=0),
        AttemptSpan(attempt="a2", number=2, resumed_from_step=10, first_step=10),  # logs step 10 again
        AttemptSpan(attempt="a3", number=3, first_step=None),  # placed, nothing recorded: rolls back nothing
    ]
    cutoffs = rollback_cutoffs(spans)
    assert cutoffs == {"a1": 11, "a2": None, "a3": None}
    one = mark([(s, 1.0) for s in range(0, 20)], cutoffs["a1"])
    two = mark([(s, 2.0) for s in range(10, 30)], cutoffs["a2"])
    curve = effective_curve([(spans[0], one), (spans[1], two)])
    by_step = {p.step: p for p in curve}
    assert by_step[10].attempt == 2 and by_step[9].attempt == 1 and by_step[29].attempt == 2
    restart = [AttemptSpan(attempt="x", number=1, first_step=0), AttemptSpan(attempt="y", number=2, first_step=0)]
    assert rollback_cutoffs(restart)["x"] == 0  # everything of the first run was redone


def test_an_earlier_resume_point_of_a_later_attempt_rolls_back_the_middle_attempt_too() -> None:
    spans = [
        AttemptSpan(attempt="a1", number=1, first_step=1),
        AttemptSpan(attempt="a2", number=2, resumed_from_step=100, first_step=101),
        AttemptSpan(attempt="a3", number=3, resumed_from_step=40, first_step=41),
    ]
    assert rollback_cutoffs(spans) == {"a1": 41, "a2": 41, "a3": None}


def test_lttb_keeps_the_ends_and_the_spikes_and_at_most_threshold_points() -> None:
    xs = [float(i) for i in range(10_000)]
    ys = [math.sin(i / 300) for i in range(10_000)]
    ys[5_000] = 50.0
    chosen = lttb(xs, ys, 200)
    assert len(chosen) == 200 and chosen[0] == 0 and chosen[-1] == 9_999
    assert chosen == sorted(set(chosen))
    assert 5_000 in chosen
    assert lttb(xs[:10], ys[:10], 100) == list(range(10))


@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=False, width=32), min_size=0, max_size=400), st.integers(3, 50)
)
def test_lttb_is_bounded_ordered_and_keeps_ends(values: list[float], threshold: int) -> None:
    xs = [float(i) for i in range(len(values))]
    chosen = lttb(xs, values, threshold)
    assert len(chosen) <= max(threshold, 0) or len(chosen) == len(values)
    assert chosen == sorted(set(chosen))
    if values:
        assert chosen[0] == 0 and chosen[-1] == len(values) - 1


def test_downsample_carries_flags_and_nan_becomes_null() -> None:
    points = mark([(s, float("nan") if s == 3 else float(s)) for s in range(5000)], 2500)
    assert points[3].value is None
    sampled = downsample(points, 100)
    assert len(sampled) == 100 and sampled[0].step == 0 and sampled[-1].step == 4999
    assert all(p.rolled_back == (p.step >= 2500) for p in sampled)
    assert downsample(points[:10], 100) == points[:10]


def test_build_metrics_series_effective_and_one_attempt() -> None:
    spans = [
        AttemptSpan(attempt="a1", number=1, first_step=1),
        AttemptSpan(attempt="a2", number=2, resumed_from_step=5, first_step=6),
    ]
    series = {
        ("a1", "loss"): (8, [(s, 10.0 - s) for s in range(1, 9)]),
        ("a2", "loss"): (5, [(s, 5.0 - s / 10) for s in range(6, 11)]),
        ("a1", "lr"): (8, [(s, 0.1) for s in range(1, 9)]),
    }
    out = build_metrics(
        pipeline_id="p",
        stage="train",
        spans=spans,
        statuses={"a1": "failed"},
        series=series,
        max_points=1000,
        only=None,
    )
    assert out.keys == ["loss", "lr"]
    assert [(s.key, s.attempt) for s in out.series] == [("loss", "a1"), ("loss", "a2"), ("lr", "a1")]
    a1_loss = out.series[0]
    assert [p.step for p in a1_loss.points if p.rolled_back] == [6, 7, 8] and not a1_loss.downsampled
    assert out.attempts[0].rolled_back_from == 6 and out.attempts[0].status == "failed"
    assert out.effective is not None
    loss = next(e for e in out.effective if e.key == "loss")
    assert [(p.step, p.attempt) for p in loss.points] == [(s, 1) for s in range(1, 6)] + [(s, 2) for s in range(6, 11)]
    one = build_metrics(
        pipeline_id="p", stage="train", spans=spans, statuses={}, series=series, max_points=1000, only="a1"
    )
    assert one.effective is None and {s.attempt for s in one.series} == {"a1"}
    assert one.series[0].points[-1].rolled_back  # still marked against the later attempt


def test_pre_aggregated_buckets_are_merged_in_step_order_and_flag_downsampling() -> None:
    assert merge_buckets([(5, 1.0), (1, 3.0), (5, 1.0), (3, 2.0)]) == [(1, 3.0), (3, 2.0), (5, 1.0)]
    spans = [AttemptSpan(attempt="a", number=1, first_step=0)]
    out = build_metrics(
        pipeline_id="p",
        stage="s",
        spans=spans,
        statuses={},
        series={("a", "loss"): (1_000_000, [(0, 1.0), (500_000, 0.5), (999_999, 0.1)])},
        max_points=10,
        only=None,
    )
    assert out.series[0].downsampled and out.series[0].total_points == 1_000_000
    assert out.effective is not None and out.effective[0].downsampled


def test_parse_keys() -> None:
    assert parse_keys(None) is None and parse_keys(" , ") is None
    assert parse_keys("loss, lr,loss") == ["loss", "lr"]


def test_cursor_round_trips_and_refuses_garbage() -> None:
    cursor = StreamCursor(events=12, metrics=4501, logs=0)
    assert cursor.encode() == "e12.m4501.l0"
    assert decode_cursor(cursor.encode()) == cursor
    assert decode_cursor(None) == StreamCursor() and decode_cursor("  ") == StreamCursor()
    for bad in ("12", "e1.m2", "e-1.m2.l3", "e1.m2.l3.x", "x" * 100):
        with pytest.raises(BadRequest):
            decode_cursor(bad)
    assert decode_offset("41") == 41 and decode_offset(None) is None
    with pytest.raises(BadRequest):
        decode_offset("-3")


@given(st.integers(0, 10**17), st.integers(0, 10**17), st.integers(0, 10**17))
def test_cursor_round_trip_property(e: int, m: int, lg: int) -> None:
    cursor = StreamCursor(events=e, metrics=m, logs=lg)
    assert decode_cursor(cursor.encode()) == cursor


def test_telemetry_rows_check_the_contract_and_cut_long_lines() -> None:
    batch = MetricBatch(
        batch_id="b",
        pipeline_id="p",
        stage="train",
        attempt="a",
        recorded_at=T0,
        points=(MetricPoint(step=1, key="loss", value=0.5), MetricPoint(step=2, key="loss", value=0.4)),
    )
    rows = metric_rows(batch)
    assert [(r.step, r.key, r.value) for r in rows] == [(1, "loss", 0.5), (2, "loss", 0.4)]
    with pytest.raises(BadTelemetry):
        metric_rows(MetricBatch(batch_id="b", pipeline_id="", stage="s", attempt="a", recorded_at=T0, points=()))
    with pytest.raises(BadTelemetry):
        metric_rows(
            MetricBatch(
                batch_id="b",
                pipeline_id="p",
                stage="s",
                attempt="a",
                recorded_at=T0,
                points=(MetricPoint(step=-1, key="loss", value=1.0),),
            )
        )
    lines = log_rows(
        LogBatch(
            batch_id="b",
            pipeline_id="p",
            stage="s",
            attempt="a",
            recorded_at=T0,
            lines=(
                LogLine(offset=0, stream="stdout", text="x" * 50_000),
                LogLine(offset=1, stream="stderr", text="a\x00b"),
            ),
        )
    )
    assert len(lines[0].text) == MAX_LINE_CHARS and lines[0].text.endswith("cut]")
    assert lines[1].text == "a\ufffdb" and cut("short") == "short"


def test_prometheus_text() -> None:
    ops = OpsMetrics()
    ops.request("GET", "/api/v1/agents", 200, 0.003)
    ops.request("GET", "/api/v1/agents", 200, 0.2)
    ops.count("metric", "stored", 10)
    text = render(ops.families())
    assert 'verlyard_api_requests_total{method="GET",route="/api/v1/agents",status="200"} 2' in text
    assert 'verlyard_api_request_duration_seconds_bucket{method="GET",route="/api/v1/agents",le="0.005"} 1' in text
    assert 'verlyard_api_request_duration_seconds_bucket{method="GET",route="/api/v1/agents",le="+Inf"} 2' in text
    assert 'verlyard_api_telemetry_total{kind="metric",outcome="stored"} 10' in text
    assert "# TYPE verlyard_api_request_duration_seconds histogram" in text


def test_points_are_plain_structs() -> None:
    assert Point(step=1, value=None).rolled_back is False

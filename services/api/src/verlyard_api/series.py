"""Pure core: metric series across attempts: which steps a resume rolled back, the one effective curve,
and downsampling (largest-triangle-three-buckets) for long runs.

An attempt that resumed from a checkpoint at step `r` trained steps `r+1...` again, so every point an
EARLIER attempt recorded at a step above `r` was rolled back (its effect on the model is gone). An
attempt that started from scratch (no resume step) rolls back everything from its own first step.
The effective curve is, per key, every point that was not rolled back, the latest attempt winning a
step recorded twice: one clean curve across resumes (users.md, pain 11).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Final, TypeVar

import msgspec

DEFAULT_MAX_POINTS: Final = 1000
MIN_MAX_POINTS: Final = 3
"""LTTB keeps the first and last point and at least one in between."""


class AttemptSpan(msgspec.Struct, frozen=True, kw_only=True):
    """What the rolled-back rule needs to know of one attempt, in attempt order."""

    attempt: str
    number: int
    resumed_from_step: int | None = None
    first_step: int | None = None
    """The lowest step the attempt recorded (any key); None while it recorded nothing."""

    @property
    def rollback_from(self) -> int | None:
        """Points of earlier attempts at this step or above were rolled back by this attempt."""
        if self.resumed_from_step is not None:
            return self.resumed_from_step + 1
        return self.first_step


class Point(msgspec.Struct, frozen=True, kw_only=True):
    step: int
    value: float | None
    """None for a value JSON cannot carry (NaN, infinity)."""
    rolled_back: bool = False


class EffectivePoint(msgspec.Struct, frozen=True, kw_only=True):
    step: int
    value: float | None
    attempt: int
    """The number of the attempt this value comes from."""


P = TypeVar("P", Point, EffectivePoint)


def rollback_cutoffs(spans: Sequence[AttemptSpan]) -> dict[str, int | None]:
    """attempt -> the lowest step a LATER attempt rolled back (None: nothing of it was rolled back)."""
    cutoffs: dict[str, int | None] = {}
    lowest: int | None = None
    for span in reversed(spans):
        cutoffs[span.attempt] = lowest
        start = span.rollback_from
        if start is not None:
            lowest = start if lowest is None else min(lowest, start)
    return cutoffs


def is_rolled_back(step: int, cutoff: int | None) -> bool:
    return cutoff is not None and step >= cutoff


def json_value(value: float) -> float | None:
    return value if math.isfinite(value) else None


def mark(points: Sequence[tuple[int, float]], cutoff: int | None) -> list[Point]:
    """(step, value) pairs in step order -> points flagged `rolled_back` at or above `cutoff`."""
    return [Point(step=s, value=json_value(v), rolled_back=is_rolled_back(s, cutoff)) for s, v in points]


def effective_curve(series: Sequence[tuple[AttemptSpan, Sequence[Point]]]) -> list[EffectivePoint]:
    """One key's points of every attempt (in attempt order) -> the curve without rolled-back points;
    where two attempts kept the same step, the later attempt's value wins."""
    by_step: dict[int, EffectivePoint] = {}
    for span, points in series:
        for point in points:
            if not point.rolled_back:
                by_step[point.step] = EffectivePoint(step=point.step, value=point.value, attempt=span.number)
    return [by_step[step] for step in sorted(by_step)]


def lttb(xs: Sequence[float], ys: Sequence[float], threshold: int) -> list[int]:
    """Largest-triangle-three-buckets: the indices of at most `threshold` points that keep the shape of the
    curve (first and last always kept). `xs` ascending; NaN values count as 0 for the choice only."""
    n = len(xs)
    if threshold >= n or n <= 2:
        return list(range(n))
    threshold = max(threshold, MIN_MAX_POINTS)
    y = [v if math.isfinite(v) else 0.0 for v in ys]
    chosen = [0]
    every = (n - 2) / (threshold - 2)
    a = 0
    for i in range(threshold - 2):
        # The next bucket's average is the third corner of the triangle.
        next_start = int((i + 1) * every) + 1
        next_end = min(int((i + 2) * every) + 1, n)
        if next_start >= n:
            next_start, next_end = n - 1, n
        count = next_end - next_start
        avg_x = sum(xs[next_start:next_end]) / count
        avg_y = sum(y[next_start:next_end]) / count
        start = int(i * every) + 1
        end = int((i + 1) * every) + 1
        ax, ay = xs[a], y[a]
        best, best_area = start, -1.0
        for j in range(start, min(end, n - 1)):
            area = abs((ax - avg_x) * (y[j] - ay) - (ax - xs[j]) * (avg_y - ay))
            if area > best_area:
                best, best_area = j, area
        chosen.append(best)
        a = best
    chosen.append(n - 1)
    return chosen


def downsample(points: Sequence[P], max_points: int) -> list[P]:
    """At most `max_points` of `points` (step order), chosen by LTTB; rolled-back flags travel with them."""
    if len(points) <= max_points:
        return list(points)
    xs = [float(p.step) for p in points]
    ys = [p.value if p.value is not None else math.nan for p in points]
    return [points[i] for i in lttb(xs, ys, max_points)]


def merge_buckets(rows: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """Pre-aggregated (step, value) rows (each bucket's min and max, in any order) -> step order, one per step."""
    seen: dict[int, float] = {}
    for step, value in rows:
        seen.setdefault(step, value)
    return sorted(seen.items())


def bucket_count(max_points: int) -> int:
    """Buckets the database pre-aggregates a long series into (2 points each) before LTTB picks `max_points`."""
    return max(max_points, MIN_MAX_POINTS) * 2


def parse_keys(raw: str | None) -> list[str] | None:
    """`loss,lr` -> ["loss", "lr"]; None or empty -> None (every key)."""
    if raw is None:
        return None
    keys = sorted({k.strip() for k in raw.split(",") if k.strip()})
    return keys or None


# ---- the response -------------------------------------------------------------------------------------


class AttemptOut(msgspec.Struct, kw_only=True):
    id: str
    number: int
    status: str | None
    resumed_from_step: int | None
    first_step: int | None
    rolled_back_from: int | None
    """Steps at or above this were rolled back by a later attempt (null: none of its steps were)."""


class SeriesOut(msgspec.Struct, kw_only=True):
    key: str
    attempt: str
    number: int
    points: list[Point]
    total_points: int
    """Points recorded; `points` holds at most `max_points` of them."""
    downsampled: bool


class EffectiveOut(msgspec.Struct, kw_only=True):
    key: str
    points: list[EffectivePoint]
    downsampled: bool


class MetricsOut(msgspec.Struct, kw_only=True):
    pipeline_id: str
    stage: str
    keys: list[str]
    attempts: list[AttemptOut]
    series: list[SeriesOut]
    """One per (key, attempt), attempts in order."""
    effective: list[EffectiveOut] | None
    """One curve per key across attempts (rolled-back steps left out); null when one attempt was asked for."""
    max_points: int


def build_metrics(
    *,
    pipeline_id: str,
    stage: str,
    spans: Sequence[AttemptSpan],
    statuses: dict[str, str],
    series: Mapping[tuple[str, str], tuple[int, Sequence[tuple[int, float]]]],
    max_points: int,
    only: str | None,
) -> MetricsOut:
    """`series`: (attempt, key) -> (points recorded, (step, value) pairs in step order, maybe pre-aggregated).
    `spans`: every attempt of the stage in order (the rolled-back rule needs them all); `only`: the one
    attempt asked for, if any."""
    cutoffs = rollback_cutoffs(spans)
    keys = sorted({key for _, key in series})
    shown = [s for s in spans if only is None or s.attempt == only]
    out_series: list[SeriesOut] = []
    marked: dict[tuple[str, str], list[Point]] = {}
    for key in keys:
        for span in shown:
            entry = series.get((span.attempt, key))
            if entry is None:
                continue
            total, pairs = entry
            points = mark(pairs, cutoffs.get(span.attempt))
            marked[(span.attempt, key)] = points
            sampled = downsample(points, max_points)
            out_series.append(
                SeriesOut(
                    key=key,
                    attempt=span.attempt,
                    number=span.number,
                    points=sampled,
                    total_points=total,
                    downsampled=len(sampled) < total,
                )
            )
    effective: list[EffectiveOut] | None = None
    if only is None:
        effective = []
        for key in keys:
            curve = effective_curve([(s, marked[(s.attempt, key)]) for s in spans if (s.attempt, key) in marked])
            sampled_curve = downsample(curve, max_points)
            aggregated = any(
                len(series[(s.attempt, key)][1]) < series[(s.attempt, key)][0]
                for s in spans
                if (s.attempt, key) in series
            )
            effective.append(
                EffectiveOut(key=key, points=sampled_curve, downsampled=aggregated or len(sampled_curve) < len(curve))
            )
    return MetricsOut(
        pipeline_id=pipeline_id,
        stage=stage,
        keys=keys,
        attempts=[
            AttemptOut(
                id=s.attempt,
                number=s.number,
                status=statuses.get(s.attempt),
                resumed_from_step=s.resumed_from_step,
                first_step=s.first_step,
                rolled_back_from=cutoffs.get(s.attempt),
            )
            for s in spans
        ],
        series=out_series,
        effective=effective,
        max_points=max_points,
    )

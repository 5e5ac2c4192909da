"""Unit: the terminal plotter. Curves from the metrics endpoint's answer (the API's effective curve,
rolled-back points marked), braille and ASCII drawing, axis labels, and the choice of the loss key."""

from __future__ import annotations

import math
from typing import Any

from verlyard_shared.cli_plot import Curve, RolledBack, curves_from_api, loss_key, plot, plot_all


def metrics_body() -> dict[str, Any]:
    """Attempt 1 ran steps 1..8, attempt 2 resumed from the step-4 checkpoint and ran 5..10."""
    first = [{"step": s, "value": 10.0 - s, "rolled_back": s >= 5} for s in range(1, 9)]
    second = [{"step": s, "value": 9.5 - s, "rolled_back": False} for s in range(5, 11)]
    effective = [{"step": s, "value": 10.0 - s, "attempt": 1} for s in range(1, 5)]
    effective += [{"step": s, "value": 9.5 - s, "attempt": 2} for s in range(5, 11)]
    return {
        "pipeline_id": "p",
        "stage": "train",
        "keys": ["train/loss"],
        "attempts": [
            {
                "id": "a1",
                "number": 1,
                "status": "lost",
                "resumed_from_step": None,
                "first_step": 1,
                "rolled_back_from": 5,
            },
            {
                "id": "a2",
                "number": 2,
                "status": "running",
                "resumed_from_step": 4,
                "first_step": 5,
                "rolled_back_from": None,
            },
        ],
        "series": [
            {
                "key": "train/loss",
                "attempt": "a1",
                "number": 1,
                "points": first,
                "total_points": 8,
                "downsampled": False,
            },
            {
                "key": "train/loss",
                "attempt": "a2",
                "number": 2,
                "points": second,
                "total_points": 6,
                "downsampled": False,
            },
        ],
        "effective": [{"key": "train/loss", "points": effective, "downsampled": False}],
        "max_points": 1000,
    }


def test_curves_from_api_keep_the_effective_curve_and_mark_rolled_back_steps() -> None:
    curve = curves_from_api(metrics_body())["train/loss"]
    assert [s for s, _ in curve.points] == list(range(1, 11))
    assert curve.points[4] == (5, 4.5)  # step 5 comes from attempt 2
    assert curve.rolled_back == (RolledBack(attempt_number=1, first=5, last=8, by_attempt_number=2, resumed_from=4),)
    assert [s for s, _ in curve.superseded] == [5, 6, 7, 8]


def test_one_attempt_asked_for_gives_its_own_points() -> None:
    full = metrics_body()
    body = full | {"effective": None, "series": full["series"][:1]}
    curve = curves_from_api(body)["train/loss"]
    assert [s for s, _ in curve.points] == [1, 2, 3, 4] and len(curve.superseded) == 4


def test_non_finite_and_malformed_points_are_skipped() -> None:
    body = {
        "keys": ["k"],
        "series": [{"key": "k", "number": 1, "points": [{"step": 1, "value": None}, {"step": 2, "value": 3}, "x"]}],
        "effective": None,
    }
    assert curves_from_api(body)["k"].points == ((2, 3.0),)
    assert curves_from_api(["not", "a", "body"]) == {}


def test_braille_plot_has_axes_labels_marks_and_a_legend() -> None:
    lines = plot(curves_from_api(metrics_body())["train/loss"], width=40, height=6)
    assert lines[0] == "train/loss  (last -0.5 at step 10, min -0.5)"
    chart = lines[1:7]
    assert chart[0].startswith("   9 ┤") and chart[-1].startswith("-0.5 ┤")
    assert all(ord(c) >= 0x2800 for row in chart for c in row[6:] if c != " ")
    assert lines[7] == "     └" + "─" * 34
    marks = lines[8]
    assert set(marks.strip()) == {"x"} and marks.index("x") > 6
    assert lines[9].strip().startswith("step 1") and lines[9].rstrip().endswith("10")
    assert lines[10] == "  x: steps 5-8 of attempt 1 rolled back (attempt 2 resumed from step 4)"


def test_a_falling_curve_goes_from_the_top_left_to_the_bottom_right() -> None:
    curve = Curve(key="loss", points=tuple((s, math.exp(-s / 10)) for s in range(100)))
    lines = plot(curve, width=30, height=5, ascii_only=True)
    chart = [line.split("|", 1)[-1].split("+", 1)[-1] for line in lines[1:6]]
    assert chart[0].startswith("*") and not chart[-1].startswith("*") and chart[-1].rstrip().endswith("*")
    assert all(set(row) <= {"*", " "} for row in chart)


def test_a_flat_or_empty_curve_still_draws() -> None:
    assert plot(Curve(key="k", points=()), width=20) == ["k", "  (no points)"]
    flat = plot(Curve(key="k", points=((1, 2.0), (2, 2.0))), width=20, height=3, ascii_only=True)
    assert flat[2].endswith("*") or "*" in flat[2]


def test_plot_all_picks_the_loss_by_default_or_the_asked_keys() -> None:
    curves = {k: Curve(key=k, points=((1, 1.0), (2, 0.5))) for k in ("train/lr", "train/loss", "val/loss")}
    assert plot_all(curves, width=30, height=3)[0].startswith("train/loss")
    both = plot_all(curves, ["train/lr", "val/loss", "missing"], width=30, height=3)
    assert [line.split()[0] for line in both if line and not line.startswith((" ", "-", "0", "1"))][:2] == [
        "train/lr",
        "val/loss",
    ]
    assert loss_key(["a", "loss", "train/loss"]) == "loss"
    assert loss_key(["val/loss", "actor/pg_loss", "x"]) == "actor/pg_loss"
    assert loss_key(["x"]) is None

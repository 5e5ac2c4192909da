"""Pure core: metric curves for the terminal. One effective curve per key across attempts (a resumed
attempt replaces the steps it rolled back, which are marked), drawn with braille dots or plain ASCII."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from verlyard_shared.cli_render import fmt_number

# Braille cell: 2 columns x 4 rows of dots; bit of the dot at (column, row).
_BRAILLE_BASE: Final = 0x2800
_BRAILLE_BITS: Final = ((0x01, 0x02, 0x04, 0x40), (0x08, 0x10, 0x20, 0x80))


@dataclass(frozen=True, slots=True)
class RolledBack:
    """Steps `first..last` of `attempt` were redone by `by` (it resumed from an earlier checkpoint)."""

    attempt_number: int
    first: int
    last: int
    by_attempt_number: int
    resumed_from: int | None = None
    """The step whose checkpoint `by` resumed from (None when it is not known)."""


@dataclass(frozen=True, slots=True)
class Curve:
    key: str
    points: tuple[tuple[int, float], ...]
    """(step, value), one per step, from the attempt that counts for that step."""
    rolled_back: tuple[RolledBack, ...] = ()
    superseded: tuple[tuple[int, float], ...] = ()
    """The rolled-back points themselves (drawn as marks below the axis, not as the curve)."""


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def curves_from_api(body: Any) -> dict[str, Curve]:
    """The metrics endpoint's answer -> one curve per key.

    The API computes the effective curve across attempts (`effective`) and flags each attempt's
    rolled-back points (`series[].points[].rolled_back`, `attempts[].rolled_back_from`); this keeps its
    rule. When one attempt was asked for (`effective` is null), that attempt's points are the curve.
    """
    if not isinstance(body, Mapping):
        return {}
    attempts = [a for a in body.get("attempts") or [] if isinstance(a, Mapping)]
    starts: list[tuple[int, int | None, int | None]] = []
    for a in attempts:
        number, resumed, first = _int(a.get("number")), _int(a.get("resumed_from_step")), _int(a.get("first_step"))
        if number is not None:
            starts.append((number, resumed, resumed + 1 if resumed is not None else first))
    cutoff = {str(a.get("id")): _int(a.get("rolled_back_from")) for a in attempts}
    series = [e for e in body.get("series") or [] if isinstance(e, Mapping)]
    effective = body.get("effective")
    keys: list[str] = [str(k) for k in body.get("keys") or []] or sorted({str(e.get("key")) for e in series})
    curves: dict[str, Curve] = {}
    for key in keys:
        mine = [e for e in series if e.get("key") == key]
        superseded: list[tuple[int, float]] = []
        kept: list[tuple[int, float]] = []
        rolled: list[RolledBack] = []
        for entry in sorted(mine, key=lambda e: _int(e.get("number")) or 0):
            number = _int(entry.get("number")) or 0
            gone: list[tuple[int, float]] = []
            for p in entry.get("points") or []:
                if not isinstance(p, Mapping):
                    continue
                step, value = _int(p.get("step")), _number(p.get("value"))
                if step is None or value is None:
                    continue
                (gone if p.get("rolled_back") else kept).append((step, value))
            if gone:
                superseded.extend(gone)
                first = cutoff.get(str(entry.get("attempt"))) or min(s for s, _ in gone)
                last = max(s for s, _ in gone)
                by = next(
                    ((n, r) for n, r, start in sorted(starts) if n > number and start is not None and start <= last),
                    None,
                )
                rolled.append(RolledBack(number, first, last, by[0] if by else number + 1, by[1] if by else None))
        if isinstance(effective, list):
            chosen = next((e for e in effective if isinstance(e, Mapping) and e.get("key") == key), None)
            kept = []
            for p in (chosen or {}).get("points") or []:
                if isinstance(p, Mapping):
                    step, value = _int(p.get("step")), _number(p.get("value"))
                    if step is not None and value is not None:
                        kept.append((step, value))
        by_step = dict(sorted(kept))
        curves[key] = Curve(
            key=key,
            points=tuple(sorted(by_step.items())),
            rolled_back=tuple(rolled),
            superseded=tuple(sorted(superseded)),
        )
    return curves


def loss_key(keys: Iterable[str]) -> str | None:
    """The key that is "the loss": `loss`, else `train/loss`, else the first key ending in `loss`."""
    keys = list(keys)
    for wanted in ("loss", "train/loss"):
        if wanted in keys:
            return wanted
    candidates = sorted(k for k in keys if k.endswith("loss") and not k.startswith("val"))
    return candidates[0] if candidates else None


# ---- drawing ---------------------------------------------------------------------------------------------


def _scale(value: float, low: float, high: float, size: int) -> int:
    if high == low:
        return size // 2
    return min(size - 1, max(0, round((value - low) / (high - low) * (size - 1))))


def _line(x0: int, y0: int, x1: int, y1: int) -> Iterable[tuple[int, int]]:
    """Bresenham: the dots joining two dots, ends included."""
    dx, dy = abs(x1 - x0), -abs(y1 - y0)
    sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
    err = dx + dy
    while True:
        yield x0, y0
        if x0 == x1 and y0 == y1:
            return
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x0 += sx
        if e2 <= dx:
            err += dx
            y0 += sy


def plot(curve: Curve, *, width: int = 72, height: int = 12, ascii_only: bool = False) -> list[str]:
    """The curve as text lines: a title, the chart with a y axis, an x axis of steps, and the marks of
    rolled-back steps (`x` under the axis) with a legend."""
    title = f"{curve.key}"
    if not curve.points:
        return [title, "  (no points)"]
    steps = [s for s, _ in curve.points]
    values = [v for _, v in curve.points]
    all_steps = steps + [s for s, _ in curve.superseded]
    x_low, x_high = min(all_steps), max(all_steps)
    y_low, y_high = min(values), max(values)
    top, bottom = fmt_number(y_high), fmt_number(y_low)
    label_w = max(len(top), len(bottom))
    cols = max(8, width - label_w - 2)
    rows = max(3, height)
    dots_x, dots_y = (cols, rows) if ascii_only else (cols * 2, rows * 4)
    grid = [[0] * cols for _ in range(rows)]
    previous: tuple[int, int] | None = None
    for step, value in curve.points:
        x = _scale(step, x_low, x_high, dots_x)
        y = dots_y - 1 - _scale(value, y_low, y_high, dots_y)
        segment = _line(*previous, x, y) if previous is not None else [(x, y)]
        for px, py in segment:
            if ascii_only:
                grid[py][px] = 1
            else:
                grid[py // 4][px // 2] |= _BRAILLE_BITS[px % 2][py % 4]
        previous = (x, y)
    lines = [f"{title}  (last {fmt_number(values[-1])} at step {steps[-1]}, min {fmt_number(y_low)})"]
    for r in range(rows):
        label = top if r == 0 else bottom if r == rows - 1 else ""
        axis = "┤" if r in (0, rows - 1) else "│"
        if ascii_only:
            axis = "+" if r in (0, rows - 1) else "|"
            cells = "".join("*" if c else " " for c in grid[r])
        else:
            cells = "".join(chr(_BRAILLE_BASE + c) if c else " " for c in grid[r])
        lines.append(f"{label.rjust(label_w)} {axis}{cells.rstrip()}")
    corner, dash = ("+", "-") if ascii_only else ("└", "─")
    lines.append(" " * label_w + " " + corner + dash * cols)
    if curve.rolled_back:
        marks = [" "] * cols
        for rb in curve.rolled_back:
            for c in range(_scale(rb.first, x_low, x_high, cols), _scale(rb.last, x_low, x_high, cols) + 1):
                marks[c] = "x"
        lines.append(" " * (label_w + 2) + "".join(marks).rstrip())
    left, right = f"step {x_low}", f"{x_high}"
    lines.append(" " * (label_w + 2) + left + right.rjust(max(1, cols - len(left))))
    for rb in curve.rolled_back:
        how = f"resumed from step {rb.resumed_from}" if rb.resumed_from is not None else f"restarted at {rb.first}"
        lines.append(
            f"  x: steps {rb.first}-{rb.last} of attempt {rb.attempt_number} rolled back "
            f"(attempt {rb.by_attempt_number} {how})"
        )
    return lines


def plot_all(
    curves: Mapping[str, Curve],
    keys: Sequence[str] | None = None,
    *,
    width: int = 72,
    height: int = 12,
    ascii_only: bool = False,
) -> list[str]:
    """One chart per key (the loss first when no keys are asked for), separated by a blank line."""
    if keys:
        chosen = [k for k in keys if k in curves]
    else:
        main = loss_key(curves)
        chosen = [main] if main is not None else sorted(curves)[:1]
    lines: list[str] = []
    for key in chosen:
        if lines:
            lines.append("")
        lines.extend(plot(curves[key], width=width, height=height, ascii_only=ascii_only))
    return lines

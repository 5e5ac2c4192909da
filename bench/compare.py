"""Bench (edge): diff two result files so a regression is visible: `python -m bench.compare OLD NEW`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _flatten(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        out[prefix] = float(value)


def compare(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, float, float, float]]:
    """(figure, old, new, change in %) for every numeric summary figure present in both files."""
    a: dict[str, float] = {}
    b: dict[str, float] = {}
    _flatten("", old.get("summary", {}), a)
    _flatten("", new.get("summary", {}), b)
    rows = []
    for key in sorted(a.keys() & b.keys()):
        change = (b[key] - a[key]) / a[key] * 100 if a[key] else float("nan")
        rows.append((key, a[key], b[key], change))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path)
    parser.add_argument("--threshold", type=float, default=20.0, help="flag changes beyond this many percent")
    args = parser.parse_args(argv)
    old, new = json.loads(args.old.read_text()), json.loads(args.new.read_text())
    print(f"{old.get('name')}: {old.get('date')} -> {new.get('date')}")
    for key, a, b, change in compare(old, new):
        flag = "  <--" if abs(change) > args.threshold else ""
        print(f"{key:60s} {a:12.3f} {b:12.3f} {change:+8.1f}%{flag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

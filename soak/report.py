"""Soak report (edge): `python -m soak.report` prints the markdown table of soak/results/*.json that
docs/reliability.md carries (one row per scenario: counts, then each bar with its measurement)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"
ORDER = ["T1", "T2", "T6", "T7", "T7N", "T7P", "T8", "T14", "T15", "MIX"]


def _load() -> list[dict[str, Any]]:
    docs = [json.loads(p.read_text()) for p in RESULTS_DIR.glob("*.json")]
    return sorted(docs, key=lambda d: ORDER.index(d["scenario"]) if d["scenario"] in ORDER else 99)


def table(docs: list[dict[str, Any]]) -> str:
    lines = [
        "| scenario | date (UTC) | pipelines / faults | slots | max in flight | attempted / acknowledged / completed "
        "| lost | duplicated | unexpected | stale rejected | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d in docs:
        v, p = d["verdict"], d["parameters"]
        lines.append(
            f"| {d['scenario']} | {d['date'][:16].replace('T', ' ')} | {p['pipelines']} / {len(d['run']['faults'])} "
            f"| {d['run'].get('agents', 2)} x {p.get('slots', 4)} | {v.get('max_in_flight', '?')} "
            f"| {v['attempted']} / {v['acknowledged']} / {v['completed']} | {v['lost']} | {v['duplicated']} "
            f"| {v['unexpected']} | {v['stale_reports_rejected']} | {d['run']['wall_s']} s |"
        )
    lines += ["", "| scenario | bar | target | measured | |", "|---|---|---|---|---|"]
    for d in docs:
        for b in d["bars"]:
            if b["what"] in ("lost", "duplicated", "unexpected", "completed"):
                continue
            mark = {True: "PASS", False: "MISS", None: "-"}[b["passed"]]
            lines.append(f"| {d['scenario']} | {b['what']} | {b['target']} | {b['measured']} | {mark} |")
    return "\n".join(lines)


def main() -> int:
    docs = _load()
    if not docs:
        print("no results in soak/results: run `make soak` first", file=sys.stderr)
        return 1
    machine = docs[0]["machine"]
    cores, model = machine["cpu_count"], machine["cpu_model"]
    print(f"Machine: {cores} cores ({model}), {machine['platform']}, Python {machine['python']}.")
    print()
    print(table(docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

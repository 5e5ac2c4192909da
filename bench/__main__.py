"""Bench entry point (edge): `python -m bench [--only W1,W3] [--quick]` runs the workloads on one stack."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from types import ModuleType

from bench import a1, h1, l1, r1, w1, w2, w3, w4, w5
from bench.harness import Client, Result, Stack, machine_info, write_result

# Run order: the sequential latency runs first on a quiet stack, the bursts last (they leave load behind).
WORKLOADS: dict[str, ModuleType] = {
    "A1": a1,
    "L1": l1,
    "W1": w1,
    "W2": w2,
    "W3": w3,
    "W5": w5,
    "W4": w4,
    "H1": h1,
    "R1": r1,
}
NOT_IMPLEMENTED: dict[str, str] = {}


def _table(results: list[Result]) -> str:
    rows = [("name", "check", "target", "measured", "")]
    for r in results:
        for c in r.checks:
            rows.append((r.name, c.what, c.target, c.measured, {True: "PASS", False: "MISS", None: "-"}[c.passed]))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


async def _main(names: list[str], quick: bool, slots: int) -> int:
    machine = machine_info()
    python = a1.trainer_python()
    stack = Stack(agent_slots=slots, extra_env={"VERLYARD_TRAINER_PYTHON": python} if python else None)
    results: list[Result] = []
    try:
        print(f"starting verlyard up in {stack.home} on port {stack.port} (agent slots {slots})", flush=True)
        stack.start()
        client = Client(stack)
        try:
            for name in names:
                t0 = time.perf_counter()
                print(f"running {name} ...", flush=True)
                result = await WORKLOADS[name].run(client, quick)
                result.parameters["agent_slots"] = slots
                path = write_result(result, machine, quick)
                results.append(result)
                print(f"  {name} done in {time.perf_counter() - t0:.1f} s -> {path}", flush=True)
        finally:
            await client.aclose()
    except Exception:
        print(stack.console(), file=sys.stderr)
        raise
    finally:
        stack.close()
    print()
    print(_table(results))
    for r in results:
        for note in r.notes:
            print(f"  {r.name}: {note}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="verlyard benchmarks (issue 8)")
    parser.add_argument("--only", default="", help="comma-separated workloads, e.g. W1,W3 (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller counts and shorter runs")
    parser.add_argument("--agent-slots", type=int, default=64, help="CPU slots of the local agent")
    args = parser.parse_args(argv)
    names = [n.strip().upper() for n in args.only.split(",") if n.strip()] or list(WORKLOADS)
    for n in names:
        if n in NOT_IMPLEMENTED:
            parser.error(f"{n} ({NOT_IMPLEMENTED[n]}) is not implemented yet")
        if n not in WORKLOADS:
            parser.error(f"unknown workload {n}; known: {', '.join(WORKLOADS)}")
    names = [n for n in WORKLOADS if n in names]
    return asyncio.run(_main(names, args.quick, args.agent_slots))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Deploy: container health probe for the verlyard images (stdlib only, so it runs in any of them).

Usage:
  verlyard-healthcheck http URL            healthy if GET URL answers 2xx within 3 s
  verlyard-healthcheck process SUBCOMMAND  healthy if a `verlyard SUBCOMMAND` process is alive and
                                           neither a zombie nor stopped (SIGSTOP, a debugger)

The scheduler and the agent serve no HTTP, so their probe looks at the process itself: a container
whose `verlyard` was frozen or left a zombie behind an init must be reported, not kept as healthy.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

# Process states that mean "not doing work": zombie, stopped, traced-stopped, dead.
_BAD_STATES = frozenset("ZTtXx")


def _state(stat: str) -> str:
    # /proc/PID/stat is "pid (comm) state ...": comm may hold spaces and parentheses, so split at the last ')'.
    return stat[stat.rfind(")") + 2 :][:1]


def _runs(argv: list[str], subcommand: str) -> bool:
    """True if argv is `[python] .../verlyard SUBCOMMAND ...` (a console script runs under its interpreter)."""
    for i, arg in enumerate(argv[:-1]):
        if (arg == "verlyard" or arg.endswith("/verlyard")) and argv[i + 1] == subcommand:
            return True
    return False


def process_healthy(subcommand: str, proc: Path = Path("/proc")) -> bool:
    """Whether some live process runs `verlyard SUBCOMMAND` (and none of those found is frozen)."""
    found = False
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        if not _runs([a.decode(errors="replace") for a in argv if a], subcommand):
            continue
        if _state(stat) in _BAD_STATES:
            return False
        found = True
    return found


def http_healthy(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # a fixed local URL from the image
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("http", "process"):
        print(__doc__, file=sys.stderr)
        return 2
    mode, target = argv
    healthy = http_healthy(target) if mode == "http" else process_healthy(target)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

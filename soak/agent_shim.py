"""Edge (soak only): `python -m soak.agent_shim <verlyard agent args>` runs the real agent with one
injectable fault: a RunStage whose stage has `with: {x-soak-poison: true}` makes the agent's command
handler raise on every delivery (T15's "a command whose handler always fails").

The fault lives here, not in the agent: production code has no failpoints. Everything else is the
unmodified `verlyard agent`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from verlyard_agent.agent import Agent
from verlyard_agent.consumer import Verdict
from verlyard_shared.cli import main as cli_main
from verlyard_shared.commands import RunStage


class InjectedPoison(RuntimeError):
    """The soak's deliberate handler failure."""


def install() -> None:
    original = Agent._on_run

    def on_run(self: Agent, command: RunStage) -> Verdict:
        if command.spec.params.get("x-soak-poison"):
            raise InjectedPoison(f"soak: injected handler failure for {command.stage}")
        return original(self, command)

    Agent._on_run = on_run  # type: ignore[method-assign]


def main(argv: Sequence[str] | None = None) -> int:
    install()
    return cli_main(["agent", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

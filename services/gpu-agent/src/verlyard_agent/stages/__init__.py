"""Stage kinds: one module per kind, each `async def run(ctx: AttemptContext) -> StageResult`.

`resolve(kind)` imports the kind's module lazily, so an agent without a kind's module (or a kind
that needs something this host lacks) still runs every other kind; the attempt of a missing kind
fails with a clear "not available on this agent" error of class `infra` (retried elsewhere).
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from verlyard_agent.stages.base import AttemptContext, StageFailure, StageResult
from verlyard_shared.spec import WITH_EXTENSION_PREFIX, WITH_KEYS

RunFn = Callable[[AttemptContext], Awaitable[StageResult]]

MODULES: dict[str, str] = {
    "noop": "verlyard_agent.stages.noop",
    "command": "verlyard_agent.stages.command",
    "preprocess": "verlyard_agent.stages.preprocess",
    "cleanup": "verlyard_agent.stages.cleanup",
    # The training kinds: modules of their own (they build verl's command lines and tail its metrics).
    "train": "verlyard_agent.stages.train",
    "evaluate": "verlyard_agent.stages.evaluate",
    "export": "verlyard_agent.stages.export",
}


def ignored_params(kind: str, params: Mapping[str, Any]) -> list[str]:
    """The `with:` keys of `params` that the kind does not read (`spec.WITH_KEYS`, which the API's
    validation enforces and tests/unit/test_examples.py checks against each kind's source): only a spec
    submitted before the API refused such keys still carries them. `x-` keys are the user's own."""
    known = WITH_KEYS.get(kind, frozenset())
    return sorted(k for k in params if k not in known and not k.startswith(WITH_EXTENSION_PREFIX))


def resolve(kind: str) -> RunFn:
    """The `run` function of a stage kind, or StageFailure saying why this agent cannot run it."""
    module_name = MODULES.get(kind)
    if module_name is None:
        raise StageFailure(f"unknown stage kind {kind!r} (known: {', '.join(sorted(MODULES))})", failure_class="user")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise
        raise StageFailure(
            f"stage kind {kind!r} is not available on this agent (module {module_name} is not installed)",
            failure_class="infra",
        ) from None
    run = getattr(module, "run", None)
    if not callable(run):
        raise StageFailure(f"stage kind {kind!r}: {module_name} has no run(ctx) function", failure_class="infra")
    return run  # type: ignore[no-any-return]

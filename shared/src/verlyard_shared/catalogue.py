"""Contracts: the catalogue of every wire type, rendered as docs/events.md (a test keeps them in sync)."""

from __future__ import annotations

import msgspec

from verlyard_shared.commands import COMMAND_TYPES
from verlyard_shared.events import EVENT_TYPES
from verlyard_shared.reports import REPORT_TYPES
from verlyard_shared.telemetry import TELEMETRY_TYPES

SECTIONS: tuple[tuple[str, str, tuple[type[msgspec.Struct], ...]], ...] = (
    ("Events", "Appended to Postgres, published by the relay on `vy.evt.<stream>.<type>`.", EVENT_TYPES),
    ("Commands", "Scheduler → one agent, on `vy.cmd.<agent>.<kind>` (work queue).", COMMAND_TYPES),
    (
        "Reports",
        "Agent → scheduler, on `vy.rpt.<agent>.<kind>` (work queue). Headers on every message the agent"
        " publishes from its journal (reports and telemetry): `Nats-Msg-Id` (the report's or batch's id, for"
        " JetStream's duplicate window) and `Vy-Burst-Left` (how many more messages the agent launched right"
        " behind this one; the scheduler's report inbox waits up to 50 ms for an announced rest, so a quick"
        " stage's accepted, started and finished are committed together; ADR 0019).",
        REPORT_TYPES,
    ),
    ("Telemetry", "Agent → API, on `vy.met.<pipeline>.<stage>` and `vy.log.<pipeline>.<stage>`.", TELEMETRY_TYPES),
)


def tag_of(cls: type[msgspec.Struct]) -> str:
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str), f"{cls.__name__} has no explicit string tag"
    return tag


def _fields(cls: type[msgspec.Struct]) -> str:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    parts: list[str] = []
    for field in info.fields:
        optional = "" if field.required else "?"
        parts.append(f"`{field.name}{optional}`")
    return ", ".join(parts)


def render_markdown() -> str:
    """The full text of docs/events.md."""
    lines = [
        "# The verlyard wire catalogue",
        "",
        "Generated from `verlyard_shared` by `python -m verlyard_shared.catalogue > docs/events.md`;",
        "`tests/unit/test_contracts.py` fails when this file and the code disagree. Tags are public and",
        "never change meaning; fields are only ever added, with defaults (`?` marks an optional field).",
        "Every event travels in an envelope: `position`, `event_id`, `stream_id`, `version`, `recorded_at`,",
        "`actor`, `correlation_id`, `causation_id`, `schema_version` (docs/architecture.md).",
        "",
    ]
    for title, where, types in SECTIONS:
        lines += [f"## {title}", "", where, "", "| tag | struct | fields |", "|---|---|---|"]
        for cls in types:
            lines.append(f"| `{tag_of(cls)}` | `{cls.__name__}` | {_fields(cls)} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_markdown(), end="")

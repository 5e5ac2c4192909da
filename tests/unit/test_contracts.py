"""Unit: every wire type has a unique explicit tag, is frozen and keyword-only, and round-trips."""

from __future__ import annotations

import inspect
from pathlib import Path

import msgspec
import pytest

from verlyard_shared import codec
from verlyard_shared.catalogue import SECTIONS, render_markdown, tag_of
from verlyard_shared.commands import COMMAND_TYPES
from verlyard_shared.envelope import Envelope
from verlyard_shared.events import EVENT_TYPES, AnyEvent, StagePlaced, event_type
from verlyard_shared.reports import REPORT_TYPES
from verlyard_shared.telemetry import TELEMETRY_TYPES
from verlyard_shared.testing.samples import FIXED_TIME, sample

ROOT = Path(__file__).resolve().parents[2]
ALL_TYPES = [cls for _, _, types in SECTIONS for cls in types]


def test_every_tag_is_unique_across_all_wire_types() -> None:
    tags = [tag_of(cls) for cls in ALL_TYPES]
    assert len(tags) == len(set(tags)), sorted(t for t in tags if tags.count(t) > 1)


@pytest.mark.parametrize("cls", ALL_TYPES, ids=lambda c: c.__name__)
def test_every_type_is_frozen_keyword_only_and_explicitly_tagged(cls: type[msgspec.Struct]) -> None:
    config = cls.__struct_config__
    assert config.frozen, f"{cls.__name__} must be frozen"
    assert config.tag_field == "type"
    assert isinstance(config.tag, str) and config.tag != cls.__name__, "tags are explicit, never the class name"
    kinds = {p.kind for p in inspect.signature(cls).parameters.values()}
    assert kinds <= {inspect.Parameter.KEYWORD_ONLY}, f"{cls.__name__} has positional fields"


@pytest.mark.parametrize("cls", EVENT_TYPES, ids=lambda c: c.__name__)
def test_events_round_trip_through_the_codec(cls: type[msgspec.Struct]) -> None:
    event = sample(cls)
    assert codec.decode_event(codec.encode(event)) == event


@pytest.mark.parametrize("cls", COMMAND_TYPES, ids=lambda c: c.__name__)
def test_commands_round_trip(cls: type[msgspec.Struct]) -> None:
    command = sample(cls)
    assert codec.decode_command(codec.encode(command)) == command


@pytest.mark.parametrize("cls", REPORT_TYPES, ids=lambda c: c.__name__)
def test_reports_round_trip(cls: type[msgspec.Struct]) -> None:
    report = sample(cls)
    assert codec.decode_report(codec.encode(report)) == report


@pytest.mark.parametrize("cls", TELEMETRY_TYPES, ids=lambda c: c.__name__)
def test_telemetry_round_trips(cls: type[msgspec.Struct]) -> None:
    batch = sample(cls)
    assert codec.decode_telemetry(codec.encode(batch)) == batch


def _envelope(event: AnyEvent) -> Envelope:
    return Envelope(
        position=42,
        event_id="e-1",
        stream_id="pipeline-p1",
        version=3,
        recorded_at=FIXED_TIME,
        actor="user:alice",
        correlation_id="c-1",
        causation_id="e-0",
        event=event,
    )


def test_envelope_round_trips_and_keeps_its_metadata() -> None:
    envelope = _envelope(sample(StagePlaced))
    assert codec.decode_envelope(codec.encode(envelope)) == envelope


def test_public_shape_is_flat_with_type_and_data_without_the_tag() -> None:
    public = codec.to_public(_envelope(sample(StagePlaced)))
    assert set(public) >= {
        "position",
        "event_id",
        "stream_id",
        "version",
        "type",
        "recorded_at",
        "actor",
        "correlation_id",
        "causation_id",
        "data",
    }
    assert public["type"] == "stage.placed"
    assert "type" not in public["data"]
    assert {"stage", "attempt", "agent"} <= set(public["data"])


def test_unknown_tag_is_a_clear_decode_error() -> None:
    with pytest.raises(msgspec.ValidationError, match=r"Invalid value 'stage\.exploded'"):
        codec.decode_event(b'{"type": "stage.exploded", "stage": "x"}')


def test_public_lifecycle_tags_from_the_interface_exist() -> None:
    public = {
        "pipeline.submitted",
        "pipeline.cancel_requested",
        "pipeline.retry_requested",
        "pipeline.succeeded",
        "pipeline.failed",
        "pipeline.cancelled",
        "stage.placed",
        "attempt.started",
        "checkpoint.saved",
        "stage.succeeded",
        "stage.failed",
        "stage.skipped",
        "stage.cancelled",
        "attempt.lost",
        "report.rejected",
    }
    assert public <= {tag_of(cls) for cls in EVENT_TYPES}


@pytest.mark.parametrize("cls", EVENT_TYPES, ids=lambda c: c.__name__)
def test_stage_events_name_their_stage_and_attempt_events_their_attempt(cls: type[msgspec.Struct]) -> None:
    names = set(cls.__struct_fields__)
    tag = tag_of(cls)
    if tag.startswith("stage.") or tag.startswith("attempt.") or tag == "checkpoint.saved":
        assert "stage" in names
    if tag.startswith("attempt.") or tag in ("checkpoint.saved", "stage.placed", "stage.succeeded", "stage.failed"):
        assert "attempt" in names
    assert event_type(sample(cls)) == tag  # type: ignore[arg-type]


def test_docs_events_md_matches_the_code() -> None:
    on_disk = (ROOT / "docs" / "events.md").read_text()
    assert on_disk == render_markdown(), "run: python -m verlyard_shared.catalogue > docs/events.md"

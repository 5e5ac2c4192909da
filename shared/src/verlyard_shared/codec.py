"""Contracts: the one codec. Typed decoders are built once, at import; decode at the edge only."""

from __future__ import annotations

from typing import Any

import msgspec

from verlyard_shared.commands import AnyCommand
from verlyard_shared.envelope import Envelope
from verlyard_shared.events import AnyEvent, event_type
from verlyard_shared.reports import AnyReport
from verlyard_shared.telemetry import AnyTelemetry

_encoder = msgspec.json.Encoder()
_event_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)
_envelope_decoder: msgspec.json.Decoder[Envelope] = msgspec.json.Decoder(Envelope)
_command_decoder: msgspec.json.Decoder[AnyCommand] = msgspec.json.Decoder(AnyCommand)
_report_decoder: msgspec.json.Decoder[AnyReport] = msgspec.json.Decoder(AnyReport)
_telemetry_decoder: msgspec.json.Decoder[AnyTelemetry] = msgspec.json.Decoder(AnyTelemetry)

DecodeError = msgspec.DecodeError
ValidationError = msgspec.ValidationError


def encode(value: object) -> bytes:
    """JSON bytes of any contract Struct (tags included)."""
    return _encoder.encode(value)


def decode_event(data: bytes | str) -> AnyEvent:
    return _event_decoder.decode(data)


def decode_envelope(data: bytes | str) -> Envelope:
    return _envelope_decoder.decode(data)


def decode_command(data: bytes | str) -> AnyCommand:
    return _command_decoder.decode(data)


def decode_report(data: bytes | str) -> AnyReport:
    return _report_decoder.decode(data)


def decode_telemetry(data: bytes | str) -> AnyTelemetry:
    return _telemetry_decoder.decode(data)


def event_data(event: AnyEvent) -> dict[str, Any]:
    """The event's fields as plain JSON data, without its `type` tag."""
    data: dict[str, Any] = msgspec.to_builtins(event)
    data.pop("type", None)
    return data


def to_public(envelope: Envelope) -> dict[str, Any]:
    """The public audit shape (interface.md): flat metadata, `type`, and `data` without the tag."""
    return {
        "position": envelope.position,
        "event_id": envelope.event_id,
        "stream_id": envelope.stream_id,
        "version": envelope.version,
        "type": event_type(envelope.event),
        "recorded_at": envelope.recorded_at.isoformat(),
        "actor": envelope.actor,
        "correlation_id": envelope.correlation_id,
        "causation_id": envelope.causation_id,
        "schema_version": envelope.schema_version,
        "data": event_data(envelope.event),
    }

"""Pure core: decide what one `append_many` call does, so the in-memory and Postgres stores agree.

Given the requests, what is already stored under their event ids and the streams' current versions,
each request either appends fresh events (from a known first version), is a retry of an earlier
append (its original result, `duplicate=True`), or the whole call is refused with a typed error.
"""

# pyright: strict, reportMissingTypeStubs=false

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from verlyard_shared.store.port import (
    ANY,
    AppendRequest,
    AppendResult,
    DuplicateEventId,
    WrongExpectedVersion,
)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """What the plan needs to know about an event id that is already stored."""

    stream_id: str
    version: int
    position: int
    content: object
    """The event as plain JSON data (decoded from its stored encoding), compared with the retry's."""


@dataclass(frozen=True, slots=True)
class Fresh:
    """Store this request's events as versions first_version, first_version + 1, ..."""

    first_version: int


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Every event of this request is already stored, in place: answer with the original result."""

    result: AppendResult


Step = Fresh | Duplicate


def plan_appends(
    requests: Sequence[AppendRequest],
    *,
    stored: Mapping[str, StoredEvent],
    versions: Mapping[str, int],
    contents: Sequence[Sequence[object]],
) -> list[Step]:
    """One step per request, in order; raises WrongExpectedVersion or DuplicateEventId for the whole call.

    `stored` maps the call's event ids that already exist to where they are; `versions` holds the
    current version of every stream the call names (absent = 0); `contents[i][j]` is the plain JSON
    data of `requests[i].events[j]`.
    """
    seen: set[str] = set()
    for request in requests:
        if not request.events:
            raise ValueError(f"an append to {request.stream_id!r} needs at least one event")
        if request.expected_version < ANY:
            raise ValueError(f"expected_version {request.expected_version} is neither ANY (-1) nor a version >= 0")
        for new in request.events:
            if new.event_id in seen:
                raise DuplicateEventId(new.event_id)
            seen.add(new.event_id)

    running = dict(versions)
    steps: list[Step] = []
    for index, request in enumerate(requests):
        known = [stored.get(new.event_id) for new in request.events]
        if all(entry is None for entry in known):
            current = running.get(request.stream_id, 0)
            if request.expected_version not in (ANY, current):
                raise WrongExpectedVersion(request.stream_id, request.expected_version, current)
            steps.append(Fresh(first_version=current + 1))
            running[request.stream_id] = current + len(request.events)
            continue
        steps.append(Duplicate(result=_original(request, known, contents[index])))
    return steps


def _original(request: AppendRequest, known: list[StoredEvent | None], contents: Sequence[object]) -> AppendResult:
    """The result of the append this request retries, or DuplicateEventId when it is not a faithful retry."""
    first = known[0]
    for offset, (new, entry) in enumerate(zip(request.events, known, strict=True)):
        if (
            first is None
            or entry is None
            or entry.stream_id != request.stream_id
            or entry.version != first.version + offset
            or entry.content != contents[offset]
        ):
            raise DuplicateEventId(new.event_id if entry is not None else _first_known(request, known))
    last = known[-1]
    assert first is not None and last is not None
    return AppendResult(
        stream_id=request.stream_id,
        first_version=first.version,
        last_version=last.version,
        first_position=first.position,
        last_position=last.position,
        duplicate=True,
    )


def _first_known(request: AppendRequest, known: list[StoredEvent | None]) -> str:
    for new, entry in zip(request.events, known, strict=True):
        if entry is not None:
            return new.event_id
    raise AssertionError("called only when some event id is known")

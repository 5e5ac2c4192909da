"""Pure core: decide what a submit, cancel or retry command appends, from the pipeline's current state.

Each function returns the events to append (possibly none: an idempotent no-op) or raises a typed
`ApiError` (404 unknown pipeline, 409 a state that forbids the command, 422 a bad argument). Ids and
reasons are parameters; the caller loads the state and appends with the state's version.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from typing import Final

import msgspec

from verlyard_api.errors import BadRequest, Conflict, NotFound
from verlyard_api.projector import retry_targets
from verlyard_api.views import RETRYABLE_STAGE_STATUSES, PipelineView
from verlyard_shared.envelope import NewEvent
from verlyard_shared.events import PipelineCancelRequested, PipelineRetryRequested, PipelineSubmitted
from verlyard_shared.spec import PipelineSpec

IDEMPOTENCY_NAMESPACE: Final = uuid.UUID("5b0e7c52-6f6e-4d5e-9a57-76657260796b")
"""uuid5 namespace of ids derived from an Idempotency-Key (fixed forever: changing it breaks replays)."""
IDEMPOTENCY_KEY_RE: Final = re.compile(r"[\x21-\x7e]{1,255}")
"""Printable ASCII without spaces, 1 to 255 characters (UUIDs, ULIDs, hashes, `job-42`, ...)."""


class Submit(msgspec.Struct, frozen=True, kw_only=True):
    """A validated submission: the spec, where it goes and how a retry of the same request is recognised."""

    pipeline_id: str
    event_id: str
    spec: PipelineSpec
    idempotency_key: str | None
    body_sha256: str


class Append(msgspec.Struct, frozen=True, kw_only=True):
    """Append `event` to a new stream (201 Created)."""

    event: NewEvent


class Replay(msgspec.Struct, frozen=True, kw_only=True):
    """The same request was accepted before: answer with that pipeline (200 OK), append nothing."""

    pipeline_id: str


def check_idempotency_key(key: str) -> str:
    if not IDEMPOTENCY_KEY_RE.fullmatch(key):
        raise BadRequest(
            "the Idempotency-Key header must be 1 to 255 printable ASCII characters without spaces",
            code="invalid_idempotency_key",
        )
    return key


def idempotent_ids(scope: str, key: str) -> tuple[str, str]:
    """`(pipeline id, event id)` derived from a key, scoped by the caller (two tokens may use the same key)."""
    pipeline_id = uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"pipeline\x00{scope}\x00{key}")
    event_id = uuid.uuid5(IDEMPOTENCY_NAMESPACE, f"pipeline.submitted\x00{scope}\x00{key}")
    return str(pipeline_id), str(event_id)


def decide_submit(existing: PipelineSubmitted | None, command: Submit) -> Append | Replay:
    """A new pipeline, or the earlier answer to the same Idempotency-Key and body; 409 for a reused key."""
    if existing is None:
        event = PipelineSubmitted(
            pipeline_id=command.pipeline_id,
            spec=command.spec,
            idempotency_key=command.idempotency_key,
            body_sha256=command.body_sha256,
        )
        return Append(event=NewEvent(event_id=command.event_id, event=event))
    if (
        command.idempotency_key is not None
        and existing.idempotency_key == command.idempotency_key
        and existing.body_sha256 == command.body_sha256
    ):
        return Replay(pipeline_id=existing.pipeline_id)
    raise Conflict(
        f"Idempotency-Key {command.idempotency_key!r} was already used for pipeline {existing.pipeline_id} with a "
        "different request body; send the same body to get that pipeline back, or use a new key",
        code="idempotency_conflict",
        pipeline_id=existing.pipeline_id,
    )


def decide_cancel(view: PipelineView | None, *, pipeline_id: str, event_id: str, reason: str) -> list[NewEvent]:
    """Request cancellation (the scheduler stops the running attempts); a repeated request appends nothing."""
    if view is None:
        raise NotFound(f"no pipeline {pipeline_id}", pipeline_id=pipeline_id)
    if view.terminal:
        raise Conflict(
            f"pipeline {pipeline_id} already finished ({view.status}); there is nothing to cancel",
            code="pipeline_finished",
            pipeline_id=pipeline_id,
            status=view.status,
        )
    if view.cancel_requested:
        return []
    return [NewEvent(event_id=event_id, event=PipelineCancelRequested(pipeline_id=pipeline_id, reason=reason))]


def decide_retry(
    view: PipelineView | None, *, pipeline_id: str, event_id: str, stages: Sequence[str] = ()
) -> list[NewEvent]:
    """Run the failed, cancelled and skipped stages again (or the named ones), keeping succeeded stages."""
    if view is None:
        raise NotFound(f"no pipeline {pipeline_id}", pipeline_id=pipeline_id)
    if view.status in ("pending", "running"):
        raise Conflict(
            f"pipeline {pipeline_id} is {view.status}; only a failed or cancelled pipeline can be retried "
            "(cancel it first, or wait for it to end)",
            code="pipeline_active",
            pipeline_id=pipeline_id,
            status=view.status,
        )
    if view.status == "succeeded":
        raise Conflict(
            f"pipeline {pipeline_id} succeeded; there is nothing to retry",
            code="nothing_to_retry",
            pipeline_id=pipeline_id,
            status=view.status,
        )
    for name in stages:
        stage = view.stages.get(name)
        if stage is None:
            raise BadRequest(
                f"pipeline {pipeline_id} has no stage {name!r}; its stages are: {', '.join(view.stages)}",
                code="unknown_stage",
                stage=name,
            )
        if stage.status not in RETRYABLE_STAGE_STATUSES:
            raise Conflict(
                f"stage {name!r} is {stage.status}; only failed, cancelled or skipped stages can be retried",
                code="stage_not_retryable",
                stage=name,
                status=stage.status,
            )
    listed = tuple(stages) or tuple(n for n, s in view.stages.items() if s.status in RETRYABLE_STAGE_STATUSES)
    if not listed or not retry_targets(view, listed):
        raise Conflict(
            f"pipeline {pipeline_id} has no failed, cancelled or skipped stage; there is nothing to retry",
            code="nothing_to_retry",
            pipeline_id=pipeline_id,
            status=view.status,
        )
    # The event names the stages asked for; the fold (and the projector) add what runs again with them.
    event = PipelineRetryRequested(pipeline_id=pipeline_id, stages=tuple(dict.fromkeys(listed)))
    return [NewEvent(event_id=event_id, event=event)]

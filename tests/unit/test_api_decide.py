"""Unit: the API's pure decisions (submit, cancel, retry) and its token/role rules."""

from __future__ import annotations

import pytest

from tests.unit.api_log import PID, SPEC, Log, placed, run_ok, submitted
from verlyard_api.auth import (
    Principal,
    bearer_token,
    has_role,
    hash_token,
    mint_token,
    require_owner,
    require_role,
    same_hash,
)
from verlyard_api.decide import (
    Append,
    Replay,
    Submit,
    check_idempotency_key,
    decide_cancel,
    decide_retry,
    decide_submit,
    idempotent_ids,
)
from verlyard_api.errors import BadRequest, Conflict, Forbidden, NotFound, Unauthorized
from verlyard_shared.events import (
    PipelineCancelled,
    PipelineCancelRequested,
    PipelineFailed,
    PipelineRetryRequested,
    PipelineSubmitted,
    PipelineSucceeded,
    StageFailed,
    StageSkipped,
)


def command(key: str | None = "k1", sha: str = "aa") -> Submit:
    return Submit(pipeline_id=PID, event_id="ev1", spec=SPEC, idempotency_key=key, body_sha256=sha)


# ---- submit ----------------------------------------------------------------------------------------------


def test_submit_appends_pipeline_submitted_with_key_and_body_hash() -> None:
    decision = decide_submit(None, command())
    assert isinstance(decision, Append)
    assert decision.event.event_id == "ev1"
    event = decision.event.event
    assert isinstance(event, PipelineSubmitted)
    assert (event.pipeline_id, event.idempotency_key, event.body_sha256) == (PID, "k1", "aa")


def test_same_key_and_body_replays_the_pipeline() -> None:
    existing = PipelineSubmitted(pipeline_id=PID, spec=SPEC, idempotency_key="k1", body_sha256="aa")
    assert decide_submit(existing, command()) == Replay(pipeline_id=PID)


def test_same_key_with_another_body_is_a_conflict_naming_the_pipeline() -> None:
    existing = PipelineSubmitted(pipeline_id=PID, spec=SPEC, idempotency_key="k1", body_sha256="aa")
    with pytest.raises(Conflict) as err:
        decide_submit(existing, command(sha="bb"))
    assert err.value.code == "idempotency_conflict" and err.value.extra["pipeline_id"] == PID


def test_idempotent_ids_are_stable_and_scoped_by_caller() -> None:
    assert idempotent_ids("t1", "k") == idempotent_ids("t1", "k")
    assert idempotent_ids("t1", "k") != idempotent_ids("t2", "k")
    pipeline_id, event_id = idempotent_ids("t1", "k")
    assert pipeline_id != event_id


@pytest.mark.parametrize("key", ["", "has space", "x" * 256, "tab\t", "é"])
def test_bad_idempotency_keys_are_refused(key: str) -> None:
    with pytest.raises(BadRequest):
        check_idempotency_key(key)


def test_good_idempotency_key() -> None:
    assert check_idempotency_key("job-42:retry_1") == "job-42:retry_1"


# ---- cancel ----------------------------------------------------------------------------------------------


def test_cancel_unknown_pipeline_is_not_found() -> None:
    with pytest.raises(NotFound):
        decide_cancel(None, pipeline_id=PID, event_id="e", reason="r")


def test_cancel_running_pipeline_requests_cancellation_once() -> None:
    log = submitted(Log())
    placed(log, "prep", "a-1")
    (new,) = decide_cancel(log.view(), pipeline_id=PID, event_id="e9", reason="stop")
    assert new.event_id == "e9" and new.event == PipelineCancelRequested(pipeline_id=PID, reason="stop")
    log.add(new.event)
    assert decide_cancel(log.view(), pipeline_id=PID, event_id="e10", reason="stop") == []


@pytest.mark.parametrize(
    "end",
    [
        PipelineSucceeded(pipeline_id=PID),
        PipelineFailed(pipeline_id=PID, reason="x"),
        PipelineCancelled(pipeline_id=PID, reason="x"),
    ],
)
def test_cancel_of_a_finished_pipeline_is_a_conflict(
    end: PipelineSucceeded | PipelineFailed | PipelineCancelled,
) -> None:
    log = submitted(Log())
    log.add(end)
    with pytest.raises(Conflict) as err:
        decide_cancel(log.view(), pipeline_id=PID, event_id="e", reason="r")
    assert err.value.code == "pipeline_finished" and "already finished" in err.value.detail


# ---- retry -----------------------------------------------------------------------------------------------


def failed_log() -> Log:
    log = submitted(Log())
    run_ok(log, "prep", "a-1")
    placed(log, "train", "a-2")
    log.add(StageFailed(pipeline_id=PID, stage="train", attempt="a-2", failure_class="user"))
    log.add(StageSkipped(pipeline_id=PID, stage="eval", reason="train failed"))
    log.add(PipelineFailed(pipeline_id=PID, reason="train failed", failed_stages=("train",)))
    return log


def test_retry_runs_failed_and_skipped_stages_again() -> None:
    (new,) = decide_retry(failed_log().view(), pipeline_id=PID, event_id="e")
    assert new.event == PipelineRetryRequested(pipeline_id=PID, stages=("train", "eval"))


def test_retry_of_a_named_stage_names_only_it() -> None:
    (new,) = decide_retry(failed_log().view(), pipeline_id=PID, event_id="e", stages=["train"])
    assert isinstance(new.event, PipelineRetryRequested) and new.event.stages == ("train",)


def test_retry_of_a_running_pipeline_is_a_conflict() -> None:
    log = submitted(Log())
    placed(log, "prep", "a-1")
    with pytest.raises(Conflict) as err:
        decide_retry(log.view(), pipeline_id=PID, event_id="e")
    assert err.value.code == "pipeline_active"


def test_retry_of_a_succeeded_pipeline_has_nothing_to_retry() -> None:
    log = submitted(Log())
    log.add(PipelineSucceeded(pipeline_id=PID))
    with pytest.raises(Conflict) as err:
        decide_retry(log.view(), pipeline_id=PID, event_id="e")
    assert err.value.code == "nothing_to_retry"


def test_retry_of_a_cancelled_pipeline_without_unfinished_stages_has_nothing_to_retry() -> None:
    log = submitted(Log())
    for stage in ("prep", "train", "eval"):
        run_ok(log, stage, f"a-{stage}")
    log.add(PipelineCancelled(pipeline_id=PID, reason="late cancel"))
    with pytest.raises(Conflict) as err:
        decide_retry(log.view(), pipeline_id=PID, event_id="e")
    assert err.value.code == "nothing_to_retry"


def test_retry_names_unknown_and_succeeded_stages() -> None:
    view = failed_log().view()
    with pytest.raises(BadRequest) as bad:
        decide_retry(view, pipeline_id=PID, event_id="e", stages=["trian"])
    assert bad.value.code == "unknown_stage" and "trian" in bad.value.detail
    with pytest.raises(Conflict) as conflict:
        decide_retry(view, pipeline_id=PID, event_id="e", stages=["prep"])
    assert conflict.value.code == "stage_not_retryable"


# ---- tokens and roles ------------------------------------------------------------------------------------


def test_minted_token_format_and_hash() -> None:
    token, digest = mint_token(bytes(range(32)))
    assert token.startswith("vy_") and len(token) == 46
    assert digest == hash_token(token) and same_hash(digest, hash_token(token))
    assert bearer_token(f"Bearer {token}") == token
    assert bearer_token(f"bearer  {token} ") == token
    with pytest.raises(ValueError, match="32 random bytes"):
        mint_token(b"short")


@pytest.mark.parametrize("header", [None, "", "Bearer", "Basic abc", "Bearer vy_short", "Bearer " + "x" * 46])
def test_bad_authorization_headers(header: str | None) -> None:
    with pytest.raises(Unauthorized):
        bearer_token(header)


def test_roles_are_ordered_and_members_manage_only_their_own_pipelines() -> None:
    viewer = Principal(token_id="t1", name="v", role="viewer")
    member = Principal(token_id="t2", name="m", role="member")
    admin = Principal(token_id="t3", name="a", role="admin")
    assert has_role(admin, "member") and has_role(member, "viewer") and not has_role(viewer, "member")
    with pytest.raises(Forbidden):
        require_role(member, "admin")
    require_owner(member, PID, member.actor)
    require_owner(admin, PID, member.actor)
    with pytest.raises(Forbidden):
        require_owner(member, PID, admin.actor)
    with pytest.raises(Forbidden):
        require_owner(viewer, PID, viewer.actor)
    assert member.actor == "token:t2:m"

"""Entrypoint: agents (GPU inventory, live utilisation, current attempts, state) and drain (admin)."""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec
from litestar import Request, Response, get, post
from litestar.params import FromPath, JSONBody

from verlyard_api.adapters.pg import guarded
from verlyard_api.adapters.pg_resources import active_attempts, agent_envelopes
from verlyard_api.agents import AgentOut, AgentPage, agent_out, agents_out, decide_drain, fold_agents
from verlyard_api.context import ApiContext
from verlyard_api.errors import Conflict, NotFound
from verlyard_api.http import Ctx, admin, current_request_id, principal_of, viewer
from verlyard_api.openapi import OptionalBodyOperation, error_responses
from verlyard_api.services import Services, Svc
from verlyard_shared.envelope import Metadata, NewEvent
from verlyard_shared.ids import agent_stream
from verlyard_shared.store.port import WrongExpectedVersion

DRAIN_ATTEMPTS: Final = 5


class DrainBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    reason: Annotated[str, msgspec.Meta(max_length=1000)] | None = None


@get(
    "/api/v1/agents",
    guards=[viewer],
    summary="Agents: GPUs, utilisation, state, current attempts",
    responses=error_responses(),
)
async def list_agents(ctx: Ctx, svc: Svc) -> AgentPage:
    async with guarded():
        records = fold_agents(await agent_envelopes(ctx.pool))
        attempts = await active_attempts(ctx.pool)
    return AgentPage(items=agents_out(records, svc.live_agents.heartbeats, attempts))


async def _one(ctx: ApiContext, svc: Services, agent_id: str) -> AgentOut:
    async with guarded():
        records = fold_agents(await agent_envelopes(ctx.pool, agent_id))
        attempts = await active_attempts(ctx.pool, agent_id)
    record = records.get(agent_id)
    if record is None:
        raise NotFound(f"no agent {agent_id}", agent=agent_id)
    return agent_out(record, svc.live_agents.heartbeats.get(agent_id), attempts)


@get("/api/v1/agents/{agent_id:str}", guards=[viewer], summary="One agent", responses=error_responses(404))
async def get_agent(ctx: Ctx, svc: Svc, agent_id: FromPath[str]) -> AgentOut:
    return await _one(ctx, svc, agent_id)


@post(
    "/api/v1/agents/{agent_id:str}/drain",
    guards=[admin],
    status_code=202,
    summary="Drain an agent: it finishes its running attempts and takes no new work (the scheduler acts on it)",
    responses=error_responses(400, 403, 404, 409, 413),
    operation_class=OptionalBodyOperation,
)
async def drain_agent(
    request: Request[Any, Any, Any],
    ctx: Ctx,
    svc: Svc,
    agent_id: FromPath[str],
    data: JSONBody[DrainBody | None] = None,
) -> Response[AgentOut]:
    principal = principal_of(request)
    reason = (data.reason if data is not None else None) or f"drain requested by {principal.name}"
    stream = agent_stream(agent_id)
    for _ in range(DRAIN_ATTEMPTS):
        async with guarded():
            envelopes = await agent_envelopes(ctx.pool, agent_id)
        record = fold_agents(envelopes).get(agent_id)
        event = decide_drain(record, agent_id, reason)
        if event is None:
            break  # drains already: a repeated request changes nothing
        version = envelopes[-1].version if envelopes else 0
        try:
            async with guarded():
                await ctx.store.append(
                    stream,
                    version,
                    [NewEvent(event_id=ctx.new_id(), event=event)],
                    Metadata(actor=principal.actor, correlation_id=current_request_id()),
                )
        except WrongExpectedVersion:
            continue  # the scheduler appended meanwhile (lost, re-registered): decide again
        break
    else:
        raise Conflict(f"agent {agent_id} kept changing while draining it; retry", code="version_conflict")
    return Response(await _one(ctx, svc, agent_id), status_code=202)


HANDLERS = [list_agents, get_agent, drain_agent]

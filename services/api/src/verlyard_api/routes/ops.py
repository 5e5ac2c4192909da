"""Entrypoint: `/metrics` in the Prometheus text format (needs a token, like every route but /healthz):
requests by route and status, request latency, events appended, relay lag, pipelines by status, agents by
state, live GPU utilisation, telemetry persisted."""

from __future__ import annotations

from litestar import Response, get

from verlyard_api.adapters.pg import guarded
from verlyard_api.adapters.pg_resources import agent_envelopes, head_position, pipeline_counts
from verlyard_api.agents import count_by_state, fold_agents
from verlyard_api.http import Ctx, viewer
from verlyard_api.openapi import error_responses
from verlyard_api.promtext import CONTENT_TYPE, Family, gauge, render
from verlyard_api.services import Svc
from verlyard_api.views import PIPELINE_STATUSES


@get(
    "/metrics",
    guards=[viewer],
    summary="Prometheus metrics (text exposition format)",
    media_type=CONTENT_TYPE,
    responses=error_responses(),
    include_in_schema=True,
)
async def prometheus_metrics(ctx: Ctx, svc: Svc) -> Response[str]:
    async with guarded():
        head = await head_position(ctx.pool)
        pipelines = await pipeline_counts(ctx.pool)
        agents = fold_agents(await agent_envelopes(ctx.pool))
    families: list[Family] = [
        Family("verlyard_events_appended_total", "counter", "Events in the log (its head position)").add(head),
        gauge(
            "verlyard_pipelines",
            "Pipelines by status (read model)",
            {s: pipelines.get(s, 0) for s in PIPELINE_STATUSES},
            "status",
        ),
        gauge("verlyard_agents", "Agents by state", count_by_state(agents.values()), "state"),
    ]
    utilisation = Family("verlyard_agent_gpu_utilization_percent", "gauge", "GPU utilisation of the latest heartbeat")
    for agent_id in sorted(svc.live_agents.heartbeats):
        for gpu in svc.live_agents.heartbeats[agent_id].gpus:
            utilisation.add(gpu.utilization_pct, agent=agent_id, gpu=str(gpu.index))
    families.append(utilisation)
    lag = svc.relay_lag() if svc.relay_lag is not None else None
    if lag is not None:
        families.append(
            Family("verlyard_relay_leader", "gauge", "1 when this process's relay publishes").add(
                1 if lag.leader else 0
            )
        )
        families.append(
            Family("verlyard_relay_behind_events", "gauge", "Events committed but not yet published").add(lag.behind)
        )
        families.append(
            Family("verlyard_relay_position", "gauge", "Last position the relay published").add(lag.position)
        )
        if lag.last_latency_s is not None:
            families.append(
                Family("verlyard_relay_last_latency_seconds", "gauge", "Commit-to-ack time of the last event").add(
                    lag.last_latency_s
                )
            )
    families.extend(svc.ops.families())
    return Response(render(families), media_type=CONTENT_TYPE)


HANDLERS = [prometheus_metrics]

"""Entrypoint: the API's route modules, one per area (metrics, logs, streams, agents, datasets add theirs here)."""

from __future__ import annotations

from litestar.types import ControllerRouterHandler

from verlyard_api.dashboard import routes as dashboard
from verlyard_api.routes import admin, agents, datasets, events, hosts, logs, metrics, ops, pipelines, stream, tokens

ROUTES: list[ControllerRouterHandler] = [
    *pipelines.HANDLERS,
    *events.HANDLERS,
    *tokens.HANDLERS,
    *admin.HANDLERS,
    *metrics.HANDLERS,
    *logs.HANDLERS,
    *stream.HANDLERS,
    *agents.HANDLERS,
    *datasets.HANDLERS,
    *hosts.HANDLERS,
    *ops.HANDLERS,
    *dashboard.HANDLERS,
]

"""Entrypoint: the API's route modules, one per area (metrics, logs, streams, agents, datasets add theirs here)."""

from __future__ import annotations

from litestar.types import ControllerRouterHandler

from verlyard_api.routes import admin, events, pipelines, tokens

ROUTES: list[ControllerRouterHandler] = [*pipelines.HANDLERS, *events.HANDLERS, *tokens.HANDLERS, *admin.HANDLERS]

"""Entrypoint: API tokens (admin only). The secret is in the creation response and nowhere else."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, Response, get, post
from litestar.params import JSONBody, QueryParameter

from verlyard_api.http import Ctx, admin, current_request_id, principal_of
from verlyard_api.models import TokenCreate, TokenCreated, TokenPage, token_out
from verlyard_api.openapi import MAX_POSITION, documented_header, error_responses
from verlyard_shared.envelope import Metadata


@post(
    "/api/v1/tokens",
    guards=[admin],
    status_code=201,
    summary="Create a token (its secret is shown once)",
    response_headers=[documented_header("Cache-Control", "no-store: the secret is in the body")],
    responses=error_responses(400, 403, 413),
)
async def create_token(
    request: Request[Any, Any, Any], ctx: Ctx, data: JSONBody[TokenCreate]
) -> Response[TokenCreated]:
    principal = principal_of(request)
    view, secret = await ctx.tokens.create(
        role=data.role,
        name=data.name,
        metadata=Metadata(actor=principal.actor, correlation_id=current_request_id()),
    )
    body = TokenCreated(
        id=view.id, name=view.name, role=view.role, created_at=view.created_at, created_by=view.created_by, token=secret
    )
    return Response(body, status_code=201, headers={"Cache-Control": "no-store"})


@get("/api/v1/tokens", guards=[admin], summary="List tokens (never their secrets)", responses=error_responses(400, 403))
async def list_tokens(
    ctx: Ctx,
    after: Annotated[
        int, QueryParameter(ge=0, le=MAX_POSITION, description="the `next` value of the previous page")
    ] = 0,
    limit: Annotated[int, QueryParameter(ge=1, le=500)] = 100,
) -> TokenPage:
    tokens = await ctx.tokens.list(limit=limit, after=after)
    return TokenPage(items=[token_out(t) for t in tokens], next=tokens[-1].position if len(tokens) == limit else None)


HANDLERS = [create_token, list_tokens]

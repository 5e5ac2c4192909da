"""Adapter: the OpenAPI 3.1 document at /schema: bearer security, the error responses each route can give,
and the pipeline spec request body (read raw, as JSON or YAML, so litestar cannot infer it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import Components, OpenAPIMediaType, Operation, RequestBody, Schema, SecurityScheme
from litestar.openapi.spec.enums import OpenAPIType

from verlyard_api.models import ErrorOut
from verlyard_shared.spec import STAGE_KINDS

_DESCRIPTIONS: Final = {
    400: "Bad input: an unparsable body, a bad parameter or header (`issues` names it)",
    401: "No token, or a token that is not valid",
    403: "The token's role does not allow this",
    404: "No such resource",
    409: "Conflict with the current state (finished pipeline, reused Idempotency-Key, ...)",
    413: "The body is over the limit (1 MiB for specs)",
    415: "A media type this route does not read",
    422: "An invalid pipeline spec: `issues` name each field and, for YAML, its line",
    503: "A backing service (Postgres) is unavailable: retry after `Retry-After` seconds",
}


def error_responses(*codes: int) -> dict[int, ResponseSpec]:
    """The documented error responses of a route (401 and 503 apply to every protected route)."""
    return {
        code: ResponseSpec(data_container=ErrorOut, description=_DESCRIPTIONS[code], generate_examples=False)
        for code in sorted({401, 503, *codes})
    }


_STAGE = Schema(
    type=OpenAPIType.OBJECT,
    required=["kind"],
    properties={
        "kind": Schema(type=OpenAPIType.STRING, enum=list(STAGE_KINDS)),
        "needs": Schema(type=OpenAPIType.ARRAY, items=Schema(type=OpenAPIType.STRING)),
        "when": Schema(type=OpenAPIType.STRING, enum=["on_success", "on_failure", "always"]),
        "retry": Schema(type=OpenAPIType.OBJECT),
        "timeout": Schema(type=OpenAPIType.STRING, description="a duration such as 90s, 10m, 24h"),
        "resources": Schema(type=OpenAPIType.OBJECT),
        "priority": Schema(type=OpenAPIType.INTEGER),
        "with": Schema(type=OpenAPIType.OBJECT, description="kind-specific parameters"),
    },
)
SPEC_SCHEMA: Final = Schema(
    type=OpenAPIType.OBJECT,
    required=["name", "stages"],
    description="A pipeline spec (interface.md); validated in full by the server",
    properties={
        "name": Schema(type=OpenAPIType.STRING, pattern="^[a-z0-9][a-z0-9-]{0,62}$"),
        "labels": Schema(type=OpenAPIType.OBJECT, additional_properties=Schema(type=OpenAPIType.STRING)),
        "priority": Schema(type=OpenAPIType.INTEGER),
        "defaults": Schema(type=OpenAPIType.OBJECT),
        "stages": Schema(type=OpenAPIType.OBJECT, additional_properties=_STAGE, min_properties=1),
    },
)


@dataclass
class SubmitOperation(Operation):
    """POST /api/v1/pipelines: the body is a spec in JSON or YAML."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            required=True,
            description="The pipeline spec, as JSON or as YAML (Content-Type application/yaml)",
            content={
                "application/json": OpenAPIMediaType(schema=SPEC_SCHEMA),
                "application/yaml": OpenAPIMediaType(schema=Schema(type=OpenAPIType.STRING)),
            },
        )


def openapi_config() -> OpenAPIConfig:
    """OpenAPI 3.1 JSON at /schema (and /schema/openapi.json), Swagger UI at /schema/docs; all need a token."""
    return OpenAPIConfig(
        title="verlyard",
        version="1",
        description="Event-sourced LLM training pipelines. Every route but /healthz needs `Authorization: Bearer`.",
        path="/schema",
        render_plugins=[JsonRenderPlugin(), SwaggerRenderPlugin(path="/docs")],
        components=Components(
            security_schemes={"bearer": SecurityScheme(type="http", scheme="bearer", bearer_format="vy_...")}
        ),
        security=[{"bearer": []}],
    )

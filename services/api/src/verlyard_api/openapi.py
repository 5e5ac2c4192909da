"""Adapter: the OpenAPI 3.1 document at /schema: bearer security, the error responses each route can give,
the pipeline spec request body (read raw, as JSON or YAML, so litestar cannot infer it), the SSE responses,
optional bodies, closed request structs, and the exact shapes of the parameters the server parses itself
(schemathesis checks the document against the server both ways: tests/integration/test_api_schemathesis.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

# Litestar's own msgspec schema plugin (not re-exported): ClosedStructSchemaPlugin only adds to its output.
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.datastructures import ResponseHeader
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.plugins import JsonRenderPlugin, SwaggerRenderPlugin
from litestar.openapi.spec import (
    Components,
    OpenAPIMediaType,
    OpenAPIResponse,
    Operation,
    Reference,
    RequestBody,
    Schema,
    SecurityScheme,
)
from litestar.openapi.spec.enums import OpenAPIType

from verlyard_api.models import ErrorOut
from verlyard_api.views import PIPELINE_STATUSES
from verlyard_shared.spec import STAGE_KINDS
from verlyard_shared.validation import MAX_PRIORITY, MAX_STAGES

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator
    from litestar.typing import FieldDefinition

_DESCRIPTIONS: Final = {
    400: "Bad input: an unparsable body, a bad parameter or header (`issues` names it)",
    401: "No token, or a token that is not valid",
    403: "The token's role does not allow this",
    404: "No such resource",
    409: "Conflict with the current state (finished pipeline, reused Idempotency-Key, ...)",
    413: "The body is over the limit (1 MiB for specs)",
    415: "A media type this route does not read",
    422: "Well-formed but invalid: a pipeline spec (`issues` name each field and, for YAML, its line), a dataset name",
    503: "A backing service (Postgres) is unavailable: retry after `Retry-After` seconds",
}


def error_responses(*codes: int) -> dict[int, ResponseSpec]:
    """The documented error responses of a route (401 and 503 apply to every protected route)."""
    return {
        code: ResponseSpec(data_container=ErrorOut, description=_DESCRIPTIONS[code], generate_examples=False)
        for code in sorted({401, 503, *codes})
    }


# ---- parameters the server parses itself: their exact shapes ---------------------------------------------

_STATUS = "(?:" + "|".join(PIPELINE_STATUSES) + ")"
STATUS_FILTER_PATTERN: Final = f"^ *{_STATUS}? *(?:, *{_STATUS}? *)*$"
"""`?status=`: statuses separated by commas (spaces around them are ignored); see routes/pipelines.py."""
STREAM_CURSOR_PATTERN: Final = r"^[ \t]*(?:e[0-9]{1,18}\.m[0-9]{1,18}\.l[0-9]{1,18})?[ \t]*$"
"""A live stream's message id (cursor.py); empty means from the start."""
POSITION_PATTERN: Final = r"^[ \t]*(?:[0-9]{1,18})?[ \t]*$"
"""A Last-Event-ID that is an event position or a log line offset; empty means none."""
DATASET_NAME_PATTERN: Final = r"^[a-z0-9](?:[a-z0-9_-]|\.[a-z0-9_-])*\.?$"
"""[a-z0-9][a-z0-9._-]{0,62} without '..' (datasets.py; the length is a separate maxLength of 63)."""
MAX_POSITION: Final = 2**53 - 1
"""Positions and offsets (bigint columns) as parameters: up to the largest integer a JSON number (a float in
many clients and validators) holds exactly, so the documented bound is exact too."""
MAX_VERSION: Final = 2**31 - 1
"""Stream versions are Postgres integers: a larger `after` would fail in the database, not be empty."""
EVENT_STREAM: Final = "text/event-stream"


def documented_header(name: str, description: str) -> ResponseHeader:
    """A header the handler sets on its success response, documented as a required string (litestar takes the
    documented type from `value`, which a documentation-only header never sends)."""
    return ResponseHeader(name=name, documentation_only=True, value="", required=True, description=description)


def component(name: str) -> Reference:
    return Reference(ref=f"#/components/schemas/{name}")


def sse_event(data: Schema | Reference, *, event: Schema | None = None, id_pattern: str | None = None) -> Schema:
    """One Server-Sent Event, read as its fields (how OpenAPI 3.2's `itemSchema` and schemathesis read a
    stream): `data` is a JSON document of the given shape."""
    return Schema(
        type=OpenAPIType.OBJECT,
        required=["event", "data"],
        properties={
            "event": event or Schema(type=OpenAPIType.STRING),
            "data": Schema(type=OpenAPIType.STRING, content_media_type="application/json", content_schema=data),
            "id": Schema(type=OpenAPIType.STRING, pattern=id_pattern),
            "retry": Schema(type=OpenAPIType.INTEGER, minimum=0),
        },
    )


def event_stream(event: Schema, *, json_twin: bool) -> type[Operation]:
    """The operation class of a route that answers with Server-Sent Events, each one matching `event`: always
    (`json_twin=False`), or as the `follow=true` (or `Accept: text/event-stream`) twin of a JSON page."""

    @dataclass
    class EventStreamOperation(Operation):
        def __post_init__(self) -> None:
            ok = _ok_response(self)
            if ok is None:
                return
            media = OpenAPIMediaType(schema=event)
            ok.content = {**(ok.content or {}), EVENT_STREAM: media} if json_twin else {EVENT_STREAM: media}

    return EventStreamOperation


def _ok_response(operation: Operation) -> OpenAPIResponse | None:
    for status in ("200", "201", "202"):
        response = (operation.responses or {}).get(status)
        if isinstance(response, OpenAPIResponse):
            return response
    return None


@dataclass
class OptionalBodyOperation(Operation):
    """A command whose JSON body may be left out (litestar marks every declared body as required)."""

    def __post_init__(self) -> None:
        if isinstance(self.request_body, RequestBody):
            self.request_body.required = False


class ClosedStructSchemaPlugin(StructSchemaPlugin):
    """Request structs that refuse unknown fields (`forbid_unknown_fields=True`, a 400) say so in the schema
    with `additionalProperties: false`; litestar's plugin leaves that out."""

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        if not super().is_plugin_supported_field(field_definition):
            return False
        config = getattr(field_definition.type_, "__struct_config__", None)
        return bool(getattr(config, "forbid_unknown_fields", False))

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: SchemaCreator) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        schema.additional_properties = False
        return schema


_STAGE = Schema(
    type=OpenAPIType.OBJECT,
    required=["kind"],
    additional_properties=False,
    properties={
        "kind": Schema(type=OpenAPIType.STRING, enum=list(STAGE_KINDS)),
        "needs": Schema(type=OpenAPIType.ARRAY, items=Schema(type=OpenAPIType.STRING)),
        "when": Schema(type=OpenAPIType.STRING, enum=["on_success", "on_failure", "always"]),
        "retry": Schema(type=OpenAPIType.OBJECT),
        "timeout": Schema(type=OpenAPIType.STRING, description="a duration such as 90s, 10m, 24h"),
        "resources": Schema(type=OpenAPIType.OBJECT),
        "priority": Schema(type=OpenAPIType.INTEGER, minimum=-MAX_PRIORITY, maximum=MAX_PRIORITY),
        "with": Schema(type=OpenAPIType.OBJECT, description="kind-specific parameters"),
    },
)
SPEC_SCHEMA: Final = Schema(
    type=OpenAPIType.OBJECT,
    required=["name", "stages"],
    additional_properties=False,
    description="A pipeline spec (interface.md); validated in full by the server (needs, cycles, kind-specific "
    "`with`: 422 names each issue)",
    properties={
        "name": Schema(type=OpenAPIType.STRING, pattern="^[a-z0-9][a-z0-9-]{0,62}$"),
        "labels": Schema(type=OpenAPIType.OBJECT, additional_properties=Schema(type=OpenAPIType.STRING)),
        "priority": Schema(type=OpenAPIType.INTEGER, minimum=-MAX_PRIORITY, maximum=MAX_PRIORITY),
        "defaults": Schema(type=OpenAPIType.OBJECT),
        "stages": Schema(
            type=OpenAPIType.OBJECT,
            additional_properties=_STAGE,
            property_names=Schema(type=OpenAPIType.STRING, pattern="^[a-z0-9][a-z0-9_-]{0,62}$"),
            min_properties=1,
            max_properties=MAX_STAGES,
        ),
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

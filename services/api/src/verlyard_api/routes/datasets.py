"""Entrypoint: datasets. Upload (the raw file as the body, streamed to disk while hashed, size-limited),
list, and one dataset with the detected format and a preview of its first rows.

Upload: `POST /api/v1/datasets?name=NAME` with the file's bytes as the body (any Content-Type but
multipart, e.g. `curl --data-binary @train.jsonl -H 'Content-Type: application/octet-stream'`);
without `name`, the name comes from `?filename=` or a Content-Disposition filename.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, get, post
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, QueryParameter

from verlyard_api.adapters.dataset_store import DatasetStore
from verlyard_api.adapters.pg import guarded
from verlyard_api.adapters.pg_resources import dataset_envelopes
from verlyard_api.context import ApiContext
from verlyard_api.datasets import (
    DEFAULT_PREVIEW_ROWS,
    MAX_PREVIEW_ROWS,
    DatasetRecord,
    Preview,
    check_filename,
    choose_name,
    decide_upload,
    detect_format,
    filename_of,
    find,
    fold_datasets,
    latest_by_name,
    preview,
)
from verlyard_api.errors import TooLarge, Unavailable, UnsupportedMediaType
from verlyard_api.http import Ctx, current_request_id, member, principal_of, viewer
from verlyard_api.openapi import DATASET_NAME_PATTERN, documented_header, error_responses
from verlyard_api.services import Svc
from verlyard_shared.envelope import Metadata, NewEvent
from verlyard_shared.store.port import NO_STREAM
from verlyard_shared.subjects import DATASETS_BUCKET


class DatasetOut(msgspec.Struct, kw_only=True):
    id: str
    name: str
    sha256: str
    size_bytes: int
    filename: str
    format: str
    """jsonl | json | csv | tsv | parquet | unknown (by the filename, else by the first bytes)"""
    uploaded_at: datetime
    uploaded_by: str
    object: str
    """Where agents fetch it: `<bucket>/<sha256>` in the JetStream object store."""
    preview: Preview | None = None


class DatasetPage(msgspec.Struct, kw_only=True):
    items: list[DatasetOut]
    """Each name's latest upload, by name."""
    next: None = None


def _store(svc_store: DatasetStore | None) -> DatasetStore:
    if svc_store is None:
        raise Unavailable("datasets are not configured on this API (no dataset folder)")
    return svc_store


async def _records(ctx: ApiContext) -> list[DatasetRecord]:
    async with guarded():
        return fold_datasets(await dataset_envelopes(ctx.pool))


async def _out(store: DatasetStore | None, record: DatasetRecord, *, rows: int | None = None) -> DatasetOut:
    head = await store.head(record.sha256) if store is not None else None
    fmt = detect_format(record.filename or record.name, head[0] if head is not None else b"")
    shown: Preview | None = None
    if rows is not None:
        if head is None:
            shown = Preview(format=fmt, rows=[], note="the file is not on this API host (agents fetch it by sha256)")
        else:
            shown = preview(fmt, head[0], whole=head[1], rows=rows)
    return DatasetOut(
        id=record.id,
        name=record.name,
        sha256=record.sha256,
        size_bytes=record.size_bytes,
        filename=record.filename,
        format=fmt,
        uploaded_at=record.uploaded_at,
        uploaded_by=record.uploaded_by,
        object=f"{DATASETS_BUCKET}/{record.sha256}",
        preview=shown,
    )


@post(
    "/api/v1/datasets",
    guards=[member],
    status_code=201,
    request_max_body_size=None,  # the configurable dataset limit is enforced while streaming (413)
    response_headers=[documented_header("Location", "the new dataset's URL")],
    summary="Upload a dataset (the raw file as the body; streamed, sha256, stored content-addressed)",
    responses={200: ResponseSpec(DatasetOut, description="The name already points at these exact bytes")}
    | error_responses(400, 403, 413, 415, 422),
)
async def upload_dataset(
    request: Request[Any, Any, Any],
    ctx: Ctx,
    svc: Svc,
    name: Annotated[
        str | None,
        QueryParameter(
            # Documented only: choose_name answers 422 invalid_name with the rule spelled out.
            schema_extra={"min_length": 1, "max_length": 63, "pattern": DATASET_NAME_PATTERN},
            description="[a-z0-9][a-z0-9._-]{0,62} without '..'; default: from the filename",
        ),
    ] = None,
    filename: Annotated[str | None, QueryParameter(max_length=255, description="the file's original name")] = None,
) -> Response[DatasetOut]:
    store = _store(svc.datasets)
    principal = principal_of(request)
    media = (request.headers.get("content-type") or "").split(";", 1)[0].strip().lower()
    if media.startswith("multipart/"):
        raise UnsupportedMediaType(
            "send the file itself as the body, not a multipart form "
            "(e.g. curl --data-binary @FILE -H 'Content-Type: application/octet-stream')"
        )
    original = filename or filename_of(request.headers.get("content-disposition")) or ""
    recorded_filename = check_filename(original)
    dataset_name = choose_name(name, original or None)
    limit = svc.max_dataset_bytes
    announced = request.headers.get("content-length")
    if announced is not None and announced.isdigit() and int(announced) > limit:
        raise TooLarge(f"the dataset is larger than the limit of {limit} bytes", limit_bytes=limit)
    received = await store.receive(request.stream(), limit=limit)
    try:
        existing = latest_by_name(await _records(ctx)).get(dataset_name)
        dataset_id = ctx.new_id()
        event = decide_upload(
            existing,
            dataset_id=dataset_id,
            name=dataset_name,
            sha256=received.sha256,
            size_bytes=received.size_bytes,
            filename=recorded_filename,
        )
        await store.commit(received)
    except BaseException:
        await store.discard(received)
        raise
    if event is None:
        assert existing is not None  # the name points at these bytes already: nothing new to record
        await store.publish(
            sha256=existing.sha256, name=dataset_name, dataset_id=existing.id, size_bytes=existing.size_bytes
        )
        return Response(await _out(store, existing), status_code=200)
    await store.publish(
        sha256=received.sha256, name=dataset_name, dataset_id=dataset_id, size_bytes=received.size_bytes
    )
    async with guarded():
        result = await ctx.store.append(
            f"dataset-{dataset_id}",
            NO_STREAM,
            [NewEvent(event_id=ctx.new_id(), event=event)],
            Metadata(actor=principal.actor, correlation_id=current_request_id()),
        )
    await store.link_name(dataset_name, received.sha256)
    record = DatasetRecord(
        id=dataset_id,
        name=dataset_name,
        sha256=received.sha256,
        size_bytes=received.size_bytes,
        filename=event.filename,
        uploaded_at=ctx.clock(),
        uploaded_by=principal.actor,
        position=result.last_position,
    )
    return Response(await _out(store, record), status_code=201, headers={"Location": f"/api/v1/datasets/{dataset_id}"})


@get("/api/v1/datasets", guards=[viewer], summary="Datasets (each name's latest upload)", responses=error_responses())
async def list_datasets(ctx: Ctx, svc: Svc) -> DatasetPage:
    latest = latest_by_name(await _records(ctx))
    return DatasetPage(items=[await _out(svc.datasets, latest[n]) for n in sorted(latest)])


@get(
    "/api/v1/datasets/{ref:str}",
    guards=[viewer],
    summary="A dataset by id or name, with its detected format and a preview of its first rows",
    responses=error_responses(400, 404),
)
async def get_dataset(
    ctx: Ctx,
    svc: Svc,
    ref: FromPath[str],
    rows: Annotated[int, QueryParameter(ge=1, le=MAX_PREVIEW_ROWS, description="preview rows")] = DEFAULT_PREVIEW_ROWS,
) -> DatasetOut:
    return await _out(svc.datasets, find(await _records(ctx), ref), rows=rows)


HANDLERS = [upload_dataset, list_datasets, get_dataset]

"""Integration: dataset upload (streamed, sha256, content-addressed on disk AND in the `vy-datasets` object
store), list, get with format and preview; 413 past the limit, 422 for bad names, 401/403 per role."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from nats.js import JetStreamContext

from tests.integration.api_app import ApiEnv, api_env
from verlyard_api.adapters.dataset_store import DatasetStore
from verlyard_shared.codec import to_public
from verlyard_shared.subjects import DATASETS_BUCKET, dataset_name_object

ROWS = b"".join(json.dumps({"prompt": f"q{i}", "answer": f"a{i}"}).encode() + b"\n" for i in range(50))


@pytest.fixture
async def api(pg_pool: asyncpg.Pool, js: JetStreamContext, tmp_path: Path) -> AsyncIterator[ApiEnv]:
    async with api_env(pg_pool) as env:
        env.deps.services.datasets = DatasetStore(tmp_path / "datasets", js=js)
        yield env


async def _uploaded(api: ApiEnv) -> list[dict[str, object]]:
    events = await api.ctx.store.read_all(after=0, limit=1000)
    return [to_public(e) for e in events if to_public(e)["type"] == "dataset.uploaded"]


async def test_upload_list_get_and_dedupe(api: ApiEnv, js: JetStreamContext, tmp_path: Path) -> None:
    folder = tmp_path / "datasets"
    response = await api.client.post(
        "/api/v1/datasets?name=sales_sft&filename=sales.jsonl",
        content=ROWS,
        headers=api.auth("member") | {"Content-Type": "application/octet-stream"},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    digest = hashlib.sha256(ROWS).hexdigest()
    assert (body["name"], body["sha256"], body["size_bytes"], body["format"]) == (
        "sales_sft",
        digest,
        len(ROWS),
        "jsonl",
    )
    assert body["object"] == f"{DATASETS_BUCKET}/{digest}" and body["filename"] == "sales.jsonl"
    assert response.headers["location"] == f"/api/v1/datasets/{body['id']}"
    # Content-addressed on disk, and the name resolves for a local agent sharing the folder.
    assert (folder / digest).read_bytes() == ROWS
    assert (folder / "sales_sft").resolve() == (folder / digest).resolve()
    assert not list((folder / ".incoming").iterdir())
    # In the object store by sha256 (agents fetch it without the database), with a name pointer.
    bucket = await js.object_store(DATASETS_BUCKET)
    assert (await bucket.get(digest)).data == ROWS
    pointer = json.loads((await bucket.get(dataset_name_object("sales_sft"))).data or b"{}")
    assert pointer == {"sha256": digest, "size_bytes": len(ROWS), "dataset_id": body["id"], "name": "sales_sft"}
    (event,) = await _uploaded(api)
    assert event["data"] == {
        "dataset_id": body["id"],
        "name": "sales_sft",
        "sha256": digest,
        "size_bytes": len(ROWS),
        "filename": "sales.jsonl",
    }
    assert event["actor"] == f"token:{api.ids['member']}:member"

    same = await api.client.post("/api/v1/datasets?name=sales_sft", content=ROWS, headers=api.auth("member"))
    assert same.status_code == 200 and same.json()["id"] == body["id"] and len(await _uploaded(api)) == 1

    listed = (await api.client.get("/api/v1/datasets", headers=api.auth("viewer"))).json()
    assert [(d["name"], d["id"]) for d in listed["items"]] == [("sales_sft", body["id"])] and listed["next"] is None
    by_name = (await api.client.get("/api/v1/datasets/sales_sft?rows=2", headers=api.auth("viewer"))).json()
    assert by_name["preview"] == {
        "format": "jsonl",
        "rows": [{"prompt": "q0", "answer": "a0"}, {"prompt": "q1", "answer": "a1"}],
        "columns": None,
        "note": "",
    }
    by_id = (await api.client.get(f"/api/v1/datasets/{body['id']}", headers=api.auth("viewer"))).json()
    assert by_id["name"] == "sales_sft" and len(by_id["preview"]["rows"]) == 5

    # New bytes under the same name: a new dataset; the name now points at it.
    newer = await api.client.post("/api/v1/datasets?name=sales_sft", content=ROWS[:100] + b"\n", headers=api.auth())
    assert newer.status_code == 201 and newer.json()["id"] != body["id"]
    assert (await api.client.get("/api/v1/datasets/sales_sft", headers=api.auth())).json()["id"] == newer.json()["id"]
    assert (folder / "sales_sft").resolve() == (folder / newer.json()["sha256"]).resolve()


async def test_csv_named_by_its_filename_and_streamed_without_length(api: ApiEnv) -> None:
    csv = b"prompt,answer\nhello,world\n2+2,4\n"

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(csv), 7):
            yield csv[i : i + 7]

    response = await api.client.post(
        "/api/v1/datasets",
        content=chunks(),
        headers=api.auth("member") | {"Content-Disposition": 'attachment; filename="Greetings.CSV"'},
    )
    assert response.status_code == 201, response.text
    assert response.json()["name"] == "greetings" and response.json()["format"] == "csv"
    shown = (await api.client.get("/api/v1/datasets/greetings", headers=api.auth("viewer"))).json()["preview"]
    assert shown["columns"] == ["prompt", "answer"] and shown["rows"][1] == {"prompt": "2+2", "answer": "4"}


async def test_limits_names_roles(api: ApiEnv, tmp_path: Path) -> None:
    api.deps.services.max_dataset_bytes = 1000
    big = b"x" * 2000
    announced = await api.client.post("/api/v1/datasets?name=big", content=big, headers=api.auth())
    assert announced.status_code == 413 and announced.json()["error"] == "too_large"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"y" * 100

    streamed = await api.client.post("/api/v1/datasets?name=big", content=chunks(), headers=api.auth())
    assert streamed.status_code == 413
    assert not list((tmp_path / "datasets" / ".incoming").iterdir())  # nothing left behind
    for name in ("../evil", "UPPER", ".hidden", "a..b", "x" * 64, "a/b"):
        bad = await api.client.post("/api/v1/datasets", params={"name": name}, content=b"{}\n", headers=api.auth())
        assert bad.status_code == 422, (name, bad.text)
        assert bad.json()["error"] == "invalid_name"
    unnamed = await api.client.post("/api/v1/datasets", content=b"{}\n", headers=api.auth())
    assert unnamed.status_code == 422
    form = await api.client.post("/api/v1/datasets?name=f", files={"file": ("f.jsonl", b"{}\n")}, headers=api.auth())
    assert form.status_code == 415
    assert (await api.client.post("/api/v1/datasets?name=ok", content=b"{}\n")).status_code == 401
    denied = await api.client.post("/api/v1/datasets?name=ok", content=b"{}\n", headers=api.auth("viewer"))
    assert denied.status_code == 403
    assert (await api.client.get("/api/v1/datasets")).status_code == 401
    assert (await api.client.get("/api/v1/datasets/nope", headers=api.auth("viewer"))).status_code == 404
    assert (await api.client.get("/api/v1/datasets/..%2F..%2Fetc", headers=api.auth("viewer"))).status_code == 404
    assert sorted(p.name for p in (tmp_path / "datasets").iterdir()) == [".incoming"]
    api.deps.services.datasets = None
    off = await api.client.post("/api/v1/datasets?name=ok", content=b"{}\n", headers=api.auth())
    assert off.status_code == 503 and off.headers["retry-after"] == "1"

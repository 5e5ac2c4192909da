"""Pure core: datasets. Names, the fold of `dataset.uploaded` events, format detection and a preview of
the first rows (jsonl, json, csv/tsv; parquet is recognised, its rows need pyarrow).

A name is `[a-z0-9][a-z0-9._-]{0,62}` without `..`: one path component that can never leave its
folder, and never 64 hex characters long (the content-addressed blobs are named by their sha256).
A name points at its latest upload; an upload of the same bytes under the same name changes nothing.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Final, Literal

import msgspec

from verlyard_api.errors import BadRequest, NotFound
from verlyard_shared.envelope import Envelope
from verlyard_shared.events import DatasetUploaded

NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
DATASET_PREFIX: Final = "dataset-"
DATA_SUFFIXES: Final = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".pq")
HEAD_BYTES: Final = 64 * 1024
"""How much of a file format detection and the preview read."""
DEFAULT_PREVIEW_ROWS: Final = 5
MAX_PREVIEW_ROWS: Final = 50
MAX_CELL_CHARS: Final = 2000

Format = Literal["jsonl", "json", "csv", "tsv", "parquet", "unknown"]


class InvalidName(BadRequest):
    status = 422
    code = "invalid_name"


def validate_name(name: str, *, source: str = "name") -> str:
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"dataset {source} {name!r} is not valid: 1-63 characters of a-z, 0-9, '.', '_', '-', starting with a "
            "letter or digit, without '..'",
            issues=[{"path": source, "message": "must match [a-z0-9][a-z0-9._-]{0,62} without '..'", "line": None}],
        )
    return name


def name_from_filename(filename: str) -> str:
    """`/tmp/Sales_SFT.jsonl` -> `sales_sft`: the last path component, lower-cased, without a data suffix."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1].strip().lower()
    for suffix in DATA_SUFFIXES:
        if base.endswith(suffix) and len(base) > len(suffix):
            base = base[: -len(suffix)]
            break
    return base


def choose_name(name: str | None, filename: str | None) -> str:
    """The dataset's name: `?name=`, else derived from the filename; 422 when neither gives a valid one (an
    empty `?name=` is an invalid name, not a missing one)."""
    if name is not None:
        return validate_name(name)
    if filename:
        return validate_name(name_from_filename(filename), source="filename")
    raise InvalidName(
        "name the dataset: pass ?name=NAME (or ?filename=FILE, or a Content-Disposition filename)",
        issues=[{"path": "name", "message": "required", "line": None}],
    )


def check_filename(filename: str) -> str:
    """The original file name as recorded: its last path component, at most 255 characters; 422 when it
    holds control characters (a NUL cannot even be stored in the log's jsonb) or unpaired surrogates."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1][:255]
    if any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 for c in base):
        raise InvalidName(
            f"filename {base!r} holds control characters",
            issues=[{"path": "filename", "message": "must not hold control characters", "line": None}],
        )
    return base


def filename_of(content_disposition: str | None) -> str | None:
    """The `filename` of a Content-Disposition header, if any."""
    if not content_disposition:
        return None
    match = re.search(r'filename\*?=(?:UTF-8\'\')?"?([^";]+)"?', content_disposition, re.IGNORECASE)
    return match.group(1).strip() if match else None


# ---- the fold -----------------------------------------------------------------------------------------


class DatasetRecord(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    sha256: str
    size_bytes: int
    filename: str
    uploaded_at: datetime
    uploaded_by: str
    position: int


def fold_datasets(envelopes: Iterable[Envelope]) -> list[DatasetRecord]:
    """Every upload in log order."""
    records: list[DatasetRecord] = []
    for envelope in envelopes:
        event = envelope.event
        if isinstance(event, DatasetUploaded):
            records.append(
                DatasetRecord(
                    id=event.dataset_id,
                    name=event.name,
                    sha256=event.sha256,
                    size_bytes=event.size_bytes,
                    filename=event.filename,
                    uploaded_at=envelope.recorded_at,
                    uploaded_by=envelope.actor,
                    position=envelope.position,
                )
            )
    return records


def latest_by_name(records: Iterable[DatasetRecord]) -> dict[str, DatasetRecord]:
    latest: dict[str, DatasetRecord] = {}
    for record in records:
        latest[record.name] = record
    return latest


def find(records: list[DatasetRecord], ref: str) -> DatasetRecord:
    """A dataset by id, or by name (its latest upload); 404 otherwise."""
    for record in records:
        if record.id == ref:
            return record
    named = latest_by_name(records).get(ref)
    if named is None:
        raise NotFound(f"no dataset {ref!r} (by id or name)", dataset=ref)
    return named


def decide_upload(
    existing: DatasetRecord | None, *, dataset_id: str, name: str, sha256: str, size_bytes: int, filename: str
) -> DatasetUploaded | None:
    """The event of an upload; None when the name already points at these exact bytes."""
    if existing is not None and existing.sha256 == sha256:
        return None
    return DatasetUploaded(dataset_id=dataset_id, name=name, sha256=sha256, size_bytes=size_bytes, filename=filename)


# ---- format and preview -------------------------------------------------------------------------------


def detect_format(filename: str, head: bytes) -> Format:
    """By the filename's suffix, else by sniffing the first bytes (the agent's rules, plus tsv)."""
    lower = filename.lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".csv", "csv")):
        if lower.endswith(suffix):
            return fmt  # type: ignore[return-value]  # literal members
    if lower.endswith((".tsv", ".tab")):
        return "tsv"
    if lower.endswith((".parquet", ".pq")) or head.startswith(b"PAR1"):
        return "parquet"
    text = head.decode("utf-8-sig", errors="replace").lstrip()
    if text.startswith("["):
        return "json"
    if text.startswith("{"):
        return "jsonl"
    first = text.split("\n", 1)[0]
    if "\t" in first:
        return "tsv"
    if "," in first:
        return "csv"
    return "unknown"


class Preview(msgspec.Struct, kw_only=True):
    format: str
    rows: list[Any]
    columns: list[str] | None = None
    note: str = ""
    """Why the preview is empty or partial (a parquet file without pyarrow, a row that does not parse)."""


def _clip(value: Any) -> Any:
    """Long strings are cut so a preview stays small whatever the data."""
    if isinstance(value, str) and len(value) > MAX_CELL_CHARS:
        return value[:MAX_CELL_CHARS] + "..."
    if isinstance(value, dict):
        return {k: _clip(v) for k, v in value.items()}  # type: ignore[misc]
    if isinstance(value, list):
        return [_clip(v) for v in value]  # type: ignore[misc]
    return value


def _complete_lines(text: str, whole: bool) -> list[str]:
    lines = text.splitlines()
    if not whole and lines and not text.endswith("\n"):
        lines.pop()  # cut by the head: not a whole line
    return lines


def preview(fmt: Format, head: bytes, *, whole: bool, rows: int = DEFAULT_PREVIEW_ROWS) -> Preview:
    """The first `rows` rows of a file whose first bytes are `head` (`whole`: head is the entire file)."""
    if fmt == "parquet":
        return Preview(format=fmt, rows=[], note="parquet: the preview needs pyarrow on the API host")
    text = head.decode("utf-8-sig", errors="replace")
    if fmt == "jsonl":
        out: list[Any] = []
        for number, line in enumerate(_complete_lines(text, whole), start=1):
            if not line.strip():
                continue
            try:
                out.append(_clip(json.loads(line)))
            except json.JSONDecodeError as exc:
                return Preview(format=fmt, rows=out, note=f"line {number} is not JSON ({exc.msg})")
            if len(out) >= rows:
                break
        return Preview(format=fmt, rows=out)
    if fmt == "json":
        return _json_preview(text, rows)
    if fmt in ("csv", "tsv"):
        lines = _complete_lines(text, whole)
        reader = csv.reader(io.StringIO("\n".join(lines[: rows + 1])), delimiter="\t" if fmt == "tsv" else ",")
        table = list(reader)
        if not table:
            return Preview(format=fmt, rows=[], columns=[])
        header, body = table[0], table[1 : rows + 1]
        return Preview(
            format=fmt,
            columns=header,
            rows=[_clip(dict(zip(header, row, strict=False))) for row in body],
        )
    return Preview(format=fmt, rows=[], note="unknown format: name the file .jsonl, .json, .csv, .tsv or .parquet")


def _json_preview(text: str, rows: int) -> Preview:
    """The first elements of a JSON array, decoded one by one so a cut head still shows them."""
    decoder = json.JSONDecoder()
    at = len(text) - len(text.lstrip())
    if not text.startswith("[", at):
        try:
            return Preview(format="json", rows=[_clip(json.loads(text))])
        except json.JSONDecodeError as exc:
            return Preview(format="json", rows=[], note=f"not a JSON array ({exc.msg})")
    at += 1
    out: list[Any] = []
    while len(out) < rows:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]":
            break
        try:
            value, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            break  # the element runs past the head
        out.append(_clip(value))
    return Preview(format="json", rows=out)

"""Stage kind `preprocess`: a dataset file -> verl's chat `messages` parquet, split into train and val.

`with: {dataset: NAME-or-/abs/path, format: auto|jsonl|json|csv|parquet, val_fraction: 0.1, seed: 0,
max_dropped_fraction: null, tokenizer: null, max_length: null}`. jsonl/json/csv are read here with the
standard library (dataprep.py); parquet is read, and train/val parquet written, by the trainer's Python
(VERLYARD_TRAINER_PYTHON has pyarrow; the agent does not). Without a trainer Python the output is JSON
Lines, and the log and outputs say so. A bad row is dropped with its line number; a file with no
usable row fails the stage.

Outputs: `train_files`, `val_files`, `format`, `messages_key`, `rows` {total, train, val, dropped},
`dropped` (the first 100 {line, reason}), `token_lengths` (count/min/max/mean/p50/p95/total, in the
tokens of `with.tokenizer` — a local model or tokenizer folder, counted by the trainer's Python through
the chat template — or in whitespace words without it; with `with.max_length`, `over_max_length`),
`dataset`.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from verlyard_agent.dataprep import (
    DatasetError,
    Dropped,
    Example,
    convert,
    detect_format,
    iter_csv,
    iter_json,
    iter_jsonl,
    length_stats,
    split_indices,
    verl_record,
    whitespace_tokens,
)
from verlyard_agent.stages.base import AttemptContext, StageFailure, StageResult

DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".pq")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")
MAX_LOGGED_DROPS = 1000
MAX_REPORTED_DROPS = 100

# Runs in the trainer's Python (pyarrow), never imported by the agent.
PARQUET_SCRIPT = r"""
import json, sys
import pyarrow as pa
import pyarrow.parquet as pq

mode = sys.argv[1]
if mode == "read":
    src, dst = sys.argv[2], sys.argv[3]
    table = pq.read_table(src)
    with open(dst, "w", encoding="utf-8") as out:
        for batch in table.to_batches(max_chunksize=4096):
            for row in batch.to_pylist():
                out.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    print(f"read {table.num_rows} rows from {src}")
elif mode == "write":
    for src, dst in zip(sys.argv[2::2], sys.argv[3::2]):
        with open(src, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        pq.write_table(pa.Table.from_pylist(rows), dst)
        print(f"wrote {len(rows)} rows to {dst}")
else:
    sys.exit(f"unknown mode {mode!r}")
"""

# Runs in the trainer's Python (transformers), never imported by the agent: each row's length in the
# tokens of the model's own tokenizer, through its chat template when it has one (what SFT will see).
TOKENS_SCRIPT = r"""
import json, sys
from transformers import AutoTokenizer

tok = AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)
templated = bool(getattr(tok, "chat_template", None))
lengths = []
for src in sys.argv[3:]:
    with open(src, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            messages = json.loads(line)["messages"]
            if templated:
                ids = tok.apply_chat_template(messages, tokenize=True)
                if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding (a mapping)
                    ids = ids["input_ids"]
            else:
                ids = tok("\n".join(m["content"] for m in messages))["input_ids"]
            lengths.append(len(ids))
with open(sys.argv[2], "w", encoding="utf-8") as out:
    json.dump({"lengths": lengths, "chat_template": templated}, out)
print(f"counted tokens of {len(lengths)} rows with {sys.argv[1]} (chat template: {templated})")
"""


def resolve_dataset(value: object, datasets_dir: Path) -> Path:
    """An absolute path as given (no `..`), or a pushed dataset's name inside `datasets_dir`."""
    if not isinstance(value, str) or not value.strip():
        raise StageFailure("`with.dataset` is required: a pushed dataset's name, or an absolute path on the host")
    if value.startswith("/"):
        path = Path(value)
        if ".." in path.parts:
            raise StageFailure(f"dataset path {value!r} must not contain '..'")
        if not path.is_file():
            raise StageFailure(f"dataset {value} does not exist on this host (or is not a file)")
        return path
    if not _NAME.fullmatch(value) or ".." in value:
        raise StageFailure(
            f"dataset {value!r} is neither an absolute path nor a dataset name (letters, digits, '.', '_', '-')"
        )
    root = datasets_dir.resolve()
    candidates = [datasets_dir / value, *(datasets_dir / f"{value}{suffix}" for suffix in DATA_SUFFIXES)]
    folder = datasets_dir / value
    if folder.is_dir():
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        if len(files) == 1:
            candidates.insert(0, files[0])
        elif len(files) > 1:
            raise StageFailure(f"dataset {value!r} holds {len(files)} data files; name one by its absolute path")
    for candidate in candidates:
        if candidate.is_file():
            resolved = candidate.resolve()
            if not resolved.is_relative_to(root):
                raise StageFailure(f"dataset {value!r} points outside the datasets folder {root}")
            return resolved
    raise StageFailure(f"no dataset named {value!r} on this host (looked in {datasets_dir})")


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DatasetError(f"line {line}: not UTF-8 text (byte {exc.start})") from None


def _jsonl_rows(path: Path) -> Iterator[tuple[int, object] | Dropped]:
    """Rows of a JSON Lines file, read line by line; a line that is not UTF-8 is dropped."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield Dropped(line=number, reason=f"not UTF-8 text (byte {exc.start} of the line)")
                continue
            yield from iter_jsonl([text], first_line=number)


def parse_file(path: Path, fmt: str) -> tuple[list[Example], list[Dropped]]:
    """Read and convert a jsonl/json/csv file (runs in a thread: big files take a while)."""
    if path.stat().st_size == 0:
        raise DatasetError("the file is empty")
    if fmt == "jsonl":
        return convert(_jsonl_rows(path))
    text = _decode(path.read_bytes())
    if fmt == "json":
        return convert(iter_json(text))
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    return convert(iter_csv(text.splitlines(keepends=True), delimiter=delimiter))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


async def _trainer(ctx: AttemptContext, *args: str) -> None:
    python = ctx.trainer_python
    assert python is not None
    script = ctx.work_dir / "_verlyard_parquet.py"
    script.write_text(PARQUET_SCRIPT)
    code = await ctx.run_process([python, str(script), *args], cwd=ctx.work_dir)
    if code != 0:
        raise StageFailure(
            f"the trainer's Python ({python}) could not {args[0]} parquet (exit code {code}; see the log: "
            "it needs pyarrow)",
            failure_class="infra",
            exit_code=code,
        )


async def _token_lengths(
    ctx: AttemptContext, tokenizer: object, max_length: object, examples: list[Example], *, pairs_of: list[Path]
) -> dict[str, Any]:
    """Token-length stats: with `with.tokenizer` (a local model or tokenizer folder) in that tokenizer's
    tokens, counted by the trainer's Python; without it, whitespace-separated words (a rough guide).
    With `with.max_length`, how many rows are longer (SFT truncates or drops them)."""
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1):
        raise StageFailure(f"`with.max_length` must be a positive integer, got {max_length!r}")
    if tokenizer is None:
        lengths = [whitespace_tokens(e) for e in examples]
        name = "whitespace"
    else:
        if not isinstance(tokenizer, str) or not tokenizer.startswith("/") or ".." in Path(tokenizer).parts:
            raise StageFailure(
                f"`with.tokenizer` must be an absolute path to a model or tokenizer folder, got {tokenizer!r}"
            )
        if not await asyncio.to_thread(Path(tokenizer).is_dir):
            raise StageFailure(f"`with.tokenizer`: {tokenizer} is not a folder on this host")
        if ctx.trainer_python is None:
            raise StageFailure(
                "`with.tokenizer` needs VERLYARD_TRAINER_PYTHON (a Python with transformers)", failure_class="infra"
            )
        script, out = ctx.work_dir / "_verlyard_tokens.py", ctx.work_dir / "token-lengths.json"
        script.write_text(TOKENS_SCRIPT)
        code = await ctx.run_process(
            [ctx.trainer_python, str(script), tokenizer, str(out), *map(str, pairs_of)], cwd=ctx.work_dir
        )
        if code != 0:
            raise StageFailure(
                f"counting tokens with {tokenizer} failed (exit code {code}; see the log)", exit_code=code
            )
        lengths = [int(n) for n in json.loads(await asyncio.to_thread(out.read_text))["lengths"]]
        name = tokenizer
    stats: dict[str, Any] = {**length_stats(lengths), "tokenizer": name}
    if isinstance(max_length, int):
        stats["max_length"] = max_length
        stats["over_max_length"] = sum(1 for n in lengths if n > max_length)
        if stats["over_max_length"]:
            ctx.log(f"{stats['over_max_length']} of {len(lengths)} rows are longer than max_length {max_length}")
    return stats


def _number(value: object, what: str, *, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise StageFailure(f"`with.{what}` must be a number in [{low}, {high}], got {value!r}")
    return float(value)


async def _dataset(ctx: AttemptContext, value: object) -> Path:
    """The dataset's local path; a pushed dataset this host does not have yet is fetched first."""
    try:
        return resolve_dataset(value, ctx.datasets_dir)
    except StageFailure as missing:
        if not (isinstance(value, str) and _NAME.fullmatch(value) and ".." not in value):
            raise
        if not missing.reason.startswith("no dataset named"):
            raise
        if await ctx.fetch_dataset(value) is None:
            raise
        return resolve_dataset(value, ctx.datasets_dir)


async def run(ctx: AttemptContext) -> StageResult:
    params = ctx.params
    path = await _dataset(ctx, params.get("dataset"))
    val_fraction = _number(params.get("val_fraction", 0.1), "val_fraction", low=0.0, high=0.99)
    seed = params.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise StageFailure(f"`with.seed` must be an integer, got {seed!r}")
    max_dropped = params.get("max_dropped_fraction")
    if max_dropped is not None:
        max_dropped = _number(max_dropped, "max_dropped_fraction", low=0.0, high=1.0)
    requested = str(params.get("format", "auto"))
    with path.open("rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace")
    try:
        fmt = detect_format(path.name, head, requested=requested)
    except DatasetError as exc:
        raise StageFailure(f"dataset {path}: {exc}") from None
    ctx.log(f"reading {path} as {fmt}")
    source = path
    if fmt == "parquet":
        if ctx.trainer_python is None:
            raise StageFailure(
                f"dataset {path} is parquet: reading it needs VERLYARD_TRAINER_PYTHON (a Python with pyarrow)",
                failure_class="infra",
            )
        source = ctx.work_dir / "source-rows.jsonl"
        await _trainer(ctx, "read", str(path), str(source))
    try:
        examples, dropped = await asyncio.to_thread(parse_file, source, "jsonl" if fmt == "parquet" else fmt)
    except DatasetError as exc:
        raise StageFailure(f"dataset {path}: {exc}") from None
    unit = "row" if fmt == "parquet" else "line"
    for item in dropped[:MAX_LOGGED_DROPS]:
        ctx.log(f"dropped {unit} {item.line}: {item.reason}")
    if len(dropped) > MAX_LOGGED_DROPS:
        ctx.log(f"... and {len(dropped) - MAX_LOGGED_DROPS} more dropped rows")
    total = len(examples) + len(dropped)
    reported = [{"line": d.line, "reason": d.reason} for d in dropped[:MAX_REPORTED_DROPS]]
    if not examples:
        first = "; ".join(f"{unit} {d.line}: {d.reason}" for d in dropped[:3])
        raise StageFailure(
            f"dataset {path}: no usable rows ({len(dropped)} dropped{'; ' + first if first else ''})",
        )
    if max_dropped is not None and total and len(dropped) / total > max_dropped:
        return StageResult(
            outcome="failed",
            failure_class="user",
            reason=f"dataset {path}: {len(dropped)} of {total} rows dropped, more than max_dropped_fraction "
            f"{max_dropped:g}",
            outputs={"dropped": reported, "rows": {"total": total, "dropped": len(dropped)}},
        )
    train_idx, val_idx = split_indices(len(examples), val_fraction=val_fraction, seed=seed)
    src = path.stem  # verl's data_source (RL reward functions dispatch on it)
    train_rows = [verl_record(examples[i], index=n, split="train", data_source=src) for n, i in enumerate(train_idx)]
    val_rows = [verl_record(examples[i], index=n, split="val", data_source=src) for n, i in enumerate(val_idx)]
    train_jsonl, val_jsonl = ctx.work_dir / "train.jsonl", ctx.work_dir / "val.jsonl"
    await asyncio.to_thread(_write_jsonl, train_jsonl, train_rows)
    if val_rows:
        await asyncio.to_thread(_write_jsonl, val_jsonl, val_rows)
    out_format = "jsonl"
    train_files, val_files = [str(train_jsonl)], [str(val_jsonl)] if val_rows else []
    if ctx.trainer_python is not None:
        pairs = [str(train_jsonl), str(ctx.work_dir / "train.parquet")]
        if val_rows:
            pairs += [str(val_jsonl), str(ctx.work_dir / "val.parquet")]
        await _trainer(ctx, "write", *pairs)
        out_format = "parquet"
        train_files = [str(ctx.work_dir / "train.parquet")]
        val_files = [str(ctx.work_dir / "val.parquet")] if val_rows else []
    else:
        ctx.log("VERLYARD_TRAINER_PYTHON is not set: wrote JSON Lines (verl reads parquet; set it to get parquet)")
    token_lengths = await _token_lengths(
        ctx,
        params.get("tokenizer"),
        params.get("max_length"),
        examples,
        pairs_of=([train_jsonl, val_jsonl] if val_rows else [train_jsonl]),
    )
    rows = {"total": total, "train": len(train_rows), "val": len(val_rows), "dropped": len(dropped)}
    ctx.log(
        f"{rows['train']} train rows, {rows['val']} val rows, {rows['dropped']} dropped "
        f"(val_fraction {val_fraction:g}, seed {seed}); {out_format} in {ctx.work_dir}"
    )
    outputs: dict[str, Any] = {
        "train_files": train_files,
        "val_files": val_files,
        "format": out_format,
        "messages_key": "messages",
        "rows": rows,
        "dropped": reported,
        "token_lengths": token_lengths,
        "dataset": str(path),
        "val_fraction": val_fraction,
        "seed": seed,
    }
    if out_format == "jsonl":
        outputs["note"] = "VERLYARD_TRAINER_PYTHON was not set: the files are JSON Lines, not parquet"
    return StageResult(outcome="succeeded", outputs=outputs)

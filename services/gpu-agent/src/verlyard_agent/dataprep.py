"""Pure core: turn dataset rows (jsonl/json/csv text, or parquet rows read by the trainer's Python) into
verl's chat `messages` format, with a deterministic train/val split and token-length stats.

Row forms, recognised per row: `messages` (list of {role, content}); ShareGPT `conversations`
({from, value}); `instruction` [+ `input`] + `output` (Alpaca); `prompt`/`question`/`query` +
`response`/`completion`/`answer`. An optional `system` string is prepended. A bad row is dropped
with its line number and the reason; it never stops the others. Line numbers are 1-based physical
lines (the first line of a multi-line CSV record; the row number for parquet).
"""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

FileFormat = Literal["jsonl", "json", "csv", "parquet"]
FILE_FORMATS: tuple[str, ...] = ("jsonl", "json", "csv", "parquet")
ROLES = frozenset({"system", "user", "assistant", "tool"})
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_PROMPT_KEYS = ("prompt", "question", "query")
_RESPONSE_KEYS = ("response", "completion", "answer")
_ANSWER_KEYS = ("ground_truth", "answer")
MAX_REASON = 200


class DatasetError(ValueError):
    """The file as a whole cannot be used (empty, not the format it claims, no usable row)."""


@dataclass(frozen=True, kw_only=True)
class Example:
    line: int
    messages: tuple[tuple[str, str], ...]
    """(role, content) pairs, ending with an assistant turn."""
    answer: str | None = None
    """A reference answer when the data has one (exact-match evaluation; RL ground truth)."""


@dataclass(frozen=True, kw_only=True)
class Dropped:
    line: int
    reason: str


def _short(text: str) -> str:
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


# ---- file formats ----------------------------------------------------------------------------------


def detect_format(name: str, head: str, *, requested: str = "auto") -> FileFormat:
    """The file format: `requested` when not auto, else the extension, else a sniff of the first bytes."""
    if requested != "auto":
        if requested not in FILE_FORMATS:
            raise DatasetError(f"format {requested!r} is not one of auto, {', '.join(FILE_FORMATS)}")
        return cast(FileFormat, requested)
    lower = name.lower()
    for suffix, fmt in ((".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "json"), (".csv", "csv")):
        if lower.endswith(suffix):
            return cast(FileFormat, fmt)
    if lower.endswith((".tsv", ".tab")):
        return "csv"
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    stripped = head.lstrip()
    if stripped.startswith("["):
        return "json"
    if stripped.startswith("{"):
        return "jsonl"
    if head.startswith("PAR1"):
        return "parquet"
    if "," in head.split("\n", 1)[0]:
        return "csv"
    raise DatasetError(f"cannot tell the format of {name!r}: name it .jsonl, .json, .csv or .parquet, or set `format`")


def _json_error(exc: json.JSONDecodeError) -> str:
    return f"not valid JSON ({exc.msg} at column {exc.colno})"


def iter_jsonl(lines: Iterable[str], *, first_line: int = 1) -> Iterator[tuple[int, object] | Dropped]:
    """(line, value) per non-blank line, or Dropped for a line that is not JSON."""
    for number, line in enumerate(lines, start=first_line):
        text = line.strip()
        if not text:
            continue
        try:
            yield number, json.loads(text)
        except json.JSONDecodeError as exc:
            yield Dropped(line=number, reason=_json_error(exc))
        except RecursionError:
            yield Dropped(line=number, reason="JSON nested too deeply")


def iter_json(text: str) -> Iterator[tuple[int, object] | Dropped]:
    """A JSON array of rows (line numbers of each element), one JSON object, or JSON Lines named .json."""
    stripped = text.lstrip()
    if not stripped:
        raise DatasetError("the file is empty")
    if not stripped.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg == "Extra data":  # one object per line: JSON Lines under a .json name
                yield from iter_jsonl(text.splitlines())
                return
            raise DatasetError(f"line {exc.lineno}: {_json_error(exc)}") from None
        yield 1, value
        return
    decoder = json.JSONDecoder()
    pos = len(text) - len(stripped) + 1
    line = text.count("\n", 0, pos) + 1
    counted = pos
    expect_value = True
    while True:
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            raise DatasetError(f"line {text.count(chr(10)) + 1}: the JSON array is not closed (missing ']')")
        if text[pos] == "]":
            return
        if not expect_value:
            if text[pos] != ",":
                line += text.count("\n", counted, pos)
                counted = pos
                raise DatasetError(f"line {line}: expected ',' or ']' between rows of the JSON array")
            pos += 1
            expect_value = True
            continue
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DatasetError(
                f"line {exc.lineno}: {_json_error(exc)}; a JSON array cannot be read past a syntax error "
                "(JSON Lines can: one row per line)"
            ) from None
        yield line, value
        pos = end
        expect_value = False


def iter_csv(lines: Iterable[str], *, delimiter: str = ",") -> Iterator[tuple[int, object] | Dropped]:
    """One dict per record, keyed by the header; a `messages`/`conversations` cell is parsed as JSON."""
    reader = csv.reader(lines, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError("the file is empty") from None
    except csv.Error as exc:
        raise DatasetError(f"line 1: cannot read the CSV header ({exc})") from None
    names = [h.strip() for h in header]
    if not any(names):
        raise DatasetError("line 1: the CSV header is empty")
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield Dropped(line=start, reason=f"not valid CSV ({exc})")
            continue
        if not record or all(not cell.strip() for cell in record):
            continue
        if len(record) != len(names):
            yield Dropped(line=start, reason=f"expected {len(names)} fields (the header's), found {len(record)}")
            continue
        row: dict[str, object] = dict(zip(names, record, strict=True))
        for key in ("messages", "conversations"):
            cell = row.get(key)
            if isinstance(cell, str) and cell.strip():
                try:
                    row[key] = json.loads(cell)
                except json.JSONDecodeError as exc:
                    row[key] = None
                    yield Dropped(line=start, reason=f"column {key!r}: {_json_error(exc)}")
                    break
        else:
            yield start, row


# ---- row forms -----------------------------------------------------------------------------------


def _text(value: object, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{what} must be text, not {'null' if value is None else 'a boolean'}")
    if isinstance(value, int | float):
        return str(value)
    raise ValueError(f"{what} must be text, not {type(value).__name__}")


def _messages(value: object, *, key: str) -> list[tuple[str, str]]:
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{key!r} must be a non-empty list of messages")
    out: list[tuple[str, str]] = []
    items = cast(Sequence[object], value)
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise ValueError(f"{key}[{i}] must be an object with role and content")
        message = cast(Mapping[str, object], item)
        if key == "conversations":
            raw_role = message.get("from", message.get("role"))
            role = _SHAREGPT_ROLES.get(str(raw_role))
            content_value = message.get("value", message.get("content"))
        else:
            raw_role = message.get("role")
            role = raw_role if isinstance(raw_role, str) and raw_role in ROLES else None
            content_value = message.get("content")
        if role is None:
            raise ValueError(f"{key}[{i}] has role {raw_role!r} (expected one of {', '.join(sorted(ROLES))})")
        out.append((role, _text(content_value, f"{key}[{i}].content")))
    return out


def _first(row: Mapping[str, object], keys: Sequence[str]) -> tuple[str, object] | None:
    for key in keys:
        if key in row and row[key] is not None and row[key] != "":
            return key, row[key]
    return None


def to_example(value: object, line: int) -> Example | Dropped:
    """One row in any accepted form -> an Example (or why it was dropped)."""
    if not isinstance(value, Mapping):
        return Dropped(line=line, reason=f"a row must be an object, not {type(value).__name__}")
    row = cast(Mapping[str, object], value)
    try:
        system = row.get("system")
        prefix: list[tuple[str, str]] = [("system", _text(system, "system"))] if system not in (None, "") else []
        answer_field = _first(row, _ANSWER_KEYS)
        if "messages" in row or "conversations" in row:
            key = "messages" if "messages" in row else "conversations"
            turns = _messages(row[key], key=key)
            if turns and turns[0][0] == "system":
                prefix = []
            messages = prefix + turns
        elif "instruction" in row:
            instruction = _text(row["instruction"], "instruction")
            extra = row.get("input")
            user = instruction if extra in (None, "") else f"{instruction}\n\n{_text(extra, 'input')}"
            if "output" not in row:
                raise ValueError("an instruction row needs 'output'")
            messages = [*prefix, ("user", user), ("assistant", _text(row["output"], "output"))]
        else:
            prompt = _first(row, _PROMPT_KEYS)
            response = _first(row, _RESPONSE_KEYS)
            if prompt is None or response is None:
                keys = ", ".join(sorted(row)) or "none"
                raise ValueError(
                    f"unrecognised row (keys: {keys}); expected messages, conversations, "
                    "instruction/input/output or prompt/response"
                )
            if response[0] == "answer":
                answer_field = None  # the answer is the response itself here
            if isinstance(prompt[1], list | tuple):
                turns = _messages(cast(Sequence[object], prompt[1]), key=prompt[0])
            else:
                turns = [("user", _text(prompt[1], prompt[0]))]
            messages = [*prefix, *turns, ("assistant", _text(response[1], response[0]))]
        answer = _text(answer_field[1], answer_field[0]) if answer_field is not None else None
    except ValueError as exc:
        return Dropped(line=line, reason=_short(str(exc)))
    roles = [role for role, _ in messages]
    if "user" not in roles:
        return Dropped(line=line, reason="no user message")
    if "assistant" not in roles:
        return Dropped(line=line, reason="no assistant message (nothing to learn from)")
    last_assistant = max(i for i, role in enumerate(roles) if role == "assistant")
    if not messages[last_assistant][1].strip():
        return Dropped(line=line, reason="the assistant's reply is empty")
    return Example(line=line, messages=tuple(messages), answer=answer)


def convert(parsed: Iterable[tuple[int, object] | Dropped]) -> tuple[list[Example], list[Dropped]]:
    examples: list[Example] = []
    dropped: list[Dropped] = []
    for item in parsed:
        if isinstance(item, Dropped):
            dropped.append(item)
            continue
        result = to_example(item[1], item[0])
        if isinstance(result, Dropped):
            dropped.append(result)
        else:
            examples.append(result)
    return examples, dropped


# ---- split, stats and verl rows --------------------------------------------------------------------


def split_indices(n: int, *, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (seeded shuffle) split of `n` rows. With val_fraction > 0 and n >= 2, both sides get
    at least one row; indices come back in file order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError("val_fraction must be in [0, 1)")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return train, val


def whitespace_tokens(example: Example) -> int:
    return sum(len(content.split()) for _, content in example.messages)


def length_stats(lengths: Sequence[int]) -> dict[str, float | int]:
    if not lengths:
        return {"count": 0}
    ordered = sorted(lengths)

    def pct(p: float) -> int:
        return ordered[min(len(ordered) - 1, int(p * (len(ordered) - 1) + 0.5))]

    return {
        "count": len(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "mean": round(sum(ordered) / len(ordered), 2),
        "p50": pct(0.5),
        "p95": pct(0.95),
        "total": sum(ordered),
    }


def verl_record(example: Example, *, index: int, split: str, data_source: str) -> dict[str, Any]:
    """One output row. `messages` feeds verl SFT (`data.messages_key`); `prompt`, `data_source` and
    `reward_model.ground_truth` are what verl's RL trainers read. Every row has the same keys (parquet
    infers its schema from them)."""
    messages = [{"role": role, "content": content} for role, content in example.messages]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ground_truth = example.answer if example.answer is not None else messages[last]["content"]
    return {
        "messages": messages,
        "prompt": messages[:last],
        "data_source": data_source,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {"index": index, "split": split, "line": example.line},
    }

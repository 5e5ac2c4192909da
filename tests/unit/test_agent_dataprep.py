"""Unit: preprocess conversion on small inputs: every accepted row form, malformed rows dropped with
their line numbers, wholly bad files refused with a clear error, a deterministic split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    to_example,
    verl_record,
    whitespace_tokens,
)
from verlyard_agent.stages.base import StageFailure
from verlyard_agent.stages.preprocess import parse_file, resolve_dataset


def ex(value: object) -> Example:
    got = to_example(value, 1)
    assert isinstance(got, Example), got
    return got


def dropped(value: object) -> str:
    got = to_example(value, 1)
    assert isinstance(got, Dropped), got
    return got.reason


def test_every_row_form_becomes_messages():
    assert ex({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}).messages == (
        ("user", "hi"),
        ("assistant", "yo"),
    )
    assert ex({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}).messages == (
        ("user", "q"),
        ("assistant", "a"),
    )
    assert ex({"instruction": "Add", "input": "1 2", "output": "3"}).messages == (
        ("user", "Add\n\n1 2"),
        ("assistant", "3"),
    )
    assert ex({"instruction": "Say hi", "input": "", "output": "hi"}).messages[0] == ("user", "Say hi")
    assert ex({"prompt": "p", "response": "r", "system": "be nice"}).messages == (
        ("system", "be nice"),
        ("user", "p"),
        ("assistant", "r"),
    )
    assert ex({"prompt": "p", "completion": 42}).messages[-1] == ("assistant", "42")
    qa = ex({"question": "2+2?", "answer": "4"})
    assert qa.messages[-1] == ("assistant", "4") and qa.answer is None
    assert ex({"prompt": [{"role": "user", "content": "p"}], "response": "r", "answer": "r"}).answer == "r"


def test_bad_rows_say_why():
    assert "must be an object" in dropped([1, 2])
    assert "unrecognised row (keys: foo)" in dropped({"foo": 1})
    assert "needs 'output'" in dropped({"instruction": "x"})
    assert "no assistant message" in dropped({"messages": [{"role": "user", "content": "hi"}]})
    assert "role 'bot'" in dropped({"messages": [{"role": "bot", "content": "hi"}]})
    assert "reply is empty" in dropped({"prompt": "p", "response": "  "})
    assert "unrecognised row" in dropped({"prompt": None, "response": "r"})
    assert "must be text, not a boolean" in dropped({"prompt": True, "response": "r"})
    assert "non-empty list" in dropped({"messages": []})


def test_jsonl_keeps_line_numbers_of_dropped_rows():
    text = '{"prompt": "a", "response": "b"}\n\nnot json\n{"prompt": "c"}\n{"prompt": "d", "response": "e"}\n'
    examples, drops = convert(iter_jsonl(text.splitlines()))
    assert [e.line for e in examples] == [1, 5]
    assert [(d.line, d.reason.split(" (")[0]) for d in drops] == [(3, "not valid JSON"), (4, "unrecognised row")]


def test_a_json_array_reports_each_elements_line():
    text = '[\n  {"prompt": "a", "response": "b"},\n  {"bad": 1},\n  {"prompt": "c",\n   "response": "d"}\n]'
    examples, drops = convert(iter_json(text))
    assert [e.line for e in examples] == [2, 4] and [d.line for d in drops] == [3]


def test_a_broken_json_array_is_a_file_error_naming_the_line():
    with pytest.raises(DatasetError, match=r"line 3: not valid JSON"):
        list(iter_json('[\n {"a": 1},\n {"a": x}\n]'))
    with pytest.raises(DatasetError, match="not closed"):
        list(iter_json('[{"a": 1}'))
    with pytest.raises(DatasetError, match="empty"):
        list(iter_json("  "))


def test_json_lines_under_a_json_name_are_read_as_json_lines():
    examples, _ = convert(iter_json('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n'))
    assert len(examples) == 2


def test_csv_with_quoted_newlines_and_short_records():
    text = 'prompt,response\n"multi\nline",ok\nonly-one-field\nq,a\n'
    examples, drops = convert(iter_csv(text.splitlines(keepends=True)))
    assert [e.line for e in examples] == [2, 5]
    assert examples[0].messages[0] == ("user", "multi\nline")
    assert [(d.line, d.reason) for d in drops] == [(4, "expected 2 fields (the header's), found 1")]


def test_csv_messages_column_is_json():
    text = 'messages\n"[{""role"": ""user"", ""content"": ""hi""}, {""role"": ""assistant"", ""content"": ""yo""}]"\n'
    text += "not-json\n"
    examples, drops = convert(iter_csv(text.splitlines(keepends=True)))
    assert len(examples) == 1 and drops[0].line == 3 and "column 'messages'" in drops[0].reason


def test_format_detection():
    assert detect_format("a.JSONL", "") == "jsonl" and detect_format("a.tsv", "") == "csv"
    assert detect_format("data", "[{") == "json" and detect_format("data", '{"a"') == "jsonl"
    assert detect_format("data.parquet", "") == "parquet" and detect_format("x.txt", "a,b\n1,2") == "csv"
    assert detect_format("x.json", "", requested="csv") == "csv"
    with pytest.raises(DatasetError, match="cannot tell"):
        detect_format("x.bin", "\x00\x01")
    with pytest.raises(DatasetError, match="not one of"):
        detect_format("x.json", "", requested="xml")


def test_the_split_is_deterministic_and_never_leaves_a_side_empty():
    train, val = split_indices(10, val_fraction=0.2, seed=1)
    assert (train, val) == split_indices(10, val_fraction=0.2, seed=1)
    assert len(val) == 2 and sorted(train + val) == list(range(10)) and train == sorted(train)
    assert split_indices(10, val_fraction=0.2, seed=2) != (train, val)
    assert [len(x) for x in split_indices(2, val_fraction=0.01, seed=0)] == [1, 1]
    assert split_indices(3, val_fraction=0.0, seed=0) == ([0, 1, 2], [])
    assert split_indices(1, val_fraction=0.5, seed=0) == ([0], [])


def test_stats_and_verl_rows():
    e = ex({"prompt": "two words", "response": "three more words", "system": "s"})
    assert whitespace_tokens(e) == 6
    assert length_stats([]) == {"count": 0}
    stats = length_stats([1, 2, 3, 4, 100])
    assert (stats["min"], stats["max"], stats["p50"], stats["mean"]) == (1, 100, 3, 22.0)
    row = verl_record(e, index=0, split="train", data_source="d")
    assert row["messages"][-1] == {"role": "assistant", "content": "three more words"}
    assert row["prompt"] == row["messages"][:-1] and row["reward_model"]["ground_truth"] == "three more words"
    assert json.dumps(row)


# ---- the preprocess kind's file handling (tmp files, no agent) -------------------------------------------


def test_parse_file_drops_lines_that_are_not_utf8(tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n\xff\xfe{"x"\n')
    examples, drops = parse_file(path, "jsonl")
    assert len(examples) == 1 and drops[0].line == 2 and "not UTF-8" in drops[0].reason
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    with pytest.raises(DatasetError, match="empty"):
        parse_file(empty, "jsonl")


def test_datasets_resolve_by_name_inside_their_folder_only(tmp_path: Path):
    datasets = tmp_path / "datasets"
    datasets.mkdir()
    (datasets / "sales.jsonl").write_text("{}\n")
    (datasets / "folder").mkdir()
    (datasets / "folder" / "only.csv").write_text("a\n")
    outside = tmp_path / "secret.jsonl"
    outside.write_text("{}\n")
    (datasets / "escape.jsonl").symlink_to(outside)
    assert resolve_dataset("sales", datasets).name == "sales.jsonl"
    assert resolve_dataset("folder", datasets).name == "only.csv"
    assert resolve_dataset(str(outside), datasets) == outside, "an absolute path is used as given"
    for bad, message in [
        ("../secret", "neither an absolute path nor a dataset name"),
        ("escape", "outside the datasets folder"),
        ("missing", "no dataset named"),
        ("/tmp/../etc/passwd", "must not contain '..'"),
        ("", "required"),
        (str(tmp_path / "nope.jsonl"), "does not exist"),
    ]:
        with pytest.raises(StageFailure, match=message):
            resolve_dataset(bad, datasets)

"""Unit: agents (fold, drain decision, the public shape with live heartbeats) and datasets (names, format
detection, previews, the fold and the upload decision)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verlyard_api.agents import ActiveAttempt, agents_out, count_by_state, decide_drain, fold_agents, newer
from verlyard_api.datasets import (
    InvalidName,
    choose_name,
    decide_upload,
    detect_format,
    filename_of,
    find,
    fold_datasets,
    name_from_filename,
    preview,
    validate_name,
)
from verlyard_api.errors import Conflict, NotFound
from verlyard_shared.envelope import Envelope
from verlyard_shared.events import (
    AgentDeregistered,
    AgentDrainRequested,
    AgentLost,
    AgentRegistered,
    AnyEvent,
    DatasetUploaded,
    GpuInfo,
)
from verlyard_shared.reports import AgentHeartbeat, GpuStatus

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def envelopes(stream_events: list[tuple[str, AnyEvent]]) -> list[Envelope]:
    versions: dict[str, int] = {}
    out: list[Envelope] = []
    for position, (stream, event) in enumerate(stream_events, start=1):
        versions[stream] = versions.get(stream, 0) + 1
        out.append(
            Envelope(
                position=position,
                event_id=f"e{position}",
                stream_id=stream,
                version=versions[stream],
                recorded_at=T0 + timedelta(seconds=position),
                actor="test",
                correlation_id="c",
                event=event,
            )
        )
    return out


GPU = GpuInfo(index=0, name="H100", uuid="GPU-1", memory_total_mb=81_920)


def registered(agent: str) -> AgentRegistered:
    return AgentRegistered(agent=agent, hostname=f"{agent}.lan", gpus=(GPU,), cpu_slots=4, labels={"zone": "a"})


def test_agent_states_follow_the_scheduler_rules() -> None:
    log = envelopes(
        [
            ("agent-g1", registered("g1")),
            ("agent-g2", registered("g2")),
            ("agent-g3", registered("g3")),
            ("agent-g1", AgentDrainRequested(agent="g1", reason="maintenance")),
            ("agent-g2", AgentLost(agent="g2", reason="no heartbeat")),
            ("agent-g3", AgentDeregistered(agent="g3")),
            ("agent-g3", AgentLost(agent="g3", reason="late")),  # a stopped agent stays stopped
            ("pipeline-x", AgentLost(agent="g1", reason="wrong stream")),
        ]
    )
    agents = fold_agents(log)
    assert {a: r.state for a, r in agents.items()} == {"g1": "draining", "g2": "lost", "g3": "stopped"}
    assert agents["g1"].reason == "maintenance" and agents["g1"].gpus == (GPU,)
    assert count_by_state(agents.values()) == {"active": 0, "draining": 1, "lost": 1, "stopped": 1}
    back = fold_agents([*log, *envelopes([("agent-g2", registered("g2"))] * 4)[3:]])
    assert back["g2"].state == "active"
    assert fold_agents(log + log)["g1"].state == "draining"  # re-delivered envelopes change nothing


def test_drain_decision() -> None:
    agents = fold_agents(envelopes([("agent-g1", registered("g1")), ("agent-g2", registered("g2"))]))
    event = decide_drain(agents["g1"], "g1", "why")
    assert event == AgentDrainRequested(agent="g1", reason="why")
    with pytest.raises(NotFound):
        decide_drain(None, "nope", "why")
    draining = fold_agents(envelopes([("agent-g1", registered("g1")), ("agent-g1", AgentDrainRequested(agent="g1"))]))
    assert decide_drain(draining["g1"], "g1", "again") is None
    lost = fold_agents(envelopes([("agent-g1", registered("g1")), ("agent-g1", AgentLost(agent="g1", reason="x"))]))
    with pytest.raises(Conflict):
        decide_drain(lost["g1"], "g1", "x")


def test_agents_out_joins_heartbeats_and_attempts() -> None:
    agents = fold_agents(envelopes([("agent-g1", registered("g1")), ("agent-g2", registered("g2"))]))
    beat = AgentHeartbeat(
        report_id="r", agent="g1", sent_at=T0, gpus=(GpuStatus(index=0, utilization_pct=87.5, memory_used_mb=4000),)
    )
    attempt = ActiveAttempt(
        agent="g1", pipeline_id="p", stage="train", attempt="a", number=1, status="running", gpus=(0,)
    )
    out = agents_out(agents, {"g1": beat}, [attempt])
    assert [a.id for a in out] == ["g1", "g2"]
    assert out[0].gpus[0].utilization_pct == 87.5 and out[0].last_heartbeat_at == T0
    assert out[0].attempts[0].stage == "train" and out[1].attempts == []
    assert out[1].gpus[0].utilization_pct is None and out[1].last_heartbeat_at is None
    older = AgentHeartbeat(report_id="o", agent="g1", sent_at=T0 - timedelta(seconds=5))
    assert newer(None, beat) and not newer(beat, older)


@pytest.mark.parametrize("name", ["sales_sft", "a", "v1.2-final", "x" * 63])
def test_good_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "Sales", "-x", ".hidden", "a/b", "../etc", "a..b", "x" * 64, "a b", "é"])
def test_bad_names_are_422(name: str) -> None:
    with pytest.raises(InvalidName) as info:
        validate_name(name)
    assert info.value.status == 422


@given(st.text(max_size=80))
def test_a_valid_name_is_one_safe_path_component(name: str) -> None:
    try:
        validate_name(name)
    except InvalidName:
        return
    assert "/" not in name and "\\" not in name and name not in (".", "..") and ".." not in name and len(name) < 64


def test_names_from_filenames() -> None:
    assert name_from_filename("/tmp/Sales_SFT.jsonl") == "sales_sft"
    assert name_from_filename("C:\\data\\x.csv") == "x"
    assert choose_name(None, "train.parquet") == "train"
    assert choose_name("given", "ignored.jsonl") == "given"
    assert choose_name(None, "../../passwd") == "passwd"  # only the last component ever counts
    with pytest.raises(InvalidName):
        choose_name(None, "..")
    with pytest.raises(InvalidName):
        choose_name(None, None)
    assert filename_of('attachment; filename="data.jsonl"') == "data.jsonl"
    assert filename_of(None) is None


def test_format_detection() -> None:
    assert detect_format("x.jsonl", b"") == "jsonl"
    assert detect_format("x.TSV", b"") == "tsv"
    assert detect_format("blob", b"PAR1\x00\x00") == "parquet"
    assert detect_format("blob", b'  [{"a": 1}]') == "json"
    assert detect_format("blob", b'{"a": 1}\n{"a": 2}\n') == "jsonl"
    assert detect_format("blob", b"a,b\n1,2\n") == "csv"
    assert detect_format("blob", b"a\tb\n1\t2\n") == "tsv"
    assert detect_format("blob", b"just text") == "unknown"


def test_previews() -> None:
    jsonl = b"".join(json.dumps({"i": i}).encode() + b"\n" for i in range(100))
    shown = preview("jsonl", jsonl[:200], whole=False, rows=3)
    assert shown.rows == [{"i": 0}, {"i": 1}, {"i": 2}]
    cut_head = preview("jsonl", b'{"i": 0}\n{"i": 1', whole=False)
    assert cut_head.rows == [{"i": 0}] and cut_head.note == ""
    broken = preview("jsonl", b'{"i": 0}\nnot json\n', whole=True)
    assert broken.rows == [{"i": 0}] and "line 2" in broken.note
    array = preview("json", b'[{"q": "a"}, {"q": "b"}, {"q": "c", "x": [1, 2', whole=False, rows=5)
    assert array.rows == [{"q": "a"}, {"q": "b"}]
    csv = preview("csv", b"prompt,answer\nhi,there\n2+2,4\n5,", whole=False, rows=5)
    assert csv.columns == ["prompt", "answer"] and csv.rows == [
        {"prompt": "hi", "answer": "there"},
        {"prompt": "2+2", "answer": "4"},
    ]
    assert preview("tsv", b"a\tb\n1\t2\n", whole=True).rows == [{"a": "1", "b": "2"}]
    assert preview("parquet", b"PAR1", whole=False).rows == [] and "pyarrow" in preview("parquet", b"", whole=True).note
    assert len(preview("jsonl", json.dumps({"t": "x" * 10_000}).encode(), whole=True).rows[0]["t"]) < 2100


def test_dataset_fold_find_and_upload_decision() -> None:
    log = envelopes(
        [
            (
                "dataset-1",
                DatasetUploaded(dataset_id="1", name="sft", sha256="a" * 64, size_bytes=10, filename="s.jsonl"),
            ),
            ("dataset-2", DatasetUploaded(dataset_id="2", name="sft", sha256="b" * 64, size_bytes=12)),
            ("agent-g", registered("g")),
        ]
    )
    records = fold_datasets(log)
    assert [r.id for r in records] == ["1", "2"]
    assert find(records, "sft").id == "2" and find(records, "1").sha256 == "a" * 64
    with pytest.raises(NotFound):
        find(records, "nope")
    same = decide_upload(records[1], dataset_id="3", name="sft", sha256="b" * 64, size_bytes=12, filename="")
    assert same is None
    new = decide_upload(records[1], dataset_id="3", name="sft", sha256="c" * 64, size_bytes=1, filename="f")
    assert new is not None and new.dataset_id == "3"

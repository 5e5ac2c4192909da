"""Unit: the benchmark code's own arithmetic and data (percentiles, checks, the R1 recorded log copies,
the result diff, the lean HTTP client's reading of answers), so a published figure is not wrong because
the harness is."""

from __future__ import annotations

import asyncio
import math

import pytest

from bench.compare import compare
from bench.h1 import parse_wrk
from bench.harness import Result, percentile, summary
from bench.http import HttpError, Response, _Connection  # pyright: ignore[reportPrivateUsage]
from bench.r1 import recorded_events
from verlyard_scheduler.world import World


def test_percentiles_interpolate_between_ranks_and_summaries_report_them() -> None:
    values = [10.0, 20.0, 30.0, 40.0, 50.0]
    assert percentile(values, 50) == 30.0 and percentile(values, 0) == 10.0 and percentile(values, 100) == 50.0
    assert percentile(values, 95) == 48.0 and percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    s = summary(list(reversed(values)))
    assert (s["n"], s["p50"], s["min"], s["max"]) == (5, 30.0, 10.0, 50.0)


def test_a_check_passes_only_when_the_target_holds_and_reported_figures_have_none() -> None:
    r = Result("X", "t", {})
    r.check("latency", "<= 5 ms", 5.0, lambda v: v <= 5)
    r.check("latency", "<= 5 ms", 5.1, lambda v: v <= 5)
    r.check("ratio", "(reported)", 9.0, lambda v: False, unit="x")
    assert [c.passed for c in r.checks] == [True, False, None]
    assert r.checks[2].measured == "9.0 x"


def test_r1_copies_the_recorded_logs_under_fresh_ids_and_they_fold_to_their_ends() -> None:
    batches = list(recorded_events(300))
    envelopes = [e for b in batches for e in b]
    assert 300 <= len(envelopes) < 300 + 40
    assert len({e.event_id for e in envelopes}) == len(envelopes), "event ids are unique"
    assert [e.position for e in envelopes] == list(range(1, len(envelopes) + 1))
    assert len({b[0].stream_id for b in batches}) == len(batches), "each copy is its own pipeline"
    world = World()
    for e in envelopes:
        world.apply(e, index=False, advance=False)
    assert len(world.pipelines) == len(batches)
    assert all(state.terminal for state in world.pipelines.values()), "the recorded logs all end"


def test_compare_lists_the_figures_both_runs_have_with_their_change() -> None:
    old = {"summary": {"w": {"p50": 10.0, "gone": 1.0}, "flag": True}}
    new = {"summary": {"w": {"p50": 15.0, "new": 2.0}, "flag": False}}
    assert compare(old, new) == [("w.p50", 10.0, 15.0, 50.0)]


WRK_OUTPUT = """Running 8s test @ http://127.0.0.1:1/api/v1/pipelines/x
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    28.63ms   12.10ms 124.71ms   79.01%
  Latency Distribution
     50%   27.10ms
     75%  750.00us
     90%   41.02ms
     99%    1.20s
  4340 requests in 8.01s, 3.02MB read
  Socket errors: connect 0, read 1, write 0, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:    542.07
Transfer/sec:    385.62KB
"""


def test_wrk_reports_are_read_with_their_units_and_every_error_counted() -> None:
    got = parse_wrk(WRK_OUTPUT)
    assert got["req_per_s"] == 542.07 and got["requests"] == 4340
    assert (got["p50"], got["p75"], got["p90"], got["p99"]) == (27.1, 0.75, 41.02, 1200.0)
    assert got["errors"] == 7


class _Writer:
    def __init__(self) -> None:
        self.sent = b""

    def write(self, data: bytes) -> None:
        self.sent += data

    def close(self) -> None:
        pass


async def _answer(raw: bytes) -> tuple[Response, bool, bytes]:
    reader = asyncio.StreamReader()
    reader.feed_data(raw)
    reader.feed_eof()
    writer = _Writer()
    response, keep = await _Connection(reader, writer).request(b"GET / HTTP/1.1\r\n\r\n", b"")  # type: ignore[arg-type]
    return response, keep, writer.sent


async def test_the_lean_client_reads_sized_chunked_and_closing_answers() -> None:
    sized, keep, sent = await _answer(b'HTTP/1.1 201 Created\r\ncontent-length: 11\r\n\r\n{"id": "x"}')
    assert (sized.status, sized.json(), keep, sent) == (201, {"id": "x"}, True, b"GET / HTTP/1.1\r\n\r\n")
    chunked, keep, _ = await _answer(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n[1, \r\n2\r\n2]\r\n0\r\n\r\n"
    )
    assert (chunked.json(), keep) == ([1, 2], True)
    closing, keep, _ = await _answer(b"HTTP/1.1 404 Not Found\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
    assert (closing.status, keep) == (404, False)
    with pytest.raises(HttpError, match="404"):
        closing.raise_for_status()
    with pytest.raises(HttpError, match="closed the connection"):
        await _answer(b"")

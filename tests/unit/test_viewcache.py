"""Unit: the pipeline view cache keeps only what no change has overtaken (docs/adr/0018)."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest
from msgspec.structs import replace

from verlyard_api.viewcache import ViewCache
from verlyard_api.views import PipelineStatus, PipelineView
from verlyard_shared.spec import PipelineSpec

T0 = datetime(2026, 1, 1, tzinfo=UTC)


SPEC = msgspec.convert({"name": "p", "stages": {"a": {"kind": "noop"}}}, PipelineSpec)


def view(pid: str, status: PipelineStatus = "pending") -> PipelineView:
    return PipelineView(
        id=pid, name="p", spec=SPEC, status=status, submitted_by="u", correlation_id="c", created_at=T0,
        updated_at=T0, version=1, submitted_position=1, position=1, stages={},
    )  # fmt: skip


def test_a_read_is_kept_when_nothing_changed_since_its_stamp() -> None:
    cache = ViewCache()
    stamp = cache.stamp()
    assert cache.get("p1") is None
    assert cache.offer(view("p1"), stamp) is True
    assert cache.get("p1") == view("p1")
    assert (cache.hits, cache.misses) == (1, 1)


@pytest.mark.parametrize("change", ["put", "drop", "clear", "drop_other"])
def test_a_read_that_raced_any_change_is_refused(change: str) -> None:
    cache = ViewCache()
    stamp = cache.stamp()
    stale = view("p1", "pending")
    if change == "put":
        cache.put([view("p1", "running")])
    elif change == "drop":
        cache.drop(["p1"])
    elif change == "drop_other":
        cache.drop(["p2"])  # conservative: any change refuses the offer
    else:
        cache.clear()
    assert cache.offer(stale, stamp) is False
    got = cache.peek("p1")
    assert got is None or got.status == "running"


def test_put_replaces_and_drop_forgets() -> None:
    cache = ViewCache()
    cache.put([view("p1"), view("p2")])
    cache.put([replace(view("p1"), status="running")])
    assert cache.peek("p1").status == "running"  # type: ignore[union-attr]
    cache.drop(["p1", "unknown"])
    assert cache.peek("p1") is None and cache.peek("p2") is not None
    cache.clear()
    assert len(cache) == 0


def test_least_recently_used_views_leave_first() -> None:
    cache = ViewCache(capacity=2)
    cache.put([view("p1"), view("p2")])
    assert cache.get("p1") is not None  # p1 is now the most recent
    cache.put([view("p3")])
    assert cache.peek("p2") is None and cache.peek("p1") is not None and cache.peek("p3") is not None


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        ViewCache(capacity=0)

"""Unit: the journal publisher sends what one burst of work appended together (a quick stage's
accepted, started and finished leave in one write, so the scheduler commits them in one transaction),
and never holds an entry back waiting for time to pass."""

from __future__ import annotations

import asyncio
from pathlib import Path

from nats.js.api import PubAck

from verlyard_agent.journal import Journal
from verlyard_agent.publisher import JournalPublisher
from verlyard_shared.nats_pull import BURST_HEADER


class FakeJetStream:
    """Records each publish, as it is launched, with how many entries had been appended by then; acks at once."""

    def __init__(self) -> None:
        self.appended = 0
        self.sent: list[tuple[str, int]] = []
        self.burst_left: list[str] = []

    def publish(
        self, subject: str, payload: bytes, *, headers: dict[str, str], timeout: float
    ) -> asyncio.Future[PubAck]:
        self.sent.append((headers["Nats-Msg-Id"], self.appended))  # when it is launched, not when acked
        self.burst_left.append(headers[BURST_HEADER])
        acked: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        acked.set_result(PubAck(stream="REPORTS", seq=len(self.sent)))
        return acked


class FakeNats:
    is_connected = True


async def _running(
    tmp_path: Path,
) -> tuple[Journal, JournalPublisher, FakeJetStream, asyncio.Event, asyncio.Task[None]]:
    journal = Journal(tmp_path / "reports.jsonl", fsync=True)
    publisher = JournalPublisher(journal, name="reports")
    js = FakeJetStream()
    journal.on_append = lambda: (setattr(js, "appended", js.appended + 1), publisher.wake())
    publisher._nc = FakeNats()  # type: ignore[assignment]  # pyright: ignore[reportPrivateUsage]
    publisher._js = js  # type: ignore[assignment]  # pyright: ignore[reportPrivateUsage]
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    await asyncio.sleep(0.01)  # the publisher is waiting for an append
    return journal, publisher, js, stop, task


async def _until_published(publisher: JournalPublisher, count: int) -> None:
    async with asyncio.timeout(10):
        while publisher.published < count:
            await asyncio.sleep(0.001)


async def test_a_burst_appended_over_a_few_loop_turns_is_published_together(tmp_path: Path):
    journal, publisher, js, stop, task = await _running(tmp_path)
    loop = asyncio.get_running_loop()
    # As the agent runs a quick stage: accepted in the command handler, started in the attempt's task
    # (the next turn), finished after the stage kind's own task returned (a turn or two later).
    journal.append("vy.rpt.a.accepted", "accepted", b"{}", durable=False)
    loop.call_soon(lambda: journal.append("vy.rpt.a.started", "started", b"{}", durable=False))
    loop.call_soon(
        lambda: loop.call_soon(
            lambda: loop.call_soon(lambda: journal.append("vy.rpt.a.finished", "finished", b"{}", durable=True))
        )
    )
    await _until_published(publisher, 3)
    assert [msg_id for msg_id, _ in js.sent] == ["accepted", "started", "finished"]
    assert all(seen == 3 for _, seen in js.sent), f"published before the burst was whole: {js.sent}"
    assert js.burst_left == ["2", "1", "0"], "each message tells the scheduler how many follow it"
    stop.set()
    publisher.wake()
    await task
    journal.close()


async def test_an_entry_is_not_held_back_for_one_that_comes_later(tmp_path: Path):
    journal, publisher, js, stop, task = await _running(tmp_path)
    journal.append("vy.rpt.a.accepted", "accepted", b"{}", durable=False)
    await _until_published(publisher, 1)  # a long stage: its accepted goes without its finished
    journal.append("vy.rpt.a.finished", "finished", b"{}", durable=True)
    await _until_published(publisher, 2)
    assert [msg_id for msg_id, _ in js.sent] == ["accepted", "finished"]
    stop.set()
    publisher.wake()
    await task
    journal.close()

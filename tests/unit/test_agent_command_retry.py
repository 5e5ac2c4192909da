"""Unit: the agent's command consumer retries a failing handler while holding the message, and after
`max_deliver` tries in all (earlier deliveries counted) hands the command to `on_poison` and terminates it
(T15). No NATS: a stand-in message records what was done to it; the retry delays are zeroed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from verlyard_agent import consumer as consumer_module
from verlyard_agent.consumer import CommandConsumer
from verlyard_shared import codec
from verlyard_shared.commands import AnyCommand, CancelAttempt


@dataclass
class Meta:
    num_delivered: int


@dataclass
class FakeMsg:
    data: bytes
    metadata: Meta
    subject: str = "vy.cmd.a0.cancel"
    actions: list[str] = field(default_factory=list)

    async def ack(self) -> None:
        self.actions.append("ack")

    async def term(self) -> None:
        self.actions.append("term")

    async def nak(self, delay: float | None = None) -> None:
        self.actions.append("nak")

    async def in_progress(self) -> None:
        self.actions.append("in_progress")


def _command() -> CancelAttempt:
    return CancelAttempt(
        command_id="c1", agent="a0", issued_at=datetime.now(UTC), pipeline_id="p", stage="s", attempt="x"
    )


@pytest.fixture(autouse=True)
def no_delays(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer_module, "NAK_DELAYS_S", (0.0, 0.0, 0.0, 0.0))


async def _run(failures: int, delivered: int = 1) -> tuple[FakeMsg, list[Any], int]:
    calls = 0
    poisoned: list[Any] = []

    async def handler(command: AnyCommand) -> Any:
        nonlocal calls
        calls += 1
        if calls <= failures:
            raise OSError("disk full")
        return "ack"

    async def on_poison(command: AnyCommand, exc: BaseException, tries: int) -> None:
        poisoned.append((command.command_id, type(exc).__name__, tries))

    consumer = CommandConsumer(None, "a0", handler, on_poison=on_poison)  # type: ignore[arg-type]
    msg = FakeMsg(codec.encode(_command()), Meta(delivered))
    await consumer._handle(msg)  # type: ignore[arg-type]
    while consumer._retrying:
        await asyncio.gather(*consumer._retrying)
    return msg, poisoned, calls


async def test_a_transient_failure_is_retried_while_the_message_is_held() -> None:
    msg, poisoned, calls = await _run(failures=2)
    assert calls == 3 and poisoned == []
    assert msg.actions == ["in_progress", "in_progress", "ack"]


async def test_a_handler_that_always_fails_is_poison_after_max_deliver_tries() -> None:
    msg, poisoned, calls = await _run(failures=100)
    assert calls == 5  # agent_command_consumer's max_deliver
    assert poisoned == [("c1", "OSError", 5)]
    assert msg.actions[-1] == "term" and "nak" not in msg.actions


async def test_earlier_deliveries_count_towards_the_limit() -> None:
    """A redelivery after the agent died mid-retries goes on counting from `num_delivered`."""
    msg, poisoned, calls = await _run(failures=100, delivered=4)
    assert calls == 2 and poisoned == [("c1", "OSError", 5)]
    assert msg.actions == ["in_progress", "term"]


async def test_undecodable_bytes_are_terminated_at_once() -> None:
    consumer = CommandConsumer(None, "a0", lambda c: None)  # type: ignore[arg-type]
    msg = FakeMsg(b"{not a command", Meta(1))
    await consumer._handle(msg)  # type: ignore[arg-type]
    assert msg.actions == ["term"]

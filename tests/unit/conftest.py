"""Unit tier: no network. Any TCP/UDP connect or bind fails the test (AF_UNIX socketpairs, which
asyncio's event loop uses internally, stay allowed)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

_INET = (socket.AF_INET, socket.AF_INET6)


class NetworkInUnitTest(AssertionError):
    pass


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    real_connect, real_bind = socket.socket.connect, socket.socket.bind

    def guard(real: Any, name: str) -> Any:
        def method(self: socket.socket, address: Any) -> Any:
            if self.family in _INET:
                raise NetworkInUnitTest(f"unit tests may not {name} a network socket ({address!r})")
            return real(self, address)

        return method

    monkeypatch.setattr(socket.socket, "connect", guard(real_connect, "connect"))
    monkeypatch.setattr(socket.socket, "bind", guard(real_bind, "bind"))

"""Unit: the unit tier really has no network (the guard in tests/unit/conftest.py bites)."""

from __future__ import annotations

import socket

import pytest

from tests.unit.conftest import NetworkInUnitTest


def test_tcp_connect_is_refused_in_unit_tests() -> None:
    with pytest.raises(NetworkInUnitTest):
        socket.create_connection(("127.0.0.1", 9), timeout=0.1)


def test_unix_socketpairs_still_work() -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"x")
        assert right.recv(1) == b"x"

"""Adapter: one SSH host's connection as the runner holds it — connect on demand, reconnect with backoff,
and say how long the host has been unreachable (the lost-host rule reads that, not a single failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncssh
import structlog

from verlyard_shared.hosts import ssh
from verlyard_shared.hosts.vault import Credential

log = structlog.get_logger("verlyard.ssh.link")
T = TypeVar("T")

BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 4.0)
_DROPPED = (
    asyncssh.DisconnectError,
    asyncssh.ConnectionLost,
    asyncssh.ChannelOpenError,
    asyncssh.SFTPNoConnection,
    asyncssh.SFTPConnectionLost,
    BrokenPipeError,
    ConnectionError,
    OSError,
)
"""What a dropped connection raises mid-operation (SFTP reports it as its own errors)."""


class LinkDown(Exception):
    """The host did not answer this time (the caller retries; `HostLink.down_for()` says for how long)."""


class HostLink:
    """The runner's connection to one host. Operations either succeed or raise LinkDown; the next operation
    reconnects (waiting out a backoff after repeated failures). A changed host key or refused credentials
    also raise LinkDown, and are logged as errors: they never fix themselves, the lease will."""

    def __init__(self, target: ssh.Target, credential: Credential, *, connect_timeout_s: float = 10.0) -> None:
        self.target = target
        self._credential = credential
        self._timeout = connect_timeout_s
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._lock = asyncio.Lock()
        self._failures = 0
        self._next_try = 0.0
        self._down_since: float | None = None
        self.reconnects = 0
        self.last_ok: float | None = None
        """When an operation last succeeded (monotonic)."""
        self._log = log.bind(host=target.name)

    def down_for(self, now: float | None = None) -> float:
        """Seconds since the host last stopped answering (0 while it answers)."""
        if self._down_since is None:
            return 0.0
        return (now if now is not None else time.monotonic()) - self._down_since

    async def _session(self) -> tuple[asyncssh.SSHClientConnection, asyncssh.SFTPClient]:
        async with self._lock:
            if self._conn is not None and self._sftp is not None:
                return self._conn, self._sftp
            wait = self._next_try - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            try:
                conn = await ssh.connect(self.target, self._credential, timeout_s=self._timeout)
                try:
                    sftp = await asyncio.wait_for(conn.start_sftp_client(), timeout=self._timeout)
                except BaseException:
                    conn.close()
                    raise
            except ssh.SshError as exc:
                self._failed(exc.code, str(exc), fatal=not isinstance(exc, ssh.Unreachable))
                raise LinkDown(str(exc)) from None
            except (asyncssh.Error, OSError) as exc:
                self._failed(type(exc).__name__, "sftp could not start")
                raise LinkDown(f"host {self.target.name}: sftp could not start") from None
            if self._down_since is not None:
                self.reconnects += 1
                self._log.info("ssh_link_restored", down_s=round(self.down_for(), 1), reconnects=self.reconnects)
            self._conn, self._sftp = conn, sftp
            self._failures, self._down_since = 0, None
            return conn, sftp

    def _failed(self, code: str, detail: str, *, fatal: bool = False) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            (self._log.error if fatal else self._log.warning)("ssh_link_down", error=code, detail=detail)
        self._next_try = now + BACKOFF_S[min(self._failures, len(BACKOFF_S) - 1)]
        self._failures += 1

    def _drop(self, why: str) -> None:
        conn, self._conn, self._sftp = self._conn, None, None
        if conn is not None:
            conn.close()
        self._failed("connection_lost", why)

    async def call(
        self,
        op: Callable[[asyncssh.SSHClientConnection, asyncssh.SFTPClient], Awaitable[T]],
        *,
        timeout_s: float = 30.0,
    ) -> T:
        conn, sftp = await self._session()
        try:
            result = await asyncio.wait_for(op(conn, sftp), timeout=timeout_s)
            self.last_ok = time.monotonic()
            return result
        except TimeoutError:
            self._drop("timeout")
            raise LinkDown(f"host {self.target.name}: no answer within {timeout_s:g} s") from None
        except _DROPPED as exc:
            self._drop(type(exc).__name__)
            raise LinkDown(f"host {self.target.name}: the connection dropped ({type(exc).__name__})") from None

    async def run(self, command: str, *, timeout_s: float = 30.0) -> asyncssh.SSHCompletedProcess:
        """Run a command built by `verlyard_shared.hosts.remote`."""

        async def op(conn: asyncssh.SSHClientConnection, _: asyncssh.SFTPClient) -> asyncssh.SSHCompletedProcess:
            return await conn.run(command, check=False)

        return await self.call(op, timeout_s=timeout_s)

    async def close(self) -> None:
        conn, self._conn, self._sftp = self._conn, None, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), timeout=5.0)

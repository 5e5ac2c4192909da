"""Adapter: SSH connections to registered hosts (asyncssh) — host-key pinning, login with a sealed
credential, running built commands, the probe.

Connections never read the control plane's own `~/.ssh` (no config file, no agent, no default keys,
no known_hosts file): a host is reached only with its stored credential and its pinned key. Errors
are typed and their messages name the host and the cause, never the credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Final

import asyncssh

from verlyard_shared.hosts.probe import ProbeResult, failed, parse_probe, probe_script
from verlyard_shared.hosts.vault import Credential

# asyncssh logs every connection step and every command at INFO: too chatty for services; our own
# structlog lines say what happened. (Neither ever carries a credential: tests/integration/test_hosts_api.py.)
logging.getLogger("asyncssh").setLevel(logging.WARNING)

CONNECT_TIMEOUT_S: Final = 15.0
COMMAND_TIMEOUT_S: Final = 120.0


class SshError(Exception):
    """A host could not be used; `code` is stable (for the API's error body), the message is for people."""

    code = "ssh_error"


class Unreachable(SshError):
    code = "host_unreachable"


class AuthFailed(SshError):
    code = "ssh_auth_failed"


class HostKeyChanged(SshError):
    code = "host_key_changed"


class BadCredential(SshError):
    code = "invalid_credential"


@dataclass(frozen=True, kw_only=True)
class Target:
    """Where and as whom to connect. `host_key`: the pinned public key (OpenSSH text); None only on add."""

    name: str
    address: str
    port: int
    user: str
    host_key: str | None

    def __repr__(self) -> str:
        return f"Target({self.name!r}, {self.user}@{self.address}:{self.port})"


@dataclass(frozen=True, kw_only=True)
class HostKey:
    openssh: str
    fingerprint: str
    """`SHA256:...`, as `ssh-keygen -lf` prints it."""


def _auth_options(credential: Credential) -> dict[str, Any]:
    if credential.password is not None:
        return {"password": credential.password, "client_keys": None, "preferred_auth": "password,keyboard-interactive"}
    assert credential.private_key is not None
    try:
        key = asyncssh.import_private_key(credential.private_key, credential.passphrase)
    except asyncssh.KeyImportError as exc:
        # asyncssh's messages describe the format problem ("Passphrase must be specified..."), not the key.
        raise BadCredential(f"the private key cannot be read: {exc}") from None
    return {"client_keys": [key], "password": None, "preferred_auth": "publickey"}


async def connect(
    target: Target, credential: Credential, *, timeout_s: float = CONNECT_TIMEOUT_S
) -> asyncssh.SSHClientConnection:
    """Log in, verifying the pinned host key (or accepting any key when `target.host_key` is None: the
    first contact, whose key the caller pins). Raises Unreachable, AuthFailed, HostKeyChanged, BadCredential."""
    where = f"{target.user}@{target.address}:{target.port}"
    if target.host_key is None:
        known_hosts: Any = None
    else:
        try:
            pinned = asyncssh.import_public_key(target.host_key)
        except (asyncssh.KeyImportError, ValueError):
            raise HostKeyChanged(
                f"host {target.name}: the pinned host key is unreadable; remove and add it again"
            ) from None
        known_hosts = ([pinned], [], [])
    try:
        return await asyncssh.connect(
            target.address,
            target.port,
            username=target.user,
            known_hosts=known_hosts,
            config=None,
            agent_path=None,
            agent_forwarding=False,
            ignore_encrypted=True,
            connect_timeout=timeout_s,
            login_timeout=timeout_s,
            keepalive_interval=10,
            keepalive_count_max=3,
            **_auth_options(credential),
        )
    except asyncssh.HostKeyNotVerifiable:
        raise HostKeyChanged(
            f"host {target.name} ({target.address}:{target.port}) presented a host key that differs from the "
            "one pinned when it was added: refusing to connect (if the host was reinstalled, remove it and add "
            "it again to pin the new key)"
        ) from None
    except asyncssh.PermissionDenied:
        raise AuthFailed(f"host {target.name}: {where} refused the credentials (wrong password or key)") from None
    except TimeoutError:
        raise Unreachable(
            f"host {target.name}: no SSH answer from {target.address}:{target.port} within {timeout_s:g} s"
        ) from None
    except asyncssh.DisconnectError as exc:
        raise Unreachable(f"host {target.name}: {where} closed the connection ({exc.reason})") from None
    except OSError as exc:
        raise Unreachable(
            f"host {target.name}: cannot reach {target.address}:{target.port} ({exc.strerror or exc})"
        ) from None


def host_key_of(conn: asyncssh.SSHClientConnection) -> HostKey:
    key = conn.get_server_host_key()
    if key is None:
        raise Unreachable("the server presented no host key")
    return HostKey(openssh=key.export_public_key("openssh").decode().strip(), fingerprint=key.get_fingerprint("sha256"))


def fingerprint_of(openssh: str) -> str:
    return asyncssh.import_public_key(openssh).get_fingerprint("sha256")


async def run(
    conn: asyncssh.SSHClientConnection, remote_command: str, *, timeout_s: float = COMMAND_TIMEOUT_S
) -> asyncssh.SSHCompletedProcess:
    """Run one command built by `verlyard_shared.hosts.remote` (never a string assembled elsewhere)."""
    try:
        return await asyncio.wait_for(conn.run(remote_command, check=False), timeout=timeout_s)
    except TimeoutError:
        raise Unreachable(f"a remote command did not finish within {timeout_s:g} s") from None
    except (asyncssh.Error, OSError) as exc:
        raise Unreachable(f"the SSH connection failed while running a command ({type(exc).__name__})") from None


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value or "")


async def probe(conn: asyncssh.SSHClientConnection, *, trainer_python: str) -> ProbeResult:
    """GPUs, driver/CUDA versions, disk space, verl in the trainer's Python; a failure is a result, not a raise."""
    try:
        done = await run(conn, probe_script(trainer_python))
    except SshError as exc:
        return failed(str(exc))
    return parse_probe(_text(done.stdout), trainer_python=trainer_python)


async def close(conn: asyncssh.SSHClientConnection) -> None:
    conn.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(conn.wait_closed(), timeout=5.0)


async def connect_and_probe(target: Target, credential: Credential, *, trainer_python: str) -> ProbeResult:
    conn = await connect(target, credential)
    try:
        return await probe(conn, trainer_python=trainer_python)
    finally:
        await close(conn)


async def first_contact(
    target: Target, credential: Credential, *, trainer_python: str, expect_fingerprint: str | None = None
) -> tuple[HostKey, ProbeResult]:
    """Add's connection: log in accepting any host key, return that key (to pin) and a first probe.
    Raises HostKeyChanged when `expect_fingerprint` is given and the host shows another key."""
    conn = await connect(target, credential)
    try:
        key = host_key_of(conn)
        if expect_fingerprint is not None and expect_fingerprint != key.fingerprint:
            raise HostKeyChanged(
                f"host {target.name} presented the host key {key.fingerprint}, not the expected "
                f"{expect_fingerprint}: not added"
            )
        return key, await probe(conn, trainer_python=trainer_python)
    finally:
        await close(conn)


class SshClient:
    """The port through which the API reaches hosts (add, probe); tests substitute a fake subclass."""

    async def first_contact(
        self, target: Target, credential: Credential, *, trainer_python: str, expect_fingerprint: str | None = None
    ) -> tuple[HostKey, ProbeResult]:
        return await first_contact(
            target, credential, trainer_python=trainer_python, expect_fingerprint=expect_fingerprint
        )

    async def probe(self, target: Target, credential: Credential, *, trainer_python: str) -> ProbeResult:
        return await connect_and_probe(target, credential, trainer_python=trainer_python)

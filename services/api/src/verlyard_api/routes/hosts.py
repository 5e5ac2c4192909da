"""Entrypoint: SSH hosts (docs/adr/0011-ssh-hosts.md). Admins add and remove them, members probe them,
viewers list them; rotating the credential key is an admin action. Credentials go in (add) and never
come out: no response, event, log line or error message carries them.

Add connects before anything is stored: the host key it presents is pinned (and shown), the
credential must log in, and a first probe runs; only then is the row written (credential sealed with
the current key of VERLYARD_SECRET_KEY) and `host.added` + `host.probed` appended.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Annotated, Any, Final

import msgspec
import structlog
from litestar import Request, Response, delete, get, post
from litestar.params import FromPath, JSONBody

from verlyard_api.adapters.pg import DB_TIMEOUT_S, guarded
from verlyard_api.context import ApiContext
from verlyard_api.errors import ApiError, Conflict, NotFound
from verlyard_api.http import Ctx, admin, current_request_id, member, principal_of, viewer
from verlyard_api.openapi import error_responses
from verlyard_api.services import Svc
from verlyard_shared.envelope import Metadata, NewEvent
from verlyard_shared.events import AnyEvent, HostAdded, HostProbed, HostRemoved
from verlyard_shared.hosts import pg as hosts_pg
from verlyard_shared.hosts import ssh
from verlyard_shared.hosts.probe import ProbeResult, to_json
from verlyard_shared.hosts.remote import (
    HOST_NAME,
    RemoteError,
    check_port,
    check_program,
    check_root,
    check_user,
    parse_address,
    root_for,
)
from verlyard_shared.hosts.vault import Credential, KeyRing, VaultError, aad_for
from verlyard_shared.store.port import ANY

log = structlog.get_logger("verlyard.api.hosts")

NAME_PATTERN: Final = HOST_NAME.pattern
MAX_SECRET_CHARS: Final = 64 * 1024


class HostCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(pattern=NAME_PATTERN)]
    address: Annotated[str, msgspec.Meta(min_length=1, max_length=300)]
    """HOST, HOST:PORT, [IPV6] or [IPV6]:PORT."""
    user: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] | None = None
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SECRET_CHARS)] | None = None
    private_key: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_SECRET_CHARS)] | None = None
    passphrase: Annotated[str, msgspec.Meta(max_length=MAX_SECRET_CHARS)] | None = None
    labels: dict[
        Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9._/-]{0,62}$")],
        Annotated[str, msgspec.Meta(max_length=63)],
    ] = {}
    trainer_python: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)] = "python3"
    """The Python on the host that has verl (the probe checks that it imports verl)."""
    root: Annotated[str, msgspec.Meta(min_length=2, max_length=1024)] | None = None
    """The host's verlyard folder (absolute; default `~/.verlyard`): every path verlyard uses lies below it."""
    host_key_fingerprint: Annotated[str, msgspec.Meta(pattern=r"^SHA256:[A-Za-z0-9+/=]{1,64}$")] | None = None
    """Optional: the fingerprint you expect (`ssh-keygen -lf`); the add is refused when the host shows another."""


class HostOut(msgspec.Struct, kw_only=True):
    name: str
    address: str
    port: int
    user: str
    auth: str
    """password | key (never the credential itself)"""
    host_key_fingerprint: str
    labels: dict[str, str]
    trainer_python: str
    root: str | None
    """The host's verlyard folder: every remote path verlyard uses lies below it."""
    agent: str
    """The agent id the SSH runner registers this host as."""
    state: str
    """ok | unreachable | never_probed (from the last probe)"""
    gpus: int
    probe: dict[str, Any] | None
    probed_at: datetime | None
    added_at: datetime
    added_by: str
    key_id: str
    """The id of the VERLYARD_SECRET_KEY key that seals the credential (not the key)."""


class HostPage(msgspec.Struct, kw_only=True):
    items: list[HostOut]
    next: None = None


class RotateOut(msgspec.Struct, kw_only=True):
    key_id: str
    resealed: int
    already_current: int


class InvalidHost(ApiError):
    status = 422
    code = "invalid_host"


class SshRefused(ApiError):
    """The host could not be used over SSH (its code says why: unreachable, auth, host key)."""

    status = 422
    code = "ssh_error"


def agent_id_for(name: str) -> str:
    return f"ssh-{name}"


def _out(row: hosts_pg.HostRow) -> HostOut:
    probe = row.last_probe
    state = "never_probed" if probe is None else ("ok" if probe.get("ok") else "unreachable")
    return HostOut(
        name=row.name,
        address=row.address,
        port=row.port,
        user=row.user,
        auth=row.auth_kind,
        host_key_fingerprint=row.host_key_fingerprint,
        labels=row.labels,
        trainer_python=row.trainer_python,
        root=row.root,
        agent=agent_id_for(row.name),
        state=state,
        gpus=len((probe or {}).get("gpus") or []),
        probe=probe,
        probed_at=row.probed_at,
        added_at=row.added_at,
        added_by=row.added_by,
        key_id=row.sealed.key_id,
    )


def _ring(svc_ring: KeyRing | None) -> KeyRing:
    # 409, not 503: retrying does not help; the server's configuration must change (and T10 counts 5xx).
    if svc_ring is None:
        raise Conflict(
            "SSH hosts need VERLYARD_SECRET_KEY (a key ring `id:base64-32-bytes,...`) on the API: not configured",
            code="secret_key_missing",
        )
    return svc_ring


def _refused(exc: ssh.SshError, *, status: int = 422) -> ApiError:
    error = SshRefused(str(exc), code=exc.code)
    error.status = 409 if isinstance(exc, ssh.HostKeyChanged) else status
    return error


async def _append(ctx: ApiContext, request: Request[Any, Any, Any], name: str, *events: AnyEvent) -> None:
    principal = principal_of(request)
    async with guarded(DB_TIMEOUT_S):
        await ctx.store.append(
            f"host-{name}",
            ANY,
            [NewEvent(event_id=ctx.new_id(), event=e) for e in events],
            Metadata(actor=principal.actor, correlation_id=current_request_id()),
        )


def _probed_event(name: str, result: ProbeResult) -> HostProbed:
    return HostProbed(name=name, ok=result.ok, result=to_json(result))


@post(
    "/api/v1/hosts",
    guards=[admin],
    status_code=201,
    summary="Add an SSH host: pin its host key, check the credential, probe it (the credential is never shown)",
    responses=error_responses(400, 403, 409, 413, 422),
)
async def add_host(
    request: Request[Any, Any, Any], ctx: Ctx, svc: Svc, data: JSONBody[HostCreate]
) -> Response[HostOut]:
    ring = _ring(svc.key_ring)
    try:
        host, port = parse_address(data.address)
        if data.port is not None:
            if ":" in data.address and not data.address.startswith("[") and data.address.count(":") == 1:
                raise RemoteError("give the port once: in the address or as `port`")
            port = check_port(data.port)
        user = check_user(data.user)
        trainer_python = check_program(data.trainer_python)
        given_root = check_root(data.root) if data.root is not None else None
        credential = Credential(password=data.password, private_key=data.private_key, passphrase=data.passphrase)
    except (RemoteError, VaultError) as exc:
        raise InvalidHost(str(exc)) from None
    async with guarded():
        if await hosts_pg.get_host(ctx.pool, data.name) is not None:
            raise Conflict(f"host {data.name} exists; remove it first to change it", code="host_exists")
    target = ssh.Target(name=data.name, address=host, port=port, user=user, host_key=None)
    try:
        key, result = await svc.ssh.first_contact(
            target, credential, trainer_python=trainer_python, expect_fingerprint=data.host_key_fingerprint
        )
    except ssh.SshError as exc:
        log.info("host_add_refused", host=data.name, error=exc.code)
        raise _refused(exc) from None
    now = ctx.clock()
    root = given_root or (root_for(result.home) if result.home else None)
    row = hosts_pg.HostRow(
        name=data.name,
        address=host,
        port=port,
        user=user,
        auth_kind=credential.kind,
        host_key=key.openssh,
        host_key_fingerprint=key.fingerprint,
        root=root,
        trainer_python=trainer_python,
        labels=dict(data.labels),
        last_probe=to_json(result),
        probed_at=now,
        added_at=now,
        added_by=principal_of(request).actor,
        sealed=ring.seal(credential, aad=aad_for(data.name), nonce=os.urandom(12)),
    )
    try:
        async with guarded(DB_TIMEOUT_S):
            await hosts_pg.insert_host(ctx.pool, row)
    except hosts_pg.HostExists:
        raise Conflict(f"host {data.name} exists; remove it first to change it", code="host_exists") from None
    await _append(
        ctx,
        request,
        data.name,
        HostAdded(
            name=data.name,
            address=host,
            port=port,
            user=user,
            host_key_fingerprint=key.fingerprint,
            labels=dict(data.labels),
        ),
        _probed_event(data.name, result),
    )
    log.info("host_added", host=data.name, fingerprint=key.fingerprint, gpus=len(result.gpus))
    return Response(_out(row), status_code=201, headers={"Location": f"/api/v1/hosts/{data.name}"})


@get("/api/v1/hosts", guards=[viewer], summary="SSH hosts (never their credentials)", responses=error_responses(400))
async def list_hosts(ctx: Ctx) -> HostPage:
    async with guarded():
        rows = await hosts_pg.list_hosts(ctx.pool)
    return HostPage(items=[_out(r) for r in rows])


async def _host(ctx: ApiContext, name: str) -> hosts_pg.HostRow:
    if not HOST_NAME.match(name):
        raise NotFound(f"no host {name!r}")
    async with guarded():
        row = await hosts_pg.get_host(ctx.pool, name)
    if row is None:
        raise NotFound(f"no host {name!r}")
    return row


@get("/api/v1/hosts/{name:str}", guards=[viewer], summary="One SSH host", responses=error_responses(400, 404))
async def get_host(ctx: Ctx, name: FromPath[str]) -> HostOut:
    return _out(await _host(ctx, name))


@delete(
    "/api/v1/hosts/{name:str}",
    guards=[admin],
    status_code=200,
    summary="Remove an SSH host (its sealed credential is deleted)",
    responses=error_responses(400, 403, 404),
)
async def remove_host(request: Request[Any, Any, Any], ctx: Ctx, name: FromPath[str]) -> dict[str, str]:
    await _host(ctx, name)
    async with guarded():
        removed = await hosts_pg.delete_host(ctx.pool, name)
    if not removed:
        raise NotFound(f"no host {name!r}")
    await _append(ctx, request, name, HostRemoved(name=name))
    log.info("host_removed", host=name)
    return {"name": name, "status": "removed"}


@post(
    "/api/v1/hosts/{name:str}/probe",
    guards=[member],
    status_code=200,
    summary="Connect with the pinned key and stored credential; GPUs, driver/CUDA, disk, verl (recorded)",
    responses=error_responses(400, 403, 404, 409, 422),
)
async def probe_host(request: Request[Any, Any, Any], ctx: Ctx, svc: Svc, name: FromPath[str]) -> HostOut:
    row = await _host(ctx, name)
    ring = _ring(svc.key_ring)
    try:
        credential = ring.open(row.sealed, aad=aad_for(row.name))
    except VaultError as exc:
        raise Conflict(f"host {name}: {exc}", code="secret_key_mismatch") from None
    target = ssh.Target(name=row.name, address=row.address, port=row.port, user=row.user, host_key=row.host_key)
    failure: ssh.SshError | None = None
    try:
        result = await svc.ssh.probe(target, credential, trainer_python=row.trainer_python)
    except ssh.SshError as exc:
        failure = exc
        result = ProbeResult(ok=False, error=str(exc))
    now = ctx.clock()
    root = root_for(result.home) if result.home else None
    async with guarded(DB_TIMEOUT_S):
        await hosts_pg.record_probe(ctx.pool, name, to_json(result), at=now, root=root)
    await _append(ctx, request, name, _probed_event(name, result))
    log.info("host_probed", host=name, ok=result.ok, gpus=len(result.gpus), error=failure.code if failure else None)
    if failure is not None:
        raise _refused(failure)
    async with guarded(DB_TIMEOUT_S):
        fresh = await hosts_pg.get_host(ctx.pool, name)
    return _out(fresh or row)


@post(
    "/api/v1/admin/hosts/rotate-key",
    guards=[admin],
    status_code=200,
    summary="Re-seal every host credential with the current (first) key of VERLYARD_SECRET_KEY",
    responses=error_responses(403, 409),
)
async def rotate_key(ctx: Ctx, svc: Svc) -> RotateOut:
    ring = _ring(svc.key_ring)
    try:
        async with guarded(30.0):
            counts = await hosts_pg.reseal_all(ctx.pool, ring, nonce=lambda: os.urandom(12))
    except VaultError as exc:
        raise Conflict(str(exc), code="secret_key_mismatch") from None
    log.info("host_credentials_resealed", key_id=ring.current, **counts)
    return RotateOut(key_id=ring.current, **counts)


HANDLERS = [add_host, list_hosts, get_host, remove_host, probe_host, rotate_key]

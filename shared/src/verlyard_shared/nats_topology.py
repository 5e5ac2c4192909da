"""Adapter: apply `verlyard_shared.topology` to JetStream (nats-py) and open NATS connections.

`ensure_topology` is idempotent and safe to run from every service at start-up, concurrently:
each stream and durable is created when missing, updated when its config differs, and left alone
when it matches. A change NATS cannot apply in place (retention, storage, deliver policy) raises
`TopologyError` instead of deleting anything: deleting a durable loses its position.

NATS facts this module relies on (nats-server 2.15.1; tests/integration/test_nats_topology.py checks them):
- With a `backoff`, NATS uses `backoff[0]` as the first ack deadline (the stored `ack_wait` reads
  back as `backoff[0]`), and it requires `max_deliver > len(backoff)`.
- A nak without a delay is redelivered at once; handlers pass the delay they want.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import nats.errors
import structlog
from nats.aio.client import Client as NATS
from nats.errors import NoServersError
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import APIError, BadRequestError, NotFoundError

from verlyard_shared.settings import Settings
from verlyard_shared.topology import CONSUMERS, STREAMS, ConsumerDef, StreamDef, agent_command_consumer

log = structlog.get_logger("verlyard.nats")

STREAM_NAME_IN_USE = 10058
"""JetStream error: a stream with this name exists with another config (a concurrent create)."""


class TopologyError(RuntimeError):
    """JetStream holds a stream or consumer whose config cannot be changed into the one declared."""


_RETENTION = {"limits": RetentionPolicy.LIMITS, "workqueue": RetentionPolicy.WORK_QUEUE}
_STORAGE = {"file": StorageType.FILE}
_DELIVER = {"all": DeliverPolicy.ALL, "new": DeliverPolicy.NEW}


def stream_config(definition: StreamDef, *, replicas: int | None = None) -> StreamConfig:
    """The nats-py StreamConfig of a StreamDef (`replicas` overrides the definition's, e.g. 3 on a cluster)."""
    return StreamConfig(
        name=definition.name,
        subjects=list(definition.subjects),
        retention=_RETENTION[definition.retention],
        storage=_STORAGE[definition.storage],
        duplicate_window=definition.duplicate_window_s,
        max_age=definition.max_age_s,
        max_bytes=definition.max_bytes,
        num_replicas=replicas if replicas is not None else definition.replicas,
        discard=DiscardPolicy.OLD,
    )


def consumer_config(definition: ConsumerDef) -> ConsumerConfig:
    """The nats-py ConsumerConfig of a ConsumerDef: a durable pull consumer with explicit acks."""
    if definition.max_deliver <= len(definition.backoff_s):
        raise ValueError(f"{definition.durable}: NATS requires max_deliver > len(backoff)")
    return ConsumerConfig(
        # `name` as well: nats-py then creates through the filtered subject
        # `$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`, the one an agent's permissions allow
        # (the server checks the filter in the body against the subject; docs/adr/0015).
        name=definition.durable,
        durable_name=definition.durable,
        filter_subject=definition.filter_subject,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=definition.ack_wait_s,
        max_deliver=definition.max_deliver,
        backoff=list(definition.backoff_s),
        max_ack_pending=definition.max_ack_pending,
        deliver_policy=_DELIVER[definition.deliver_policy],
    )


def _close(a: float | None, b: float | None) -> bool:
    return (a or 0.0) == (b or 0.0) or abs((a or 0.0) - (b or 0.0)) < 1e-6


def _stream_differs(want: StreamConfig, have: StreamConfig) -> list[str]:
    diffs: list[str] = []
    if sorted(want.subjects or []) != sorted(have.subjects or []):
        diffs.append("subjects")
    for field in ("retention", "storage", "max_bytes", "num_replicas", "discard"):
        if getattr(want, field) != getattr(have, field):
            diffs.append(field)
    for field in ("duplicate_window", "max_age"):
        if not _close(getattr(want, field), getattr(have, field)):
            diffs.append(field)
    return diffs


def _consumer_differs(want: ConsumerConfig, have: ConsumerConfig) -> list[str]:
    diffs: list[str] = []
    for field in ("filter_subject", "ack_policy", "max_deliver", "max_ack_pending", "deliver_policy"):
        if getattr(want, field) != getattr(have, field):
            diffs.append(field)
    # NATS stores backoff[0] as the ack wait when a backoff is set; compare what it keeps.
    effective_ack_wait = want.backoff[0] if want.backoff else want.ack_wait
    if not _close(effective_ack_wait, have.ack_wait):
        diffs.append("ack_wait")
    if len(want.backoff or []) != len(have.backoff or []) or not all(
        _close(a, b) for a, b in zip(want.backoff or [], have.backoff or [], strict=True)
    ):
        diffs.append("backoff")
    return diffs


async def _ensure_stream(js: JetStreamContext, want: StreamConfig) -> str:
    assert want.name is not None
    for _ in range(3):
        try:
            info = await js.stream_info(want.name)
        except NotFoundError:
            try:
                await js.add_stream(want)
                return "created"
            except BadRequestError as exc:
                if exc.err_code == STREAM_NAME_IN_USE:
                    continue  # another service created it between our lookup and our add: look again
                raise
        diffs = _stream_differs(want, info.config)
        if not diffs:
            return "unchanged"
        try:
            await js.update_stream(want)
        except APIError as exc:
            raise TopologyError(
                f"stream {want.name}: cannot change {', '.join(diffs)} in place ({exc.description}); "
                "migrate it by hand (the events stream can be rebuilt from Postgres)"
            ) from exc
        return "updated:" + ",".join(diffs)
    raise TopologyError(f"stream {want.name}: kept changing while being ensured")


async def _ensure_consumer(js: JetStreamContext, stream: str, want: ConsumerConfig) -> str:
    assert want.durable_name is not None
    try:
        info = await js.consumer_info(stream, want.durable_name)
    except NotFoundError:
        info = None
    if info is not None:
        diffs = _consumer_differs(want, info.config)
        if not diffs:
            return "unchanged"
    else:
        diffs = []
    # The durable-create API creates, or updates in place when the change is allowed; a racing
    # create of the same config is not an error.
    try:
        await js.add_consumer(stream, want)
    except APIError as exc:
        raise TopologyError(
            f"consumer {stream}/{want.durable_name}: cannot apply {', '.join(diffs) or 'its config'} "
            f"({exc.description}); delete the durable by hand if losing its position is acceptable"
        ) from exc
    return "updated:" + ",".join(diffs) if info is not None else "created"


def declared(agents: Iterable[str] = ()) -> tuple[tuple[StreamDef, ...], tuple[ConsumerDef, ...]]:
    """Every stream and consumer verlyard declares, with one command consumer per agent."""
    return STREAMS, (*CONSUMERS, *(agent_command_consumer(agent) for agent in agents))


async def ensure_topology(js: JetStreamContext, *, agents: Iterable[str] = (), replicas: int = 1) -> dict[str, str]:
    """Create or update every stream and durable consumer of `verlyard_shared.topology`.

    Returns what happened to each (`created`, `unchanged`, `updated:<fields>`), for logs and tests.
    """
    streams, consumers = declared(agents)
    outcome: dict[str, str] = {}
    for definition in streams:
        outcome[definition.name] = await _ensure_stream(js, stream_config(definition, replicas=replicas))
    for consumer in consumers:
        key = f"{consumer.stream}/{consumer.durable}"
        outcome[key] = await _ensure_consumer(js, consumer.stream, consumer_config(consumer))
    changed = {name: what for name, what in outcome.items() if what != "unchanged"}
    log.info("nats_topology_ensured", streams=len(streams), consumers=len(consumers), changed=changed)
    return outcome


# ---- connections ---------------------------------------------------------------------------------


def _server_of(nc: NATS) -> str:
    """host:port of the connected server, never the credentials a URL may carry."""
    uri = nc.connected_url
    return f"{uri.hostname}:{uri.port}" if uri is not None else "?"


@dataclass(frozen=True, kw_only=True)
class NatsTls:
    """TLS to NATS beyond the defaults: a private CA to trust instead of the system's, and a client
    certificate for a server that verifies clients (`verify: true`). Paths of PEM files."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None

    def context(self) -> ssl.SSLContext:
        """A client context that verifies the server's certificate and name (never turned off)."""
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.ca_file)
        if self.cert_file is not None:
            context.load_cert_chain(self.cert_file, self.key_file)
        return context


def nats_tls(settings: Settings) -> NatsTls | None:
    """The TLS files VERLYARD_NATS_CA_FILE / _CERT_FILE / _KEY_FILE name; None when none is set.

    None does not mean plain text: a server that requires TLS (or a `tls://` URL) still gets TLS,
    verified against the system's CAs.
    """
    if settings.nats_ca_file is None and settings.nats_cert_file is None:
        return None
    return NatsTls(ca_file=settings.nats_ca_file, cert_file=settings.nats_cert_file, key_file=settings.nats_key_file)


async def connect_nats(
    url: str | Sequence[str],
    *,
    name: str,
    user: str | None = None,
    password: str | None = None,
    creds: str | None = None,
    connect_timeout: float = 5.0,
    inbox_prefix: str | None = None,
    tls: NatsTls | None = None,
) -> NATS:
    """A nats-py client that reconnects forever once connected; the first connect fails fast.

    `url` may be one URL, a comma-separated list or a sequence (a cluster). `creds` is the path of a
    `.creds` file (JWT + nkey). `inbox_prefix` replaces `_INBOX` for replies (an agent's user may
    subscribe only below its own: `nats_auth.agent_inbox_prefix`). `tls`: the CA to trust (and a
    client certificate) when the server requires TLS; without it nats-py still upgrades to TLS when the
    server asks, trusting the system's CAs. Disconnects, reconnects and async errors are logged with structlog.
    """
    servers = [u.strip() for u in url.split(",")] if isinstance(url, str) else list(url)
    nc = NATS()
    clog = log.bind(client=name)

    seen: collections.deque[Exception] = collections.deque(maxlen=8)  # the latest, for a failed first connect
    tls_failures: list[ssl.SSLError] = []
    connecting: asyncio.Future[None] | None = None

    async def on_error(exc: Exception) -> None:
        seen.append(exc)
        clog.warning("nats_error", error=type(exc).__name__, detail=str(exc))
        # A certificate that does not verify will not verify on the next try either, and nats-py's first
        # connect stalls after a failed handshake (until our timeout): give up at once and say why.
        if isinstance(exc, ssl.SSLError) and connecting is not None and not connecting.done():
            tls_failures.append(exc)
            connecting.cancel()

    async def on_disconnected() -> None:
        clog.warning("nats_disconnected")

    async def on_reconnected() -> None:
        clog.info("nats_reconnected", server=_server_of(nc))

    async def on_closed() -> None:
        clog.info("nats_closed")

    options: dict[str, Any] = {}
    if user is not None:
        options["user"] = user
    if password is not None:
        options["password"] = password
    if creds is not None:
        options["user_credentials"] = creds
    if inbox_prefix is not None:
        options["inbox_prefix"] = inbox_prefix
    if tls is not None:
        options["tls"] = tls.context()
    try:
        connecting = asyncio.ensure_future(
            nc.connect(
                servers=servers,
                name=name,
                connect_timeout=int(max(1, round(connect_timeout))),
                allow_reconnect=True,
                # One try per server for the first connect (the caller decides how to retry), then forever.
                max_reconnect_attempts=1,
                reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py annotates int, uses seconds
                ping_interval=10,
                max_outstanding_pings=3,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                closed_cb=on_closed,
                **options,
            )
        )
        async with asyncio.timeout(connect_timeout * (len(servers) + 1) + 5):
            try:
                await connecting
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if tls_failures and (task is None or not task.cancelling()):
                    raise tls_failures[-1] from None
                raise
    except BaseException as exc:
        if connecting is not None and not connecting.done():
            connecting.cancel()
        # Prefer what the server said (an auth violation) over the socket errors that followed it.
        spoken = [e for e in seen if isinstance(e, nats.errors.Error) and not isinstance(e, NoServersError)]
        cause = spoken[-1] if spoken else (seen[-1] if seen else None)
        if not nc.is_closed:
            await nc.close()
        # "no servers available" hides why: an auth violation or a refused connection says more.
        if isinstance(exc, NoServersError) and cause is not None and cause is not exc:
            raise cause from exc
        raise
    nc.options["max_reconnect_attempts"] = -1
    clog.info("nats_connected", server=_server_of(nc))
    return nc

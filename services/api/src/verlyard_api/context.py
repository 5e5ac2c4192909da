"""Adapter: what the HTTP handlers share once Postgres is connected (built by the composition root)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg

from verlyard_api.adapters.pg_listen import EventListener, Wakeup
from verlyard_api.adapters.pg_projector import PgProjector
from verlyard_api.adapters.pg_tokens import TokenStore
from verlyard_shared.ids import new_id
from verlyard_shared.store.grouped import GroupCommitStore
from verlyard_shared.store.port import EventStore
from verlyard_shared.store.postgres import PostgresEventStore


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class ApiContext:
    pool: asyncpg.Pool
    store: EventStore
    """Postgres behind a group commit: concurrent requests' appends share one transaction."""
    projector: PgProjector
    tokens: TokenStore
    listener: EventListener
    new_id: Callable[[], str] = field(default=new_id)
    clock: Callable[[], datetime] = field(default=_now)

    @classmethod
    def create(cls, pool: asyncpg.Pool) -> ApiContext:
        wakeup = Wakeup()
        store = GroupCommitStore(PostgresEventStore(pool))
        projector = PgProjector(pool, wakeup=wakeup)
        return cls(
            pool=pool,
            store=store,
            projector=projector,
            tokens=TokenStore(pool, store, projector),
            listener=EventListener(pool, wakeup),
        )

    @property
    def wakeup(self) -> Wakeup:
        """Notified when appends commit (while the listener task runs); readers also poll."""
        return self.listener.wakeup

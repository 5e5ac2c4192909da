"""Adapter: API tokens. Secrets' hashes live in `token_secrets`; the log records `token.created`
(id, name, role only); the projected `tokens` table says which tokens exist. A token authenticates
only when both are there."""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Final

import asyncpg
import structlog

from verlyard_api.adapters.pg import guarded
from verlyard_api.adapters.pg_projector import PgProjector
from verlyard_api.adapters.pg_rows import token_from_row
from verlyard_api.auth import SECRET_BYTES, Principal, Role, hash_token, mint_token, same_hash
from verlyard_api.views import TOKEN_PREFIX, TokenView
from verlyard_shared.envelope import Metadata, NewEvent
from verlyard_shared.events import TokenCreated
from verlyard_shared.ids import new_id
from verlyard_shared.store.port import NO_STREAM, EventStore
from verlyard_shared.store.postgres import PostgresEventStore

log = structlog.get_logger("verlyard.api.tokens")

CACHE_TTL_S: Final = 10.0
"""How long a verified token is trusted without asking Postgres again."""
CACHE_MAX: Final = 4096
BOOTSTRAP_LOCK_KEY: Final = 0x76795F61646D696E  # "vy_admin": serialises first-start bootstraps
BOOTSTRAP_ACTOR: Final = "system:bootstrap"

_LOOKUP = """
SELECT t.id, t.name, t.role, s.secret_sha256
FROM token_secrets s JOIN tokens t ON t.id = s.token_id
WHERE s.secret_sha256 = $1
"""


class TokenStore:
    def __init__(
        self,
        pool: asyncpg.Pool,
        store: EventStore,
        projector: PgProjector,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._store = store
        self._projector = projector
        self._monotonic = monotonic
        self._cache: dict[str, tuple[Principal, float]] = {}

    async def authenticate(self, token: str) -> Principal | None:
        """The token's principal, or None when no such token exists (StoreUnavailable when Postgres is down)."""
        digest = hash_token(token)
        now = self._monotonic()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        async with guarded():
            row = await self._pool.fetchrow(_LOOKUP, digest)
        if row is None or not same_hash(row["secret_sha256"], digest):
            return None
        principal = Principal(token_id=row["id"], name=row["name"], role=row["role"])
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[digest] = (principal, now + CACHE_TTL_S)
        return principal

    async def create(
        self, *, role: Role, name: str | None, metadata: Metadata, token_id: str | None = None
    ) -> tuple[TokenView, str]:
        """Issue a token: returns its record and the secret (shown once, never stored or logged)."""
        token_id = token_id or new_id()
        name = name or f"{role}-{token_id[-8:]}"
        token, digest = mint_token(secrets.token_bytes(SECRET_BYTES))
        # The hash goes first: a crash before the append leaves an unusable hash, never an unaudited token.
        async with guarded():
            await self._pool.execute(
                "INSERT INTO token_secrets (token_id, secret_sha256) VALUES ($1, $2)", token_id, digest
            )
        event = TokenCreated(token_id=token_id, name=name, role=role)
        async with guarded():
            result = await self._store.append(
                f"{TOKEN_PREFIX}{token_id}", NO_STREAM, [NewEvent(event_id=new_id(), event=event)], metadata
            )
        await self._projector.catch_up(result.last_position)
        async with guarded():
            row = await self._pool.fetchrow("SELECT * FROM tokens WHERE id = $1", token_id)
        assert row is not None, "the projector applied token.created"
        return token_from_row(row), token

    async def list(self, *, limit: int, after: int = 0) -> list[TokenView]:
        async with guarded():
            rows = await self._pool.fetch(
                "SELECT * FROM tokens WHERE position > $1 ORDER BY position LIMIT $2", after, limit
            )
        return [token_from_row(row) for row in rows]


async def bootstrap_admin_token(pool: asyncpg.Pool, path: Path, *, name: str = "admin") -> bool:
    """On first start, create an admin token and write it to `path` (mode 0600); False when any token exists.

    The file is written before the token is recorded: a crash in between leaves a stale file that the
    next start overwrites, never a token that nobody holds. The token itself is never logged.
    """
    async with guarded(60.0), pool.acquire() as lock_conn:
        await lock_conn.execute("SELECT pg_advisory_lock($1)", BOOTSTRAP_LOCK_KEY)
        try:
            exists = await lock_conn.fetchval("SELECT EXISTS (SELECT 1 FROM events WHERE type = 'token.created')")
            if exists:
                return False
            store = PostgresEventStore(pool)
            projector = PgProjector(pool)
            token_id = new_id()
            token, digest = mint_token(secrets.token_bytes(SECRET_BYTES))
            write_secret_file(path, token + "\n")
            await lock_conn.execute(
                "INSERT INTO token_secrets (token_id, secret_sha256) VALUES ($1, $2)", token_id, digest
            )
            await store.append(
                f"{TOKEN_PREFIX}{token_id}",
                NO_STREAM,
                [NewEvent(event_id=new_id(), event=TokenCreated(token_id=token_id, name=name, role="admin"))],
                Metadata(actor=BOOTSTRAP_ACTOR, correlation_id=new_id()),
            )
            await projector.catch_up()
        finally:
            await lock_conn.execute("SELECT pg_advisory_unlock($1)", BOOTSTRAP_LOCK_KEY)
    log.info("admin_token_created", token_id=token_id, path=str(path))
    return True


def write_secret_file(path: Path, content: str) -> None:
    """Write `content` to `path` atomically with mode 0600 (never readable by others, even briefly)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, content.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    os.chmod(path, 0o600)

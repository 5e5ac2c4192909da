"""Adapter: the `hosts` table (migration 0004) — the record of each SSH host and its sealed credential.

Read by the API (add, list, probe, remove, rotate) and by the SSH runner. Rows hold the credential
only as ciphertext; `HostRow` keeps it apart from everything else so that views built from a row
cannot carry it by accident.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from verlyard_shared.hosts.vault import KeyRing, Sealed, VaultError, aad_for


@dataclass(frozen=True, kw_only=True)
class HostRow:
    name: str
    address: str
    port: int
    user: str
    auth_kind: str
    host_key: str
    host_key_fingerprint: str
    root: str | None
    trainer_python: str
    labels: dict[str, str]
    last_probe: dict[str, Any] | None
    probed_at: datetime | None
    added_at: datetime
    added_by: str
    sealed: Sealed = field(repr=False)


_COLUMNS = (
    "name, address, port, ssh_user, auth_kind, secret_key_id, secret_ciphertext, host_key, host_key_fingerprint, "
    "root, trainer_python, labels, last_probe, probed_at, added_at, added_by"
)


def _row(record: asyncpg.Record) -> HostRow:
    return HostRow(
        name=record["name"],
        address=record["address"],
        port=record["port"],
        user=record["ssh_user"],
        auth_kind=record["auth_kind"],
        host_key=record["host_key"],
        host_key_fingerprint=record["host_key_fingerprint"],
        root=record["root"],
        trainer_python=record["trainer_python"],
        labels=json.loads(record["labels"]) if isinstance(record["labels"], str) else dict(record["labels"]),
        last_probe=json.loads(record["last_probe"]) if isinstance(record["last_probe"], str) else record["last_probe"],
        probed_at=record["probed_at"],
        added_at=record["added_at"],
        added_by=record["added_by"],
        sealed=Sealed(key_id=record["secret_key_id"], blob=bytes(record["secret_ciphertext"])),
    )


class HostExists(Exception):
    pass


async def insert_host(pool: asyncpg.Pool, row: HostRow) -> None:
    try:
        await pool.execute(
            f"INSERT INTO hosts ({_COLUMNS}) "
            "VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12::jsonb,$13::jsonb,$14,$15,$16)",
            row.name,
            row.address,
            row.port,
            row.user,
            row.auth_kind,
            row.sealed.key_id,
            row.sealed.blob,
            row.host_key,
            row.host_key_fingerprint,
            row.root,
            row.trainer_python,
            json.dumps(row.labels),
            json.dumps(row.last_probe) if row.last_probe is not None else None,
            row.probed_at,
            row.added_at,
            row.added_by,
        )
    except asyncpg.UniqueViolationError:
        raise HostExists(row.name) from None


async def get_host(pool: asyncpg.Pool, name: str) -> HostRow | None:
    record = await pool.fetchrow(f"SELECT {_COLUMNS} FROM hosts WHERE name = $1", name)
    return _row(record) if record is not None else None


async def list_hosts(pool: asyncpg.Pool) -> list[HostRow]:
    return [_row(r) for r in await pool.fetch(f"SELECT {_COLUMNS} FROM hosts ORDER BY name")]


async def delete_host(pool: asyncpg.Pool, name: str) -> bool:
    return (await pool.execute("DELETE FROM hosts WHERE name = $1", name)) == "DELETE 1"


async def record_probe(pool: asyncpg.Pool, name: str, probe: dict[str, Any], *, at: datetime, root: str | None) -> None:
    await pool.execute(
        "UPDATE hosts SET last_probe = $2::jsonb, probed_at = $3, root = COALESCE(root, $4) WHERE name = $1",
        name,
        json.dumps(probe),
        at,
        root,
    )


async def reseal_all(pool: asyncpg.Pool, ring: KeyRing, *, nonce: Callable[[], bytes]) -> dict[str, int]:
    """Re-encrypt every credential with the ring's current key, in one transaction (all or nothing).

    Returns {"resealed": n, "already_current": m}. Raises VaultError (naming the host) when one does not open.
    """
    resealed = current = 0
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch("SELECT name, secret_key_id, secret_ciphertext FROM hosts ORDER BY name FOR UPDATE")
        for r in rows:
            sealed = Sealed(key_id=r["secret_key_id"], blob=bytes(r["secret_ciphertext"]))
            if sealed.key_id == ring.current:
                current += 1
                ring.open(sealed, aad=aad_for(r["name"]))  # proves it opens; nothing to change
                continue
            try:
                fresh = ring.reseal(sealed, aad=aad_for(r["name"]), nonce=nonce())
            except VaultError as exc:
                raise VaultError(f"host {r['name']}: {exc}") from None
            await conn.execute(
                "UPDATE hosts SET secret_key_id = $2, secret_ciphertext = $3 WHERE name = $1",
                r["name"],
                fresh.key_id,
                fresh.blob,
            )
            resealed += 1
    return {"resealed": resealed, "already_current": current}


async def check_vault(pool: asyncpg.Pool, ring: KeyRing | None) -> int:
    """Fail closed at start-up: hosts exist but no key is configured, or a host's key id is missing from the
    ring. Returns the number of hosts. Raises VaultError."""
    rows = await pool.fetch("SELECT secret_key_id, count(*) AS n FROM hosts GROUP BY secret_key_id")
    total = sum(int(r["n"]) for r in rows)
    if total and ring is None:
        raise VaultError(
            f"{total} SSH host(s) are registered but VERLYARD_SECRET_KEY is not set: refusing to start "
            "(their credentials could not be opened)"
        )
    if ring is not None:
        missing = sorted({r["secret_key_id"] for r in rows} - set(ring.ids))
        if missing:
            raise VaultError(
                f"SSH host credentials are sealed with key(s) {', '.join(missing)} that VERLYARD_SECRET_KEY "
                "does not hold: refusing to start"
            )
    return total

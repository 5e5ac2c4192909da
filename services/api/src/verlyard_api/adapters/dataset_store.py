"""Adapter: dataset bytes. A streamed upload is written to a temporary file while its sha256 is computed,
then renamed to `<folder>/<sha256>` (content-addressed: the same bytes are stored once), published to
the JetStream object store bucket `vy-datasets` under the same sha256 (agents fetch it from there,
never from the database), and pointed at by `<folder>/<name>` (a relative symlink) so a local agent
sharing the folder resolves the name at once.

Nothing escapes the folder: names and digests are validated by the pure core before they reach a
path, and every path is checked to resolve inside the folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import structlog
from nats.js import JetStreamContext
from nats.js.api import ObjectMeta, ObjectStoreConfig, StorageType
from nats.js.errors import BucketNotFoundError, ObjectNotFoundError
from nats.js.object_store import ObjectStore

from verlyard_api.datasets import HEAD_BYTES, NAME_RE, SHA256_RE
from verlyard_api.errors import TooLarge, Unavailable
from verlyard_shared.subjects import DATASETS_BUCKET, dataset_name_object

log = structlog.get_logger("verlyard.api.datasets")

INCOMING: Final = ".incoming"
OBJECT_TIMEOUT_S: Final = 3600.0
"""A 2 GiB object is ~16k chunk publishes: minutes on a slow disk, never forever."""


@dataclass(frozen=True)
class Received:
    sha256: str
    size_bytes: int
    path: Path
    """The temporary file (inside the folder), until `commit` moves it."""


def _inside(folder: Path, path: Path) -> Path:
    resolved = path.resolve()
    if not resolved.is_relative_to(folder.resolve()):
        raise ValueError(f"{path} is outside {folder}")
    return path


class DatasetStore:
    def __init__(self, folder: Path, *, js: JetStreamContext | None = None) -> None:
        self.folder = folder
        self._js = js
        self._bucket: ObjectStore | None = None

    def blob(self, sha256: str) -> Path:
        if not SHA256_RE.fullmatch(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return _inside(self.folder, self.folder / sha256)

    # ---- receiving ----------------------------------------------------------------------------------

    async def receive(self, chunks: AsyncIterator[bytes], *, limit: int) -> Received:
        """Stream `chunks` to a temporary file, hashing as they come; TooLarge (413) past `limit` bytes."""
        incoming = self.folder / INCOMING
        await asyncio.to_thread(incoming.mkdir, parents=True, exist_ok=True)
        path = incoming / f"{secrets.token_hex(16)}.part"
        digest = hashlib.sha256()
        size = 0
        f: IO[bytes] = await asyncio.to_thread(path.open, "wb")
        try:
            async for chunk in chunks:
                if not chunk:
                    continue
                size += len(chunk)
                if size > limit:
                    raise TooLarge(f"the dataset is larger than the limit of {limit} bytes", limit_bytes=limit)
                digest.update(chunk)
                await asyncio.to_thread(f.write, chunk)
            await asyncio.to_thread(_flush, f)
        except BaseException:
            f.close()
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        f.close()
        return Received(sha256=digest.hexdigest(), size_bytes=size, path=path)

    async def commit(self, received: Received) -> Path:
        """Move the upload to `<folder>/<sha256>` (kept once: an identical blob makes the upload a no-op)."""
        target = self.blob(received.sha256)

        def move() -> None:
            if target.exists():
                received.path.unlink(missing_ok=True)
            else:
                os.replace(received.path, target)
                target.chmod(0o644)

        await asyncio.to_thread(move)
        return target

    async def discard(self, received: Received) -> None:
        await asyncio.to_thread(received.path.unlink, missing_ok=True)

    async def link_name(self, name: str, sha256: str) -> None:
        """Point `<folder>/<name>` at the blob (atomically replaced), for agents that share the folder."""
        if not NAME_RE.fullmatch(name) or ".." in name:
            raise ValueError(f"not a dataset name: {name!r}")
        link = _inside(self.folder, self.folder / name)
        self.blob(sha256)

        def swap() -> None:
            if link.exists() and not link.is_symlink():
                log.warning("dataset_name_link_skipped", name=name, reason="a regular file has that name")
                return
            tmp = self.folder / INCOMING / f"{secrets.token_hex(8)}.link"
            tmp.symlink_to(sha256)  # relative to the link's folder once moved there
            os.replace(tmp, link)

        await asyncio.to_thread(swap)

    async def head(self, sha256: str) -> tuple[bytes, bool] | None:
        """The first HEAD_BYTES of a blob and whether that is all of it; None when it is not on this host."""
        path = self.blob(sha256)

        def read() -> tuple[bytes, bool] | None:
            try:
                with path.open("rb") as f:
                    data = f.read(HEAD_BYTES + 1)
            except FileNotFoundError:
                return None
            return data[:HEAD_BYTES], len(data) <= HEAD_BYTES

        return await asyncio.to_thread(read)

    # ---- the object store ---------------------------------------------------------------------------

    @property
    def publishes(self) -> bool:
        return self._js is not None

    async def _objects(self) -> ObjectStore:
        assert self._js is not None
        if self._bucket is None:
            self._bucket = await ensure_bucket(self._js)
        return self._bucket

    async def publish(self, *, sha256: str, name: str, dataset_id: str, size_bytes: int) -> None:
        """Put the blob in `vy-datasets` (unless it is there already) and the name's pointer object."""
        if self._js is None:
            return
        try:
            async with asyncio.timeout(OBJECT_TIMEOUT_S):
                bucket = await self._objects()
                try:
                    info = await bucket.get_info(sha256)
                    present = info.size == size_bytes
                except ObjectNotFoundError:
                    present = False
                if not present:
                    with self.blob(sha256).open("rb") as f:
                        await bucket.put(sha256, f, meta=ObjectMeta(name=sha256, description=f"dataset {name}"))
                pointer = {"sha256": sha256, "size_bytes": size_bytes, "dataset_id": dataset_id, "name": name}
                await bucket.put(dataset_name_object(name), json.dumps(pointer).encode())
        except Exception as exc:
            self._bucket = None
            log.warning("dataset_publish_failed", sha256=sha256, error=type(exc).__name__, detail=str(exc))
            raise Unavailable("the object store (NATS) is unavailable; retry the upload shortly") from exc


def _flush(f: IO[bytes]) -> None:
    f.flush()
    os.fsync(f.fileno())


async def ensure_bucket(js: JetStreamContext) -> ObjectStore:
    """The `vy-datasets` object store, created (file storage) when missing."""
    try:
        return await js.object_store(DATASETS_BUCKET)
    except BucketNotFoundError:
        pass
    try:
        return await js.create_object_store(
            DATASETS_BUCKET,
            config=ObjectStoreConfig(description="verlyard datasets by sha256", storage=StorageType.FILE),
        )
    except Exception:
        # Another API process created it between our look and our create: use theirs.
        return await js.object_store(DATASETS_BUCKET)

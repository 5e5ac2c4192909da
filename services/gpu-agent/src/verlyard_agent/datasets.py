"""Adapter: bring a pushed dataset to this host from the JetStream object store `vy-datasets`.

The API stores each upload under its sha256 and a pointer object `name/<name>` -> {sha256, size}
(services/api adapters/dataset_store.py). A host that does not share the API's dataset folder (any
GPU host but the control plane's own) fetches the blob into its datasets folder as `<sha256>`,
verifies the digest, and points `<name>` at it with a relative symlink: the same layout the API
keeps, so `stages.preprocess.resolve_dataset` finds it the same way. A blob already here with the
right size is not fetched again; a torn download never takes the blob's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Final

import structlog
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, ObjectNotFoundError

from verlyard_shared.subjects import DATASETS_BUCKET, dataset_name_object

log = structlog.get_logger("verlyard.agent.datasets")

FETCH_TIMEOUT_S: Final = 600.0
_SHA256: Final = re.compile(r"[0-9a-f]{64}")
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class DatasetUnavailable(Exception):
    """The dataset cannot be fetched now (NATS away, a corrupt object); the message says which."""


class DatasetMissing(DatasetUnavailable):
    """No dataset of that name was ever pushed (the user's mistake, not the infrastructure's)."""


class DatasetFetcher:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._js: JetStreamContext | None = None
        self._lock = asyncio.Lock()

    def attach(self, js: JetStreamContext) -> None:
        self._js = js

    async def fetch(self, name: str) -> Path:
        """The local path of dataset `name`, fetched from the object store if it is not here yet."""
        if not _NAME.fullmatch(name) or ".." in name:
            raise DatasetMissing(f"{name!r} is not a dataset name")
        if self._js is None:
            raise DatasetUnavailable("not connected to NATS: the object store cannot be reached")
        async with self._lock:  # two stages asking for one dataset fetch it once
            try:
                async with asyncio.timeout(FETCH_TIMEOUT_S):
                    return await self._fetch(self._js, name)
            except DatasetUnavailable:
                raise
            except (BucketNotFoundError, ObjectNotFoundError):
                why = f"no dataset named {name!r} was pushed (nothing in the {DATASETS_BUCKET} object store)"
                raise DatasetMissing(why) from None
            except Exception as exc:  # NATS away, timed out
                raise DatasetUnavailable(f"the object store could not be read ({type(exc).__name__}: {exc})") from exc

    async def _fetch(self, js: JetStreamContext, name: str) -> Path:
        bucket = await js.object_store(DATASETS_BUCKET)
        pointer = json.loads((await bucket.get(dataset_name_object(name))).data or b"{}")
        sha256, size = str(pointer.get("sha256", "")), int(pointer.get("size_bytes", -1))
        if not _SHA256.fullmatch(sha256):
            raise DatasetUnavailable(f"dataset {name!r} has a malformed pointer in the object store")
        self.folder.mkdir(parents=True, exist_ok=True)
        blob = self.folder / sha256
        if not (blob.is_file() and blob.stat().st_size == size):
            tmp = self.folder / f".{sha256}.part"
            with tmp.open("wb") as f:
                await bucket.get(sha256, writeinto=f)  # pyright: ignore[reportArgumentType]
            digest = await asyncio.to_thread(_sha256_of, tmp)
            if digest != sha256:
                tmp.unlink(missing_ok=True)
                raise DatasetUnavailable(f"dataset {name!r} arrived corrupt (sha256 {digest}, expected {sha256})")
            tmp.replace(blob)
            log.info("dataset_fetched", name=name, sha256=sha256, size_bytes=size)
        link = self.folder / name
        if not (link.is_symlink() and os.readlink(link) == sha256):
            staged = self.folder / f".{name}.link"
            with contextlib.suppress(FileNotFoundError):
                staged.unlink()
            staged.symlink_to(sha256)
            staged.replace(link)
        return blob


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()

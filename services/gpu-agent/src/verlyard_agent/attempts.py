"""Adapter: the local record of every attempt this agent accepted (one JSON file each, replaced
atomically), so a redelivered RunStage never starts a second process, even across agent restarts.

Durability is group-committed: `put` writes and renames at once (so a later `get`, and a restarted
agent after a process crash, see it), and `sync` fsyncs every record changed since the last sync, and
the folder, in a worker thread, so the event loop never blocks on the disk. The agent syncs before it
acks a RunStage, so an accepted attempt survives a power loss too; the later states (running,
finished) ride on the next sync, and losing one to a power loss only makes recovery report the
attempt as lost, which the scheduler already handles."""

from __future__ import annotations

import asyncio
import contextlib
import os
from datetime import datetime, timedelta
from pathlib import Path

import msgspec

from verlyard_agent.layout import record_file, records_dir
from verlyard_agent.lifecycle import AttemptRecord

_decoder = msgspec.json.Decoder(AttemptRecord)
_encoder = msgspec.json.Encoder()


class AttemptStore:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.dir = records_dir(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._dirty: set[Path] = set()

    def get(self, attempt: str) -> AttemptRecord | None:
        try:
            return _decoder.decode(record_file(self.data_dir, attempt).read_bytes())
        except FileNotFoundError:
            return None
        except (msgspec.DecodeError, ValueError):
            # A torn record (it is written atomically, so only by hand): treat as unknown-but-seen.
            return None

    def put(self, record: AttemptRecord) -> None:
        path = record_file(self.data_dir, record.attempt)
        tmp = path.with_suffix(".json.tmp")
        with tmp.open("wb") as f:
            f.write(_encoder.encode(record))
        tmp.replace(path)
        self._dirty.add(path)

    @property
    def unsynced(self) -> int:
        """Records written since the last `sync` (not yet durable against a power loss)."""
        return len(self._dirty)

    async def sync(self) -> None:
        """Make every record written so far durable: one worker-thread call fsyncs them and the folder."""
        if not self._dirty:
            return
        paths, self._dirty = self._dirty, set()
        await asyncio.to_thread(_fsync_all, sorted(paths), self.dir)

    def all(self) -> list[AttemptRecord]:
        records: list[AttemptRecord] = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                records.append(_decoder.decode(path.read_bytes()))
            except (OSError, msgspec.DecodeError):
                continue
        return records

    def unfinished(self) -> list[AttemptRecord]:
        return [r for r in self.all() if r.state != "finished"]

    def prune(self, *, now: datetime, keep: timedelta) -> int:
        """Forget finished attempts older than `keep` (their work folders stay: logs, outputs)."""
        removed = 0
        for record in self.all():
            if record.state == "finished" and now - record.updated_at > keep:
                with contextlib.suppress(FileNotFoundError):
                    record_file(self.data_dir, record.attempt).unlink()
                    removed += 1
        return removed


def _fsync_all(paths: list[Path], folder: Path) -> None:
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # pruned meanwhile
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(folder, os.O_RDONLY)  # the renames themselves
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Adapter: the local record of every attempt this agent accepted, so a redelivered RunStage never
starts a second process, even across agent restarts.

The records live in one append-only file (`attempts/records.jsonl`, a JSON line per change; the
last line of an attempt wins) mirrored in memory. One file, not one per attempt: creating and
renaming a file per change costs metadata writes that stall the event loop under load, while an
append is one `write`. Durability is group-committed: `put` appends at once (a restarted agent, after
a process crash, sees it), and `sync` fsyncs everything appended so far with one fsync in a worker
thread, which the agent runs once a second, off the critical path. That is enough: the record
guards against a second process after an agent crash (the page cache survives that); a power loss
kills the attempt with the host, and a lost record then only makes a redelivered command run the
attempt again or recovery report it lost, both of which the scheduler already handles.

The file is rewritten with only the live records (atomically, fsynced) when it opens and when it has
grown well past them; records of finished attempts older than `keep` are pruned then. Per-attempt
`<attempt>.json` files of older agents are read once and folded in.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from datetime import datetime, timedelta
from pathlib import Path

import msgspec

from verlyard_agent.layout import records_dir
from verlyard_agent.lifecycle import AttemptRecord

_decoder = msgspec.json.Decoder(AttemptRecord)
_encoder = msgspec.json.Encoder()

COMPACT_MIN_LINES = 10_000
"""Rewrite the file when it holds this many lines more than there are live records (and twice as many)."""


class AttemptStore:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.dir = records_dir(data_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "records.jsonl"
        self._records: dict[str, AttemptRecord] = {}
        self._load()
        self._rewrite()
        self._file = self.path.open("ab", buffering=0)
        self._lines = len(self._records)
        self._appended = 0
        """Appends so far; those up to `_synced` are durable."""
        self._synced = 0
        self._sync_lock = asyncio.Lock()

    # -- start-up and compaction -------------------------------------------------------------------

    def _load(self) -> None:
        legacy = sorted(self.dir.glob("*.json"))
        for path in legacy:  # per-attempt files of agents before the single log
            with contextlib.suppress(OSError, msgspec.DecodeError, ValueError):
                record = _decoder.decode(path.read_bytes())
                self._records[record.attempt] = record
        if self.path.exists():
            with self.path.open("rb") as f:
                for raw in f:
                    if not raw.endswith(b"\n"):
                        break  # a line torn by a crash mid-append: it was never acknowledged to anyone
                    try:
                        record = _decoder.decode(raw)
                    except (msgspec.DecodeError, ValueError):
                        continue
                    self._records[record.attempt] = record
        self._legacy = legacy

    def _rewrite(self) -> None:
        """Replace the file with one line per live record, durably (tmp, fsync, rename, fsync folder)."""
        tmp = self.path.with_suffix(".jsonl.tmp")
        with tmp.open("wb") as f:
            f.write(b"".join(_encoder.encode(r) + b"\n" for r in self._records.values()))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)
        _fsync_dir(self.dir)
        for path in self._legacy:  # folded into the log, which is durable now
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        self._legacy = []

    def _compact(self) -> None:
        self._file.close()
        self._rewrite()
        self._file = self.path.open("ab", buffering=0)
        self._lines = len(self._records)
        self._synced = self._appended  # the rewrite was fsynced

    # -- reading and writing -----------------------------------------------------------------------

    def get(self, attempt: str) -> AttemptRecord | None:
        return self._records.get(attempt)

    def put(self, record: AttemptRecord) -> None:
        """Record a change now (visible at once, durable after the next `sync`)."""
        self._records[record.attempt] = record
        self._file.write(_encoder.encode(record) + b"\n")
        self._appended += 1
        self._lines += 1
        extra = self._lines - len(self._records)
        if extra >= COMPACT_MIN_LINES and extra >= len(self._records):
            self._compact()

    @property
    def unsynced(self) -> int:
        """Changes recorded since the last `sync` (not yet durable against a power loss)."""
        return self._appended - self._synced

    async def sync(self) -> None:
        """Make every change recorded so far durable with one fsync in a worker thread (group commit:
        callers arriving while one runs share the next)."""
        async with self._sync_lock:
            target = self._appended
            if target <= self._synced:
                return
            await asyncio.to_thread(os.fsync, self._file.fileno())
            self._synced = max(self._synced, target)

    def all(self) -> list[AttemptRecord]:
        return sorted(self._records.values(), key=lambda r: r.attempt)

    def unfinished(self) -> list[AttemptRecord]:
        return [r for r in self.all() if r.state != "finished"]

    def prune(self, *, now: datetime, keep: timedelta) -> int:
        """Forget finished attempts older than `keep` (their work folders stay: logs, outputs)."""
        old = [a for a, r in self._records.items() if r.state == "finished" and now - r.updated_at > keep]
        for attempt in old:
            del self._records[attempt]
        if old:
            self._compact()
        return len(old)

    def close(self) -> None:
        self._file.close()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

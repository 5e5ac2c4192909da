"""Adapter: the local record of every attempt this agent accepted (one JSON file each, written
atomically and fsynced), so a redelivered RunStage never starts a second process, even across
agent restarts."""

from __future__ import annotations

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
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

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

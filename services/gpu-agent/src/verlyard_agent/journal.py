"""Adapter: the agent's local outbox. Every report (and telemetry batch) is appended here first and
published from here, in order, so an agent cut off from NATS keeps working and replays on reconnect.

Files: `<name>.jsonl` (append-only; one msgspec JSON entry per line: seq, subject, Nats-Msg-Id,
payload) and `<name>.cursor` (the last published seq and the byte offset after it, replaced
atomically). Publishing again after a crash between publish and cursor write is harmless: the
Nats-Msg-Id dedupes it, and the scheduler ignores a report it already reflects. The file is
truncated once everything in it is published and it has grown past `compact_bytes`.

A durable journal is group-committed: `append` only writes (a process crash keeps what the kernel
has), and `sync` fsyncs everything appended so far, so many entries share one fsync. The fsync runs
on the event loop while this disk answers in well under a millisecond (the hop to a worker thread
and back cost ~1.5 ms of a W1 stage's latency here, the fsync 0.1 ms), and in a worker thread while
it does not, so a slow disk never blocks the loop for long (ADR 0014). Nothing is handed out for
publishing (`peek`) before the `sync` after it, so NATS never holds an entry a power loss could take
back. An entry appended with `durable=False` (a report a power loss may lose without harm: the attempt dies with
the host, and the restarted agent reports it lost) needs no fsync of its own: when nothing durable
is waiting, `sync` releases the entries without touching the disk.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path

import msgspec


class JournalEntry(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    subject: str
    msg_id: str
    data: msgspec.Raw


class _Cursor(msgspec.Struct, frozen=True, kw_only=True):
    seq: int = 0
    offset: int = 0


_CURSOR_WIDTH = 63
CURSOR_EVERY = 64
"""The cursor is written when the publisher has nothing left in hand, and at least every this many
entries under a steady stream (a restart re-publishes at most these; their Nats-Msg-Id dedupes them)."""
INLINE_FSYNC_S = 0.001
"""A journal fsyncs on the event loop while its fsyncs average less than this; slower, in a worker thread
(where each one still updates the average, so a disk that is fast again comes back to the loop)."""
_FSYNC_WEIGHT = 0.25
"""Weight of the newest fsync in the moving average (one slow fsync sends the next few to the thread)."""
_entry_decoder = msgspec.json.Decoder(JournalEntry)
_cursor_decoder = msgspec.json.Decoder(_Cursor)
_encoder = msgspec.json.Encoder()


def _timed_fsync(fd: int) -> float:
    began = time.perf_counter()
    os.fsync(fd)
    return time.perf_counter() - began


class Journal:
    """An append-only file of entries plus a published-up-to cursor. Not thread-safe: one event loop."""

    def __init__(
        self, path: Path, *, fsync: bool, compact_bytes: int = 8 * 1024 * 1024, memory_entries: int = 4096
    ) -> None:
        self.path = path
        self.memory_entries = memory_entries
        """Unpublished entries kept in memory as they are appended; past this many they are read back
        from the file when their turn comes (a long NATS outage never grows the agent's memory)."""
        self.cursor_path = path.with_suffix(".cursor")
        self.fsync = fsync
        self.compact_bytes = compact_bytes
        self.on_append: Callable[[], None] | None = None
        self._cursor_fd: int | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        cursor = self._load_cursor()
        self._published_seq = cursor.seq
        self._read_offset = cursor.offset
        self._repair_tail()
        size = path.stat().st_size
        if self._read_offset > size:  # the file was replaced or truncated under us: re-read it all
            self._read_offset = 0
        self._next_seq = max(self._published_seq, self._scan_last_seq()) + 1
        self._end = size
        """The file's length: where the next append lands."""
        self._file = path.open("ab", buffering=0)
        if fsync:  # what a crashed process left in the page cache becomes durable before it is published
            os.fsync(self._file.fileno())
        self._buffer: list[tuple[JournalEntry, int]] = []
        """Entries not yet published (kept on append, or read back from the file), with the offset
        after each."""
        self._scanned_to = self._read_offset
        self._synced_seq = self._next_seq - 1
        """Entries up to here may be published (durable, or appended with `durable=False`)."""
        self._durable_upto = 0
        """The last entry appended with `durable=True` (to a durable journal)."""
        self._sync_lock = asyncio.Lock()
        self.fsync_s = 0.0
        """Moving average of this journal's fsyncs (seconds): where the next one runs (INLINE_FSYNC_S)."""
        self._unsaved = 0
        """Entries published since the cursor was last written."""

    # -- start-up ----------------------------------------------------------------------------------

    def _load_cursor(self) -> _Cursor:
        try:
            return _cursor_decoder.decode(self.cursor_path.read_bytes())
        except (FileNotFoundError, msgspec.DecodeError):
            return _Cursor()

    def _repair_tail(self) -> None:
        """Cut a last line torn by a crash mid-append (it was never acknowledged to anyone)."""
        if not self.path.exists():
            self.path.touch()
            return
        size = self.path.stat().st_size
        if size == 0:
            return
        with self.path.open("rb+") as f:
            f.seek(max(0, size - 1))
            if f.read(1) == b"\n":
                return
            block = 64 * 1024
            end = size
            while end > 0:
                start = max(0, end - block)
                f.seek(start)
                chunk = f.read(end - start)
                nl = chunk.rfind(b"\n")
                if nl >= 0:
                    f.truncate(start + nl + 1)
                    return
                end = start
            f.truncate(0)

    def _scan_last_seq(self) -> int:
        last = 0
        with self.path.open("rb") as f:
            for raw in f:
                try:
                    last = max(last, _entry_decoder.decode(raw).seq)
                except msgspec.DecodeError:
                    continue
        return last

    # -- writing -----------------------------------------------------------------------------------

    def append(self, subject: str, msg_id: str, data: bytes, *, durable: bool = True) -> int:
        """Append one entry (written through to the kernel; publishable after the next `sync`, which
        fsyncs first if this or an earlier entry is `durable`), return its seq."""
        seq = self._next_seq
        self._next_seq += 1
        entry = JournalEntry(seq=seq, subject=subject, msg_id=msg_id, data=msgspec.Raw(data))
        line = _encoder.encode(entry) + b"\n"
        self._file.write(line)
        start, self._end = self._end, self._end + len(line)
        if self._scanned_to == start and len(self._buffer) < self.memory_entries:
            # Everything before it is in the buffer already: keep it there, no read back from the file.
            self._buffer.append((entry, self._end))
            self._scanned_to = self._end
        if not self.fsync:
            self._synced_seq = seq
        elif durable:
            self._durable_upto = seq
        if self.on_append is not None:
            self.on_append()
        return seq

    @property
    def synced_seq(self) -> int:
        """The last entry that may be published (durable, or not needing to be)."""
        return self._synced_seq

    async def sync(self) -> None:
        """Make everything appended so far durable with one fsync (group commit: callers arriving
        while one runs share the next). On the event loop while this disk's fsyncs are fast (the hop to
        a worker thread and back then costs more than the fsync), in a worker thread once they are not."""
        async with self._sync_lock:
            target = self._next_seq - 1
            if target <= self._synced_seq:
                return
            if self._durable_upto > self._synced_seq:
                fd = self._file.fileno()
                if self.fsync_s < INLINE_FSYNC_S:
                    took = _timed_fsync(fd)
                else:
                    took = await asyncio.to_thread(_timed_fsync, fd)
                self.fsync_s += (took - self.fsync_s) * _FSYNC_WEIGHT
            self._synced_seq = max(self._synced_seq, target)

    # -- publishing --------------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """Entries appended but not yet published."""
        return self._next_seq - 1 - self._published_seq

    def peek(self, limit: int = 64) -> list[JournalEntry]:
        """The next unpublished, durable entries, in order (at most `limit`)."""
        if len(self._buffer) < limit:
            self._read_more(limit - len(self._buffer))
        return [entry for entry, _ in self._buffer[:limit] if entry.seq <= self._synced_seq]

    def _read_more(self, wanted: int) -> None:
        with self.path.open("rb") as f:
            f.seek(self._scanned_to)
            while wanted > 0:
                raw = f.readline()
                if not raw.endswith(b"\n"):
                    break  # end of file (or a line being written right now)
                self._scanned_to += len(raw)
                try:
                    entry = _entry_decoder.decode(raw)
                except msgspec.DecodeError:
                    continue  # a corrupt line is skipped, never retried forever
                if entry.seq <= self._published_seq:
                    continue
                self._buffer.append((entry, self._scanned_to))
                wanted -= 1

    def mark_published(self, entry: JournalEntry) -> None:
        """`entry` (the first of `peek`) reached NATS: advance the cursor past it."""
        if not self._buffer or self._buffer[0][0].seq != entry.seq:
            raise ValueError(f"entry {entry.seq} is not the next unpublished entry")
        _, offset = self._buffer.pop(0)
        self._published_seq = entry.seq
        self._read_offset = offset
        self._unsaved += 1
        if not self._buffer:
            self.save_cursor()
            self._maybe_compact()
        elif self._unsaved >= CURSOR_EVERY:
            self.save_cursor()

    def skip(self, entry: JournalEntry) -> None:
        """Give up on `entry` (NATS refuses it for good, e.g. too large): same as published."""
        self.mark_published(entry)

    def save_cursor(self) -> None:
        """Overwrite the cursor in place: one small `pwrite`, padded to a fixed width so an older,
        longer value never leaves a tail. Not fsynced: a cursor behind the truth only re-publishes
        entries, which their Nats-Msg-Id dedupes."""
        self._unsaved = 0
        data = _encoder.encode(_Cursor(seq=self._published_seq, offset=self._read_offset))
        if self._cursor_fd is None:
            self._cursor_fd = os.open(self.cursor_path, os.O_WRONLY | os.O_CREAT, 0o644)
        os.pwrite(self._cursor_fd, data.ljust(_CURSOR_WIDTH) + b"\n", 0)

    def _maybe_compact(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        if self.backlog == 0 and size >= self.compact_bytes and self._read_offset >= size:
            self._file.truncate(0)
            self._read_offset = self._scanned_to = self._end = 0
            self.save_cursor()

    def close(self) -> None:
        self.save_cursor()
        if self._cursor_fd is not None:
            os.close(self._cursor_fd)
            self._cursor_fd = None
        self._file.close()

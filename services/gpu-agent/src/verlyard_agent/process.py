"""Adapter: a stage's child process in its own process group (session), its output as lines, and
stopping the WHOLE group: SIGTERM, a grace period, SIGKILL, then a check that nothing survived.

Users' pain 9: "cancel does not free the GPU" — torchrun workers, data-loader workers and a private
Ray all live in the child's group (or below it), so the agent signals the group and every
descendant it saw, not just the child. The child also gets SIGTERM if the agent dies
(PR_SET_PDEATHSIG), and carries `VERLYARD_ATTEMPT` in its environment so a restarted agent finds
what is left of it (`kill_leftovers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from verlyard_agent.childenv import CHILD_MARKER

LineSink = Callable[[str, str], None]
"""(stream, text) for each line a child prints: stream is "stdout" or "stderr"."""

MAX_LINE = 16 * 1024
_READ_CHUNK = 64 * 1024
_PR_SET_PDEATHSIG = 1


def _pdeathsig_setter() -> Callable[[], None] | None:
    """A preexec function that asks Linux to SIGTERM the child when the agent dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:  # runs in the child between fork and exec: keep it to one syscall
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return preexec


_PREEXEC = _pdeathsig_setter()


def exit_code_of(returncode: int) -> int:
    """Shell convention: a child killed by signal N exits 128+N (asyncio says -N)."""
    return 128 - returncode if returncode < 0 else returncode


class _LineSplitter:
    def __init__(self, stream: str, sink: LineSink) -> None:
        self.stream = stream
        self.sink = sink
        self._partial = bytearray()

    def feed(self, chunk: bytes) -> None:
        self._partial += chunk
        while True:
            nl = self._partial.find(b"\n")
            if nl < 0:
                break
            self._emit(bytes(self._partial[:nl]))
            del self._partial[: nl + 1]
        if len(self._partial) > MAX_LINE:  # a line without end (progress bars): cut it
            self._emit(bytes(self._partial))
            self._partial.clear()

    def close(self) -> None:
        if self._partial:
            self._emit(bytes(self._partial))
            self._partial.clear()

    def _emit(self, raw: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        if len(text) > MAX_LINE:
            text = text[:MAX_LINE] + f"…[{len(text) - MAX_LINE} characters cut]"
        self.sink(self.stream, text)


async def _pump(reader: asyncio.StreamReader, splitter: _LineSplitter) -> None:
    try:
        while chunk := await reader.read(_READ_CHUNK):
            splitter.feed(chunk)
    finally:
        splitter.close()


@dataclass(frozen=True, kw_only=True)
class StopResult:
    killed: bool
    """SIGKILL was needed (the group ignored SIGTERM for the whole grace period)."""
    survivors: tuple[int, ...]
    """Pids still alive after SIGKILL (should be empty; a D-state process can linger)."""
    elapsed_s: float


class Child:
    """A running child process and its process group."""

    def __init__(self, proc: asyncio.subprocess.Process, pumps: list[asyncio.Task[None]]) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session: the child leads its own session and group
        self._pumps = pumps
        self._seen: set[int] = set()

    async def wait(self) -> int:
        """The child's exit code (128+N when a signal killed it), once its output is drained."""
        code = await self.proc.wait()
        # A grandchild that inherited stdout can keep the pipe open after the child exits: wait a
        # little for the rest of the output, then stop reading.
        _, pending = await asyncio.wait(self._pumps, timeout=2.0)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return exit_code_of(code)

    def members(self) -> list[psutil.Process]:
        """Live processes of the group, plus every descendant of the child seen so far."""
        found = group_members(self.pgid)
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(self.pid).children(recursive=True):
                self._seen.add(p.pid)
        pids = {p.pid for p in found}
        for pid in list(self._seen):
            if pid in pids:
                continue
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE and _marker(p) is not None:
                    found.append(p)
            except psutil.Error:
                self._seen.discard(pid)
        return found

    async def stop_group(self, grace_s: float) -> StopResult:
        """SIGTERM the group and its descendants, wait up to `grace_s`, SIGKILL what is left, verify."""
        started = time.monotonic()
        members = self.members()
        _signal_all(self.pgid, members, signal.SIGTERM)
        deadline = started + grace_s
        while time.monotonic() < deadline:
            if not self._alive():
                return StopResult(killed=False, survivors=(), elapsed_s=time.monotonic() - started)
            await asyncio.sleep(0.05)
        _signal_all(self.pgid, self.members() or members, signal.SIGKILL)
        settle = time.monotonic() + 5.0
        while self._alive() and time.monotonic() < settle:
            await asyncio.sleep(0.05)
        survivors = tuple(p.pid for p in self.members())
        return StopResult(killed=True, survivors=survivors, elapsed_s=time.monotonic() - started)

    def _alive(self) -> bool:
        if self.proc.returncode is None:
            return True
        return bool(self.members())


def _marker(p: psutil.Process) -> str | None:
    try:
        return p.environ().get(CHILD_MARKER)
    except psutil.Error:
        return None


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes whose process group is `pgid`."""
    out: list[psutil.Process] = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


def _signal_all(pgid: int, members: Sequence[psutil.Process], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for p in members:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)


async def spawn(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, on_line: LineSink) -> Child:
    """Start `argv` (no shell) in its own session with stdin closed; its output goes to `on_line`.

    Raises OSError (FileNotFoundError, PermissionError) when the program cannot be started.
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=str(cwd),
        env=dict(env),
        start_new_session=True,
        preexec_fn=_PREEXEC,
    )
    assert proc.stdout is not None and proc.stderr is not None
    pumps = [
        asyncio.create_task(_pump(proc.stdout, _LineSplitter("stdout", on_line))),
        asyncio.create_task(_pump(proc.stderr, _LineSplitter("stderr", on_line))),
    ]
    return Child(proc, pumps)


def attempt_processes(attempt: str) -> list[psutil.Process]:
    """Every live process of this user whose environment marks it as part of `attempt`."""
    me = os.getuid()
    out: list[psutil.Process] = []
    for p in psutil.process_iter(["uids", "status"]):
        try:
            if p.info["uids"] is None or p.info["uids"].real != me or p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if _marker(p) == attempt:
                out.append(p)
        except psutil.Error:
            continue
    return out


def kill_leftovers(attempt: str, *, grace_s: float) -> list[int]:
    """Stop what is left of an attempt whose agent died (SIGTERM, grace, SIGKILL); return their pids."""
    procs = attempt_processes(attempt)
    if not procs:
        return []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5.0)
    return [p.pid for p in procs]


async def dump_stacks(pids: Sequence[int], *, timeout_s: float = 20.0) -> str | None:
    """Python stacks of `pids` through py-spy, when it is installed (None otherwise)."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        return None
    parts: list[str] = []
    for pid in pids:
        try:
            proc = await asyncio.create_subprocess_exec(
                py_spy,
                "dump",
                "--pid",
                str(pid),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=timeout_s)
            parts.append(f"--- py-spy dump --pid {pid} ---\n{out.decode(errors='replace')}")
        except (OSError, TimeoutError) as exc:
            parts.append(f"--- py-spy dump --pid {pid} failed: {exc!r} ---")
    return "\n".join(parts)

"""Adapter: a stage's child process on an SSH host — uploaded, started detached, followed by offset, stopped.

`RemoteSpawner` is the runner's `Spawner` (runner.RunnerServices.spawner): `AttemptRun.run_process` calls
it exactly where a local agent starts a local process, so the stage kinds, the trainer command, metrics
parsing, checkpoint reporting, failure classification and the journaled reports are the local agent's own.

The remote run (remote.launch_detached) has its own session and process group, a pid file, a log file
and an exit-code file under `<root>/runs/<attempt>/`, so it survives the SSH connection. `RemoteChild`
polls it: new log bytes (by offset) become the attempt's log lines; the files the local stage kind
watches (verl's metrics JSONL, the checkpoint tracker and the listing of the checkpoint it names) are
mirrored into the runner's local folder by offset, so the kind's own watcher reports them. When the link
drops, polling reconnects with backoff and continues from the same offsets (the pid file re-attaches
it to the same process group); only a host unreachable for longer than the lease loses the attempt.
When the run ends, small files of its work folder are fetched back; big ones stay on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import posixpath
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import asyncssh
import psutil
import structlog
from asyncssh.constants import FILEXFER_TYPE_DIRECTORY, FILEXFER_TYPE_REGULAR

from verlyard_agent import checkpoints
from verlyard_agent.metrics import LineBuffer
from verlyard_agent.process import LineSink, StopResult
from verlyard_agent.ssh.link import HostLink, LinkDown
from verlyard_agent.ssh.paths import PathMap, blob_path, rewrite, shipped_files
from verlyard_agent.stages.base import StageFailure
from verlyard_agent.trainer import TRACKER_FILE
from verlyard_shared.hosts import remote

log = structlog.get_logger("verlyard.ssh.child")

POLL_S = 0.25
FETCH_BACK_MAX_BYTES = 1024 * 1024
"""Files of a finished run's work folder up to this size are copied back; bigger ones stay on the host."""
CHECKPOINT_KEY = "trainer.default_local_dir="


def _sha256(path: str) -> str | None:
    """The file's sha256, or None when it is not a regular file here."""
    if not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _regular_size(path: str) -> int | None:
    """The size of a regular file with content (None: no such file, a folder, or a sparse placeholder of a
    checkpoint mirrored from the host, whose bytes live there already)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not os.path.isfile(path) or (st.st_size > 0 and st.st_blocks == 0):
        return None
    return st.st_size


def _append(path: str, chunk: bytes) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as fh:
        fh.write(chunk)


def _sparse(folder: Path, listing: Mapping[str, int]) -> None:
    for name, size in listing.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fh:
            fh.truncate(size)


def _placeholders(step_dir: Path, listing: Mapping[str, int], tracker: Path, content: bytes) -> None:
    """The checkpoint's file names with their sizes as sparse files (no bytes copied), then the tracker."""
    for name, size in listing.items():
        target = step_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "wb") as fh:
            fh.truncate(size)
    tracker.parent.mkdir(parents=True, exist_ok=True)
    tmp = tracker.with_suffix(".tmp")
    tmp.write_bytes(content)
    tmp.replace(tracker)


class _Follow:
    """One remote file read by offset; restarts when the file shrinks (a writer reopened it)."""

    def __init__(self, remote_path: str) -> None:
        self.remote_path = remote_path
        self.offset = 0

    async def read(self, sftp: asyncssh.SFTPClient) -> bytes:
        try:
            size = (await sftp.stat(self.remote_path)).size or 0
        except asyncssh.SFTPNoSuchFile:
            return b""
        if size < self.offset:
            self.offset = 0
        if size == self.offset:
            return b""
        async with sftp.open(self.remote_path, "rb") as fh:
            await fh.seek(self.offset)
            chunk: bytes = await fh.read(size - self.offset)
        self.offset += len(chunk)
        return chunk


class RemoteChild:
    """A detached run on the host (implements runner.RunningChild)."""

    def __init__(
        self,
        link: HostLink,
        files: remote.RunFiles,
        *,
        paths: PathMap,
        on_line: LineSink,
        mirror: Mapping[str, str],
        checkpoint_dir: str | None,
        work_dir: str,
        lease_s: float,
        named_dirs: Sequence[str] = (),
    ) -> None:
        self._link = link
        self.files = files
        self._paths = paths
        self._on_line = on_line
        self._log_follow = _Follow(files.log_file)
        self._lines = LineBuffer()
        self._mirrors = {remote_path: (_Follow(remote_path), local) for remote_path, local in mirror.items()}
        self._checkpoint_dir = checkpoint_dir
        self._tracker_seen: bytes | None = None
        self._work_dir = work_dir
        self._named_dirs = [d for d in named_dirs if d != work_dir]
        self._lease_s = lease_s
        self.pid = 0
        self.pgid = 0
        self._done: int | None = None
        self._stopping = False
        self._log = log.bind(host=link.target.name, run=files.folder)

    # ---- runner.RunningChild -------------------------------------------------------------------------

    def members(self) -> list[psutil.Process]:
        return []  # nothing of it runs here

    async def wait(self) -> int:
        while self._done is None:
            try:
                await self._poll()
            except LinkDown as exc:
                down = self._link.down_for()
                if down > self._lease_s:
                    raise StageFailure(
                        f"host {self._link.target.name} unreachable for {down:.0f} s (longer than the lease of "
                        f"{self._lease_s:g} s): {exc}",
                        failure_class="lost",
                    ) from None
            if self._done is None:
                await asyncio.sleep(POLL_S)
        return self._done

    async def stop_group(self, grace_s: float) -> StopResult:
        """SIGTERM the remote process group, wait up to `grace_s`, SIGKILL what is left, verify."""
        started = time.monotonic()
        self._stopping = True
        killed = False
        with contextlib.suppress(LinkDown):
            await self._link.run(remote.signal_group(self.files, "TERM"))
        deadline = started + grace_s
        while time.monotonic() < deadline:
            if not await self._alive():
                return StopResult(killed=False, survivors=(), elapsed_s=time.monotonic() - started)
            await asyncio.sleep(0.1)
        killed = True
        with contextlib.suppress(LinkDown):
            await self._link.run(remote.signal_group(self.files, "KILL"))
        settle = time.monotonic() + 5.0
        while time.monotonic() < settle and await self._alive():
            await asyncio.sleep(0.1)
        survivors = (self.pgid,) if await self._alive() else ()
        return StopResult(killed=killed, survivors=survivors, elapsed_s=time.monotonic() - started)

    # ---- following the run -----------------------------------------------------------------------------

    async def _alive(self) -> bool:
        try:
            done = await self._link.run(remote.group_alive(self.files), timeout_s=15.0)
        except LinkDown:
            return True  # unknown: assume it still runs
        return str(done.stdout or "").strip() == "alive"

    async def _poll(self) -> None:
        async def op(conn: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient) -> tuple[str, str | None]:
            state = await conn.run(remote.group_alive(self.files), check=False)
            try:
                async with sftp.open(self.files.exit_file, "rb") as fh:
                    code: str | None = (await fh.read()).decode().strip()
            except asyncssh.SFTPNoSuchFile:
                code = None
            await self._pump(sftp)
            return str(state.stdout or "").strip(), code

        alive, code = await self._link.call(op)
        if not self.pid:
            await self._read_pid()
        if code is not None:
            await self._finish(int(code) if code.lstrip("-").isdigit() else 1)
        elif alive == "gone":
            # The group is gone and left no exit code: killed as a whole (our stop, or someone's kill -9).
            await self._finish(143 if self._stopping else 137)

    async def _read_pid(self) -> None:
        async def op(_: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient) -> str:
            async with sftp.open(self.files.pid_file, "rb") as fh:
                return (await fh.read()).decode().strip()

        with contextlib.suppress(asyncssh.SFTPNoSuchFile, LinkDown):
            text = await self._link.call(op)
            if text.isdigit():
                self.pid = self.pgid = int(text)

    async def _pump(self, sftp: asyncssh.SFTPClient) -> None:
        """New log lines out; mirrored files appended; the checkpoint tracker's folder listed."""
        for line in self._lines.feed(await self._log_follow.read(sftp)):
            self._on_line("stdout", line.decode(errors="replace"))
        for follow, local in self._mirrors.values():
            chunk = await follow.read(sftp)
            if chunk:
                await asyncio.to_thread(_append, local, chunk)
        await self._mirror_checkpoint(sftp)

    async def _mirror_checkpoint(self, sftp: asyncssh.SFTPClient) -> None:
        """Mirror the tracker only once the folder it names is complete on the host, with the names and sizes
        of its files (sparse placeholders: the bytes stay on the host), so the kind's watcher reports it."""
        if self._checkpoint_dir is None:
            return
        tracker = posixpath.join(self._checkpoint_dir, TRACKER_FILE)
        try:
            async with sftp.open(tracker, "rb") as fh:
                content: bytes = await fh.read()
        except asyncssh.SFTPNoSuchFile:
            return
        if content == self._tracker_seen:
            return
        step = checkpoints.parse_tracker(content)
        if step is None:
            return
        step_dir = posixpath.join(self._checkpoint_dir, checkpoints.step_dir_name(step))
        listing: dict[str, int] = {}
        for sub in ("", "actor", "huggingface", "actor/huggingface"):
            folder = posixpath.join(step_dir, sub) if sub else step_dir
            with contextlib.suppress(asyncssh.SFTPNoSuchFile, asyncssh.SFTPFailure):
                for entry in await sftp.readdir(folder):
                    filename = str(entry.filename)
                    if filename in (".", "..") or entry.attrs.type == FILEXFER_TYPE_DIRECTORY:
                        continue
                    listing[posixpath.join(sub, filename) if sub else filename] = entry.attrs.size or 0
        top = [name for name in listing if "/" not in name]
        actor = [name.split("/", 1)[1] for name in listing if name.startswith("actor/") and name.count("/") == 1]
        if not (checkpoints.is_complete(top) or checkpoints.is_complete(actor, has_actor_subdir=True)):
            return  # not complete yet: look again at the next poll
        await asyncio.to_thread(
            _placeholders, Path(self._paths.to_local(step_dir)), listing, Path(self._paths.to_local(tracker)), content
        )
        self._tracker_seen = content
        self._on_line(
            "stdout", f"[verlyard] checkpoint of step {step} stays on host {self._link.target.name} at {step_dir}"
        )

    async def _finish(self, code: int) -> None:
        async def op(_: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient) -> None:
            await self._pump(sftp)
            for line in self._lines.flush():
                self._on_line("stdout", line.decode(errors="replace"))
            await self._fetch_small(sftp)

        # A drop here raises LinkDown into wait(), which polls again: the exit code is re-read and the last
        # bytes are still fetched from the same offsets (the final steps' metrics are never skipped).
        await self._link.call(op, timeout_s=120.0)
        self._done = code

    async def _fetch_small(self, sftp: asyncssh.SFTPClient) -> None:
        """Small files of the run's work folder come back to the mirror (eval results); big ones stay, and are
        said to. Folders the command named (an export's target) come back the same way, their big files as
        sparse placeholders of the right size, so the kind's own checks (HF weights present) read the mirror."""
        await self._fetch_folder(sftp, self._work_dir, announce=True)
        for folder in self._named_dirs:
            await self._fetch_folder(sftp, folder, announce=False)

    async def _fetch_folder(self, sftp: asyncssh.SFTPClient, folder: str, *, announce: bool) -> None:
        try:
            entries = await sftp.readdir(folder)
        except asyncssh.SFTPError:  # not there, or not a folder (an uploaded file named on the command line)
            return
        mirrored = {remote_path for remote_path in self._mirrors}
        big: dict[str, int] = {}
        for entry in entries:
            filename = str(entry.filename)
            if filename in (".", "..") or entry.attrs.type != FILEXFER_TYPE_REGULAR:
                continue
            path = posixpath.join(folder, filename)
            if path in mirrored or path == self.files.log_file:
                continue
            size = entry.attrs.size or 0
            local = Path(self._paths.to_local(path))
            if size <= FETCH_BACK_MAX_BYTES:
                await asyncio.to_thread(local.parent.mkdir, parents=True, exist_ok=True)
                await sftp.get(path, str(local))
            else:
                big[filename] = size
                if announce:
                    self._on_line("stdout", f"[verlyard] {path} ({size} bytes) stays on host {self._link.target.name}")
        if big and not announce:
            await asyncio.to_thread(_sparse, Path(self._paths.to_local(folder)), big)
            self._on_line("stdout", f"[verlyard] {folder} stays on host {self._link.target.name}")


class RemoteSpawner:
    """Starts a stage's child on the host (runner.Spawner)."""

    def __init__(self, link: HostLink, *, paths: PathMap, shipped_prefixes: Sequence[str], lease_s: float) -> None:
        self._link = link
        self._paths = paths
        self._prefixes = list(shipped_prefixes)
        self._lease_s = lease_s
        self._uploaded: dict[str, str] = {}
        """local path -> blob path already checked present this session."""

    async def __call__(
        self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, on_line: LineSink
    ) -> RemoteChild:
        try:
            return await self._start(argv, env=env, cwd=cwd, on_line=on_line)
        except LinkDown as exc:
            # Not started: an infrastructure failure (retried elsewhere or later), never the stage's fault.
            raise StageFailure(
                f"could not start on host {self._link.target.name}: {exc}", failure_class="infra"
            ) from None

    async def _start(self, argv: Sequence[str], *, env: Mapping[str, str], cwd: Path, on_line: LineSink) -> RemoteChild:
        uploads = await self._upload(shipped_files([*argv, *env.values()], self._prefixes), on_line)
        await self._sync_mirror_files(shipped_files([*argv, *env.values()], [self._paths.local_root]), on_line)
        r_argv, r_env, r_cwd = rewrite(argv, env, str(cwd), paths=self._paths, uploads=uploads)
        attempt = env.get("VERLYARD_ATTEMPT") or posixpath.basename(str(cwd))
        files = remote.run_files(self._paths.remote_root, "runs", attempt)
        mirror: dict[str, str] = {}
        metrics = r_env.get("VERL_FILE_LOGGER_PATH")
        if metrics and env.get("VERL_FILE_LOGGER_PATH"):
            mirror[metrics] = env["VERL_FILE_LOGGER_PATH"]
        # Hydra override values are single-quoted strings (trainer.render_value).
        checkpoint_dir = next(
            (a[len(CHECKPOINT_KEY) :].strip("'\"") for a in r_argv if a.startswith(CHECKPOINT_KEY)), None
        )
        # A kind may run several processes one after the other in one attempt (each read to its end before
        # the next starts): each starts with fresh files.
        await self._link.run(remote.command(["rm", "-f", files.pid_file, files.exit_file, files.log_file]))
        done = await self._link.run(remote.launch_detached(files, r_argv, env=r_env, cwd=r_cwd))
        if done.exit_status != 0:
            raise StageFailure(
                f"could not start on host {self._link.target.name}: {str(done.stderr or '').strip()[:500]}",
                failure_class="infra",
            )
        on_line("stdout", f"[verlyard] started on host {self._link.target.name}: {files.folder}")
        child = RemoteChild(
            self._link,
            files,
            paths=self._paths,
            on_line=on_line,
            mirror=mirror,
            checkpoint_dir=checkpoint_dir,
            work_dir=r_cwd,
            # Whole argv tokens naming a place under the host's root (an export's target folder).
            named_dirs=[a for a in r_argv if a.startswith(self._paths.remote_root.rstrip("/") + "/")],
            lease_s=self._lease_s,
        )
        return child

    async def _sync_mirror_files(self, local_files: Sequence[str], on_line: LineSink) -> None:
        """Files under the mirror that a stage of this attempt's pipeline wrote here (an in-process kind such
        as preprocess) go to the same place under the host's root, unless a file of that size is there."""
        for local in local_files:
            size = await asyncio.to_thread(_regular_size, local)
            if size is None:
                continue
            target = self._paths.to_remote(local)

            async def op(
                _: asyncssh.SSHClientConnection,
                sftp: asyncssh.SFTPClient,
                src: str = local,
                dst: str = target,
                want: int = size,
            ) -> bool:
                with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                    if (await sftp.stat(dst)).size == want:
                        return False
                await sftp.makedirs(posixpath.dirname(dst), exist_ok=True)
                await sftp.put(src, dst + ".part")
                await sftp.posix_rename(dst + ".part", dst)
                return True

            if await self._link.call(op, timeout_s=600.0):
                on_line("stdout", f"[verlyard] uploaded: {posixpath.basename(local)} -> {target}")

    async def _upload(self, local_files: Sequence[str], on_line: LineSink) -> dict[str, str]:
        """Content-addressed: a blob already on the host is not sent again."""
        out: dict[str, str] = {}
        for local in local_files:
            digest = await asyncio.to_thread(_sha256, local)
            if digest is None:
                continue
            target = blob_path(self._paths.remote_root, digest, posixpath.basename(local))
            out[local] = target
            if self._uploaded.get(local) == target:
                continue

            async def op(
                _: asyncssh.SSHClientConnection, sftp: asyncssh.SFTPClient, src: str = local, dst: str = target
            ) -> bool:
                if await sftp.exists(dst):
                    return False
                await sftp.makedirs(posixpath.dirname(dst), exist_ok=True)
                tmp = dst + ".part"
                await sftp.put(src, tmp)
                await sftp.posix_rename(tmp, dst)
                return True

            sent = await self._link.call(op, timeout_s=600.0)
            self._uploaded[local] = target
            on_line(
                "stdout",
                f"[verlyard] {'uploaded' if sent else 'already on the host'}: {posixpath.basename(local)} -> {target}",
            )
        return out

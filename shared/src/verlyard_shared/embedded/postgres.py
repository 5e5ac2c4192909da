"""Adapter: an embedded Postgres 16 driven straight from the `pgserver` wheel's binaries.

We call initdb/pg_ctl ourselves (not `pgserver.get_server`) to keep fsync on, require a password over
TCP, listen on loopback only and control crashes (`stop_immediate`, `kill`) for the reliability tests.
Postgres refuses to run as root, so under euid 0 every server process runs as the system user
`verlyard-pg`, created on first use (as pgserver does with its own user).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import secrets
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

SYSTEM_USER = "verlyard-pg"
"""The OS account that owns the data directory and runs the server when we are root."""
SUPERUSER = "postgres"
"""The database superuser created by initdb."""

_DB_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class EmbeddedPostgresError(RuntimeError):
    """initdb, pg_ctl or psql failed; the message carries their output and the tail of the server log."""


def postgres_bin_dir() -> Path:
    """`pgserver/pginstall/bin`, found without importing pgserver (its import warns about XDG_RUNTIME_DIR)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedPostgresError("the pgserver wheel is not installed: pip install 'verlyard-shared[embedded]'")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "pginstall" / "bin"
        if (candidate / "pg_ctl").exists():
            return candidate
    raise EmbeddedPostgresError("pgserver is installed but has no pginstall/bin/pg_ctl")


def _ensure_system_user(name: str) -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        result = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
            text=True,
            check=False,
        )
        # Exit 9: created meanwhile by a concurrent process; anything else is a real failure.
        if result.returncode not in (0, 9):
            raise EmbeddedPostgresError(f"useradd {name} failed: {result.stderr.strip()}") from None
        entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def _ensure_traversable(path: Path) -> None:
    """Give `other` the execute (traverse) bit on every ancestor of `path`, so the server user can reach it.

    Only +x is added (not read), the least that lets another user open a known path below.
    """
    for ancestor in path.resolve().parents:
        mode = ancestor.stat().st_mode
        if not mode & stat.S_IXOTH:
            ancestor.chmod(mode | stat.S_IXOTH)


class EmbeddedPostgres:
    """One Postgres cluster in `data_dir`, listening on `host:port` (TCP, password auth) and a short socket dir.

    `init()` is idempotent (it keeps an existing cluster); the superuser password is generated once and
    kept next to the data directory in `<data_dir>.password` (mode 0600).
    """

    def __init__(self, data_dir: Path, port: int, host: str = "127.0.0.1") -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self.host = host
        self.password_file = self.data_dir.with_name(self.data_dir.name + ".password")
        self.log_file = self.data_dir / "postgres.log"
        digest = hashlib.sha256(f"{self.data_dir}:{port}".encode()).hexdigest()[:12]
        # Unix socket paths are limited to ~107 bytes; a fixed short dir under /tmp always fits.
        self.socket_dir = Path(tempfile.gettempdir()) / f"vypg-{digest}"
        self._bin = postgres_bin_dir()
        self._as_root = os.geteuid() == 0
        self._ids: tuple[int, int] | None = None

    # ---- identity -------------------------------------------------------------------------------

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    @property
    def url(self) -> str:
        """postgresql://postgres:<password>@host:port/postgres"""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}:{self.password}@{self.host}:{self.port}/{database}"

    # ---- lifecycle ------------------------------------------------------------------------------

    def init(self) -> None:
        """Create the cluster (initdb) unless `data_dir` already holds one."""
        if (self.data_dir / "PG_VERSION").exists():
            return
        password = self._ensure_password()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        self._prepare_for_server_user()
        # initdb reads the password from a file the server user can read; it lives only for this call.
        with tempfile.TemporaryDirectory(prefix="vypg-init-") as tmp:
            pwfile = Path(tmp) / "pw"
            fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            if self._as_root:
                uid, gid = self._server_ids()
                os.chown(tmp, uid, gid)
                os.chown(pwfile, uid, gid)
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--locale=C",
                timeout=120,
            )

    def start(self, *, timeout: float = 30.0) -> None:
        """Start the server and wait until it accepts connections (after crash recovery, if any)."""
        if self.is_running():
            return
        self._prepare_for_server_user()
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        if self._as_root:
            uid, gid = self._server_ids()
            os.chown(self.socket_dir, uid, gid)
        options = f"-h {self.host} -p {self.port} -k {self.socket_dir} -c max_connections=200"
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._run(
                    "pg_ctl",
                    "-D",
                    str(self.data_dir),
                    "-w",
                    "-t",
                    str(max(1, int(deadline - time.monotonic()))),
                    "-l",
                    str(self.log_file),
                    "-o",
                    options,
                    "start",
                    timeout=timeout + 10,
                )
                return
            except EmbeddedPostgresError:
                # After a SIGKILL the old backends may still hold the shared memory for a moment.
                if time.monotonic() >= deadline or "shared memory block" not in self._log_tail():
                    raise
                time.sleep(0.2)

    def stop(self, *, timeout: float = 30.0) -> None:
        """Fast shutdown: roll back open transactions, checkpoint, exit."""
        self._pg_ctl_stop("fast", timeout)

    def stop_immediate(self, *, timeout: float = 30.0) -> None:
        """Immediate shutdown: no checkpoint; the next start runs crash recovery (as after power loss)."""
        self._pg_ctl_stop("immediate", timeout)

    def kill(self, *, timeout: float = 10.0) -> None:
        """SIGKILL the postmaster, then wait until its orphaned backends have exited too."""
        pid = self._postmaster_pid()
        if pid is None:
            return
        try:
            process = psutil.Process(pid)
            children = process.children(recursive=True)
            os.kill(pid, signal.SIGKILL)
        except (psutil.NoSuchProcess, ProcessLookupError):
            return
        _, alive = psutil.wait_procs([process, *children], timeout=timeout)
        for leftover in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                leftover.kill()

    def is_running(self) -> bool:
        """True when the postmaster named in postmaster.pid is alive."""
        return self._postmaster_pid() is not None

    # ---- databases ------------------------------------------------------------------------------

    def create_database(self, name: str, *, exist_ok: bool = False) -> str:
        """CREATE DATABASE `name` (lower-case identifier); returns its URL."""
        self._check_name(name)
        if exist_ok and self._psql_scalar(f"SELECT 1 FROM pg_database WHERE datname = '{name}'") == "1":
            return self.url_for(name)
        self._psql(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE IF EXISTS `name`, disconnecting its sessions."""
        self._check_name(name)
        self._psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    # ---- internals ------------------------------------------------------------------------------

    @staticmethod
    def _check_name(name: str) -> None:
        if not _DB_NAME.match(name):
            raise ValueError(f"database name {name!r} must match {_DB_NAME.pattern}")

    def _ensure_password(self) -> str:
        if self.password_file.exists():
            return self.password
        self.password_file.parent.mkdir(parents=True, exist_ok=True)
        value = secrets.token_urlsafe(24)
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
        return value

    def _server_ids(self) -> tuple[int, int]:
        if self._ids is None:
            self._ids = _ensure_system_user(SYSTEM_USER)
        return self._ids

    def _prepare_for_server_user(self) -> None:
        if not self._as_root:
            return
        uid, gid = self._server_ids()
        _ensure_traversable(self.data_dir)
        _ensure_traversable(self._bin / "pg_ctl")
        if self.data_dir.exists() and self.data_dir.stat().st_uid != uid:
            for root, dirs, files in os.walk(self.data_dir):
                os.chown(root, uid, gid)
                for name in dirs + files:
                    os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)

    def _run(self, program: str, *args: str, timeout: float) -> str:
        kwargs: dict[str, Any] = {}
        if self._as_root:
            uid, gid = self._server_ids()
            kwargs = {"user": uid, "group": gid, "extra_groups": []}
        env = {"PATH": f"{self._bin}:/usr/bin:/bin", "LC_ALL": "C", "TZ": "UTC"}
        # Temporary files, not pipes: pg_ctl's postmaster inherits them and would keep a pipe open.
        with tempfile.TemporaryFile("w+") as out:
            try:
                result = subprocess.run(
                    [str(self._bin / program), *args],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd="/",
                    env=env,
                    timeout=timeout,
                    check=False,
                    text=True,
                    **kwargs,
                )
            except subprocess.TimeoutExpired:
                out.seek(0)
                raise EmbeddedPostgresError(
                    f"{program} timed out after {timeout}s: {out.read().strip()}\nlog: {self._log_tail()}"
                ) from None
            out.seek(0)
            output = out.read()
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"{program} exited {result.returncode}: {output.strip()}\nlog: {self._log_tail()}"
            )
        return output

    def _pg_ctl_stop(self, mode: str, timeout: float) -> None:
        if not self.is_running():
            return
        try:
            self._run(
                "pg_ctl",
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                str(int(timeout)),
                "-m",
                mode,
                "stop",
                timeout=timeout + 10,
            )
        except EmbeddedPostgresError:
            if self.is_running():
                raise

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            pid = int(first)
        except (OSError, IndexError, ValueError):
            return None
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE or process.name() not in ("postgres", "postmaster"):
                return None
        except psutil.NoSuchProcess:
            return None
        return pid

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _psql(self, sql: str) -> str:
        # The password travels in the environment, never in argv (visible in `ps`).
        env = {"PGPASSWORD": self.password, "PGCONNECT_TIMEOUT": "10", "LC_ALL": "C"}
        args = [str(self._bin / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        args += ["-h", self.host, "-p", str(self.port), "-U", SUPERUSER, "-d", "postgres", "-c", sql]
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60, check=False)
        if result.returncode != 0:
            raise EmbeddedPostgresError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def _psql_scalar(self, sql: str) -> str:
        return self._psql(sql).strip()

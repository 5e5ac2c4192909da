"""Unit: every override key verlyard renders exists in verl 0.9.1's own Hydra config (or is `+`-prefixed).

The schema is read from the trainer environment's installed verl (`verl/trainer/config/*.yaml`): the
primary configs `sft_trainer_engine.yaml` and `ppo_trainer.yaml`, composed through their defaults lists
(config groups, `group@package` placement, `../` group paths, `# @package _global_`, `${var}` option
names) by a small reader here — key existence is all that is checked; values and merge order are not.
Skipped, with the reason, where the trainer environment cannot be had. The integration test
`test_verl_cpu_launcher.py` also composes the same overrides with Hydra itself.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from verlyard_agent.trainer import Facts, TrainPlan, bare_key, build_train_plan

PREP = {"prep": {"train_files": ["/d/train.parquet"], "val_files": ["/d/val.parquet"], "train_rows": 224}}


def _place(tree: dict[str, Any], package: str, content: dict[str, Any]) -> None:
    node = tree
    for part in [p for p in package.split(".") if p]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return
    _merge(node, content)


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)  # pyright: ignore[reportUnknownArgumentType]
        else:
            into[key] = value


def compose(
    config_dir: Path, group_dir: PurePosixPath, name: str, package: str, choices: dict[str, str]
) -> dict[str, Any]:
    """The keys of config `group_dir/name.yaml` composed at `package` (a tree rooted at the primary config)."""
    path = config_dir / group_dir / f"{name}.yaml"
    text = path.read_text()
    if re.search(r"^# *@package +_global_", text, re.MULTILINE):
        package = ""
    doc = yaml.safe_load(text) or {}
    defaults = doc.pop("defaults", [])
    tree: dict[str, Any] = {}
    for entry in defaults:
        if entry == "_self_":
            continue
        if isinstance(entry, str):
            _merge(tree, compose(config_dir, group_dir, entry, package, choices))
            continue
        for raw_key, raw_option in entry.items():
            if raw_option is None or str(raw_key).startswith("override "):
                continue
            group, _, pkg = str(raw_key).partition("@")
            option = re.sub(r"\$\{(\w+)\}", lambda m: choices.get(m.group(1), m.group(0)), str(raw_option))
            group_path = PurePosixPath(*(group_dir / group).parts)
            resolved = _normalise(group_path)
            choices[group.split("/")[-1]] = option
            sub_package = ".".join(p for p in (package, pkg or group.replace("/", ".").lstrip(".")) if p)
            _merge(tree, compose(config_dir, resolved, option, sub_package, choices))
    _place(tree, package, doc)
    return tree


def _normalise(path: PurePosixPath) -> PurePosixPath:
    parts: list[str] = []
    for part in path.parts:
        if part == "..":
            if parts:
                parts.pop()
        elif part not in (".", ""):
            parts.append(part)
    return PurePosixPath(*parts)


def has_key(tree: dict[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]  # pyright: ignore[reportUnknownVariableType]
    return True


@pytest.fixture(scope="module")
def verl_config_dir(verl_package_dir: Path) -> Path:
    config = verl_package_dir / "trainer" / "config"
    if not (config / "sft_trainer_engine.yaml").is_file():
        pytest.skip(f"verl's Hydra configs are not at {config}")
    return config


def facts(**kw: Any) -> Facts:
    return Facts(
        trainer_python="/py",
        work_dir=Path("/w"),
        stage_dir=Path("/s"),
        inputs=PREP,
        needs=("prep",),
        cpu_launcher="/launcher.py",
        **kw,
    )


def unknown_keys(plan: TrainPlan, schema: dict[str, Any]) -> list[str]:
    missing: list[str] = []
    for token in plan.overrides:
        key = token.split("=", 1)[0]
        if key.startswith("+") or key.startswith("hydra."):
            continue  # `+` adds a key by design; hydra.* is Hydra's own config
        if not has_key(schema, bare_key(key)):
            missing.append(key)
    return missing


SFT_CASES = {
    "cpu": ({"model": "/m", "lr": 1e-4, "save_every": 5, "max_length": 128, "max_steps": 10}, {}),
    "gpu-lora": ({"model": "/m", "lora": {"rank": 8, "alpha": 16}, "save_hf": True, "epochs": 2}, {"gpus": (0, 1)}),
    "resume": ({"model": "/m", "micro_batch_size": 2}, {"resume_from_path": "/s/checkpoints/global_step_5"}),
}
PPO_CASES = {
    "grpo": {"algorithm": "grpo", "model": "/m", "lr": 1e-6, "lora": {"rank": 8}, "max_steps": 5},
    "ppo": {"algorithm": "ppo", "model": "/m", "critic_lr": 1e-5, "save_every": 10},
    "rloo-reward": {"algorithm": "rloo", "model": "/m", "reward_function": {"path": "/r.py", "name": "score"}},
}


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("case", sorted(SFT_CASES))
def test_sft_override_keys_exist_in_verls_schema(verl_config_dir: Path, case: str) -> None:
    schema = compose(verl_config_dir, PurePosixPath("."), "sft_trainer_engine", "", {})
    params, kw = SFT_CASES[case]
    plan = build_train_plan(params, facts(**kw))
    assert not unknown_keys(plan, schema), f"not in sft_trainer_engine.yaml: {unknown_keys(plan, schema)}"
    assert len(plan.overrides) > 15


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("case", sorted(PPO_CASES))
def test_rl_override_keys_exist_in_verls_schema(verl_config_dir: Path, case: str) -> None:
    schema = compose(verl_config_dir, PurePosixPath("."), "ppo_trainer", "", {})
    plan = build_train_plan(PPO_CASES[case], facts(gpus=(0,)))
    assert not unknown_keys(plan, schema), f"not in ppo_trainer.yaml: {unknown_keys(plan, schema)}"


@pytest.mark.timeout(1200)
def test_the_reader_would_catch_a_wrong_key(verl_config_dir: Path) -> None:
    schema = compose(verl_config_dir, PurePosixPath("."), "ppo_trainer", "", {})
    assert has_key(schema, "actor_rollout_ref.actor.optim.lr")  # through actor@...: dp_actor -> ../optim@optim
    assert has_key(schema, "actor_rollout_ref.rollout.n")
    assert has_key(schema, "ray_kwargs.ray_init.num_cpus")
    assert not has_key(schema, "actor_rollout_ref.actor.learning_rate")
    sft = compose(verl_config_dir, PurePosixPath("."), "sft_trainer_engine", "", {})
    assert has_key(sft, "engine.strategy") and has_key(sft, "optim.lr") and has_key(sft, "model.lora_rank")
    assert not has_key(sft, "trainer.max_steps")

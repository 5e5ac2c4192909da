"""Unit: every examples/*.yaml parses and validates as the API would, and its `with:` keys are real.

Validation lets unknown `with:` keys through to the agent (which ignores them), so a misspelt key in an
example would go unnoticed: each stage's keys are checked against the keys its stage kind's own source
reads, train stages are built into a verl command line by the agent's `build_train_plan`, and (where the
trainer environment is present) their override keys are checked against verl's own Hydra config.
"""

from __future__ import annotations

import re
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import pytest

from tests.unit.test_verl_schema import compose, unknown_keys
from verlyard_agent.trainer import Facts, build_train_plan
from verlyard_shared.spec import PipelineSpec, StageSpec
from verlyard_shared.validation import parse_pipeline

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
AGENT = ROOT / "services" / "gpu-agent" / "src" / "verlyard_agent"
EXPECTED = {"demo.yaml", "sales-sft.yaml", "grpo-gsm8k.yaml", "diamond.yaml", "three-layer.yaml"}
ASSETS = "/srv/verlyard-demo/assets"
"""What scripts/demo.py puts in place of `{{ASSETS}}` (any absolute folder)."""

# The source files whose `params` reads define each kind's `with:` keys.
KIND_SOURCES = {
    "noop": ("stages/noop.py",),
    "preprocess": ("stages/preprocess.py",),
    "train": ("trainer.py", "stages/train.py"),
    "evaluate": ("stages/evaluate.py", "stages/_verl.py"),
    "export": ("stages/export.py", "stages/_verl.py"),
    "cleanup": ("stages/cleanup.py",),
    "command": ("stages/command.py",),
}
_READ = re.compile(r"""params(?:\.get\(|\[|,\s*)["'](\w+)["']|_int_param\(ctx,\s*["'](\w+)["']""")
_NESTED = {"lora", "overrides", "reward_function"}
"""Keys whose value is a mapping read by key elsewhere (checked by `build_train_plan`)."""


def example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def load(path: Path) -> PipelineSpec:
    text = path.read_text().replace("{{ASSETS}}", ASSETS)
    return parse_pipeline(text, content_type="yaml")


def keys_read(kind: str) -> set[str]:
    found: set[str] = set()
    for name in KIND_SOURCES[kind]:
        for match in _READ.finditer((AGENT / name).read_text()):
            found.add(match.group(1) or match.group(2))
    return found


def train_facts(stage_name: str, stage: StageSpec) -> Facts:
    prep = {"train_files": ["/d/train.parquet"], "val_files": ["/d/val.parquet"], "train_rows": 4096}
    return Facts(
        trainer_python="/opt/trainer/bin/python",
        work_dir=PurePath(f"/data/p/{stage_name}/attempts/a1"),
        stage_dir=PurePath(f"/data/p/{stage_name}"),
        gpus=tuple(range(stage.resources.gpus)),
        inputs={dep: prep for dep in stage.needs},
        needs=stage.needs,
        cpu_launcher="/agent/launchers/verl_cpu_sft.py",
    )


def train_stages() -> list[tuple[str, str, StageSpec]]:
    out: list[tuple[str, str, StageSpec]] = []
    for path in example_files():
        for name, stage in load(path).stages.items():
            if stage.kind == "train":
                out.append((path.name, name, stage))
    return out


def test_the_documented_examples_are_all_there() -> None:
    assert {p.name for p in example_files()} >= EXPECTED


def test_the_demo_has_a_placeholder_that_scripts_demo_fills() -> None:
    assert "{{ASSETS}}" in (EXAMPLES / "demo.yaml").read_text()
    assert '"{{ASSETS}}"' in (ROOT / "scripts" / "demo.py").read_text()


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_the_example_parses_and_validates(path: Path) -> None:
    spec = load(path)
    assert spec.name == path.stem or path.name == "demo.yaml"
    assert spec.stages


@pytest.mark.parametrize("path", example_files(), ids=lambda p: p.name)
def test_every_with_key_is_read_by_its_stage_kind(path: Path) -> None:
    for name, stage in load(path).stages.items():
        unknown = set(stage.params) - keys_read(stage.kind) - _NESTED
        assert not unknown, f"{path.name}: stages.{name}.with has keys the agent never reads: {sorted(unknown)}"


def test_paths_the_agent_wants_absolute_are_absolute() -> None:
    for path in example_files():
        for name, stage in load(path).stages.items():
            tokenizer = stage.params.get("tokenizer")  # preprocess refuses anything but a folder on the host
            assert tokenizer is None or str(tokenizer).startswith("/"), f"{path.name}: stages.{name}"
            reward = stage.params.get("reward_function")
            assert reward is None or str(reward["path"]).startswith("/"), f"{path.name}: stages.{name}"


def test_the_no_op_examples_are_only_no_ops() -> None:
    for name in ("diamond.yaml", "three-layer.yaml"):
        assert {s.kind for s in load(EXAMPLES / name).stages.values()} == {"noop"}


@pytest.mark.parametrize(("file", "stage_name", "stage"), train_stages(), ids=lambda v: v if isinstance(v, str) else "")
def test_train_stages_build_a_verl_run(file: str, stage_name: str, stage: StageSpec) -> None:
    plan = build_train_plan(stage.params, train_facts(stage_name, stage))
    assert plan.argv and not plan.warnings, (file, plan.warnings)
    assert plan.mode == ("gpu" if stage.resources.gpus else "cpu")


def test_the_gpu_examples_ask_for_a_gpu_and_the_algorithms_they_name() -> None:
    algorithms = {(f, s.params["algorithm"], s.resources.gpus) for f, _, s in train_stages()}
    assert ("sales-sft.yaml", "sft", 1) in algorithms
    assert ("grpo-gsm8k.yaml", "grpo", 1) in algorithms
    grpo = next(s for f, _, s in train_stages() if f == "grpo-gsm8k.yaml")
    assert "reward_function" in grpo.params


@pytest.mark.timeout(1200)
def test_train_override_keys_exist_in_verls_schema(verl_package_dir: Path) -> None:
    config = verl_package_dir / "trainer" / "config"
    if not (config / "sft_trainer_engine.yaml").is_file():
        pytest.skip(f"verl's Hydra configs are not at {config}")
    schemas: dict[str, dict[str, Any]] = {}
    for file, stage_name, stage in train_stages():
        plan = build_train_plan(stage.params, train_facts(stage_name, stage))
        primary = "sft_trainer_engine" if plan.algorithm == "sft" else "ppo_trainer"
        if primary not in schemas:
            schemas[primary] = compose(config, PurePosixPath("."), primary, "", {})
        missing = unknown_keys(plan, schemas[primary])
        assert not missing, f"{file}: stages.{stage_name}: not in verl's {primary}.yaml: {missing}"

"""Unit: every examples/*.yaml parses and validates as the API would, and the `with:` keys agree.

Validation refuses a `with:` key its stage kind does not read (`verlyard_shared.spec.WITH_KEYS`). That
list is only right while the agent's sources read exactly those keys, so it is checked here against
each kind's own source (and the runner's, for the keys every kind takes). Train stages are built into
a verl command line by the agent's `build_train_plan`, and (where the trainer environment is present)
their override keys are checked against verl's own Hydra config.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import pytest

from tests.unit.test_verl_schema import compose, unknown_keys
from verlyard_agent.stages import MODULES, ignored_params
from verlyard_agent.trainer import Facts, build_train_plan
from verlyard_shared.spec import COMMON_WITH_KEYS, STAGE_KINDS, WITH_KEYS, PipelineSpec, StageSpec
from verlyard_shared.validation import parse_pipeline

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
GUIDE = ROOT / "docs" / "guide" / "pipelines.md"
AGENT = ROOT / "services" / "gpu-agent" / "src" / "verlyard_agent"
EXPECTED = {"demo.yaml", "sales-sft.yaml", "grpo-gsm8k.yaml", "diamond.yaml", "three-layer.yaml"}
ASSETS = "/srv/verlyard-demo/assets"
"""What scripts/demo.py puts in place of `{{ASSETS}}` (any absolute folder)."""

# The source files whose `params` reads are each kind's `with:` keys.
KIND_SOURCES = {
    "noop": ("stages/noop.py",),
    "preprocess": ("stages/preprocess.py",),
    "train": ("trainer.py", "stages/train.py"),
    "evaluate": ("stages/evaluate.py", "stages/_verl.py"),
    "export": ("stages/export.py", "stages/_verl.py"),
    "cleanup": ("stages/cleanup.py",),
    "command": ("stages/command.py", "childenv.py"),
}
COMMON_SOURCES = ("runner.py",)
"""Where the keys every kind takes are read (`spec.COMMON_WITH_KEYS`)."""
_READ = re.compile(r"""params(?:\.get\(|\[|,\s*)["'](\w+)["']|_int_param\(ctx,\s*["'](\w+)["']""")


def example_files() -> list[Path]:
    return sorted(EXAMPLES.glob("*.yaml"))


def load(path: Path) -> PipelineSpec:
    text = path.read_text().replace("{{ASSETS}}", ASSETS)
    return parse_pipeline(text, content_type="yaml")


def keys_read(sources: Sequence[str]) -> set[str]:
    found: set[str] = set()
    for name in sources:
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


@pytest.mark.parametrize("kind", STAGE_KINDS)
def test_the_agent_reads_exactly_the_with_keys_validation_allows(kind: str) -> None:
    declared = WITH_KEYS[kind] - COMMON_WITH_KEYS
    read = keys_read(KIND_SOURCES[kind])
    assert not read - declared, f"the agent's {kind} reads keys spec.WITH_KEYS lacks: {sorted(read - declared)}"
    assert not declared - read, f"spec.WITH_KEYS[{kind!r}] has keys the agent never reads: {sorted(declared - read)}"


def test_the_runner_reads_the_keys_every_kind_takes() -> None:
    assert keys_read(COMMON_SOURCES) == COMMON_WITH_KEYS


def test_the_agent_has_a_module_for_every_kind() -> None:
    assert set(MODULES) == set(WITH_KEYS) == set(STAGE_KINDS)


def test_the_agent_logs_the_keys_it_ignores_in_a_spec_from_before_they_were_refused() -> None:
    assert ignored_params("train", {"model": "m", "reward_fn": {}, "watchdog": False, "x-note": 1}) == ["reward_fn"]


def test_the_guide_lists_every_with_key_of_every_kind() -> None:
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", GUIDE.read_text(), re.MULTILINE))
    for kind in STAGE_KINDS:
        documented = set(re.findall(r"`(\w+)(?::[^`]*)?`", rows[kind]))
        missing = WITH_KEYS[kind] - COMMON_WITH_KEYS - documented
        assert not missing, f"docs/guide/pipelines.md: the {kind} row lacks {sorted(missing)}"


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

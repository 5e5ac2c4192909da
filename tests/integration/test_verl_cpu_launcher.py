"""Integration: the CPU launcher still finds verl's private names, and Hydra accepts the rendered overrides.

The launcher patches two private verl names (`EngineRegistry._engines`,
`verl.utils.distributed.initialize_global_process_group`): verl is pinned to 0.9.1, and this fails
loudly the day they move. The second half composes verlyard's SFT and RL overrides with verl's own
Hydra config through Hydra itself, and reads back the values that were quoted for safety.
Skipped only when the trainer environment cannot be built.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.plugins.trainer import OFFLINE_ENV, TRAINER_ENV_TIMEOUT_S
from verlyard_agent.trainer import Facts, build_train_plan

LAUNCHERS = Path(__file__).resolve().parents[2] / "services" / "gpu-agent" / "src" / "verlyard_agent" / "launchers"

COMPOSE = r"""
import json, sys
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf
results = []
with initialize_config_module("verl.trainer.config", version_base=None):
    for name, overrides, probes in json.loads(sys.stdin.read()):
        cfg = compose(name, overrides=overrides)
        results.append({p: OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(cfg, p)}))["v"]
                        for p in probes})
print(json.dumps(results))
"""

TRICKY = "it's ${oc.env:HOME} a,b [x] \\"


def run_python(python: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [python, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, **OFFLINE_ENV},
    )


@pytest.mark.timeout(TRAINER_ENV_TIMEOUT_S)
def test_the_cpu_launchers_private_verl_names_are_still_there(trainer_python: str) -> None:
    done = run_python(trainer_python, str(LAUNCHERS / "verl_cpu_sft.py"), "--verlyard-check")
    assert done.returncode == 0, (
        "verl moved a private name the CPU launcher patches (EngineRegistry._engines or "
        f"verl.utils.distributed.initialize_global_process_group); pin verl==0.9.1 or port the launcher:\n"
        f"{done.stdout}\n{done.stderr[-3000:]}"
    )
    assert "verlyard CPU launcher: ok (verl 0.9.1)" in done.stdout


Job = tuple[str, tuple[str, ...], list[str]]


def _compose_all(python: str, jobs: list[Job]) -> list[dict[str, Any]]:
    """Compose every (config, overrides, probed keys) in one process: importing verl costs seconds."""
    payload = [[name, [t for t in ov if not t.startswith("hydra.")], probes] for name, ov, probes in jobs]
    done = run_python(python, "-c", COMPOSE, stdin=json.dumps(payload))
    assert done.returncode == 0, f"Hydra refused the overrides:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _facts(**kw: Any) -> Facts:
    prep = {"prep": {"train_files": ["/d/train.parquet"], "val_files": ["/d/val.parquet"], "train_rows": 64}}
    return Facts(
        trainer_python="/py",
        work_dir=Path("/w"),
        stage_dir=Path("/s"),
        inputs=prep,
        needs=("prep",),
        cpu_launcher="/l.py",
        **kw,
    )


@pytest.mark.timeout(TRAINER_ENV_TIMEOUT_S)
def test_hydra_composes_the_sft_grpo_and_ppo_overrides_and_reads_values_back(trainer_python: str) -> None:
    sft = build_train_plan(
        {
            "model": "/m",
            "lr": 1e-4,
            "lora": {"rank": 4, "alpha": 8},
            "max_steps": 10,
            "overrides": {"trainer.experiment_name": TRICKY, "optim.weight_decay": "1e-3"},
        },
        _facts(resume_from_path="/s/checkpoints/global_step_5"),
    )
    grpo = build_train_plan({"algorithm": "grpo", "model": "/m", "lora": {"rank": 8}}, _facts(gpus=(0, 1)))
    ppo = build_train_plan({"algorithm": "ppo", "model": "/m", "critic_lr": 2e-5}, _facts(gpus=(0,)))
    got_sft, got_grpo, got_ppo = _compose_all(
        trainer_python,
        [
            (
                "sft_trainer_engine",
                sft.overrides,
                [
                    "trainer.experiment_name",
                    "optim.lr",
                    "optim.weight_decay",
                    "model.lora_rank",
                    "data.train_files",
                    "trainer.logger",
                    "trainer.resume_mode",
                    "trainer.resume_from_path",
                    "engine.strategy",
                    "model.override_config",
                    "trainer.save_freq",
                ],
            ),
            (
                "ppo_trainer",
                grpo.overrides,
                [
                    "algorithm.adv_estimator",
                    "actor_rollout_ref.rollout.n",
                    "ray_kwargs.ray_init",
                    "trainer.n_gpus_per_node",
                ],
            ),
            ("ppo_trainer", ppo.overrides, ["algorithm.adv_estimator", "critic.optim.lr"]),
        ],
    )
    assert got_sft["trainer.experiment_name"] == TRICKY  # no interpolation, no sweep, no list: the literal text
    assert got_sft["optim.lr"] == pytest.approx(1e-4) and got_sft["optim.weight_decay"] == pytest.approx(1e-3)
    assert got_sft["model.lora_rank"] == 4
    assert got_sft["data.train_files"] == ["/d/train.parquet"]
    assert got_sft["trainer.logger"] == ["console", "file"]
    assert got_sft["trainer.resume_mode"] == "resume_path"
    assert got_sft["trainer.resume_from_path"] == "/s/checkpoints/global_step_5"
    assert got_sft["engine.strategy"] == "fsdp2"
    assert got_sft["model.override_config"] == {"attn_implementation": "sdpa"}
    assert got_sft["trainer.save_freq"] == "after_each_epoch"

    assert got_grpo["algorithm.adv_estimator"] == "grpo"
    assert got_grpo["actor_rollout_ref.rollout.n"] == 4
    assert got_grpo["ray_kwargs.ray_init"]["address"] == "local"
    assert got_grpo["ray_kwargs.ray_init"]["_node_ip_address"] == "127.0.0.1"
    assert got_grpo["ray_kwargs.ray_init"]["include_dashboard"] is False
    assert got_grpo["trainer.n_gpus_per_node"] == 2

    assert got_ppo == {"algorithm.adv_estimator": "gae", "critic.optim.lr": pytest.approx(2e-5)}

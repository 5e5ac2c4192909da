"""Unit: verl command lines built by `verlyard_agent.trainer` (SFT CPU/GPU, LoRA, overrides, resume, RL)."""

from __future__ import annotations

from pathlib import PurePath
from typing import Any

import pytest

from verlyard_agent.trainer import (
    Facts,
    TrainConfigError,
    bare_key,
    build_evaluate_argv,
    build_export_argv,
    build_train_plan,
    merger_source,
    render_value,
    step_of_checkpoint,
    steps_per_epoch,
)

PY = "/opt/trainer/bin/python"
LAUNCHER = "/agent/launchers/verl_cpu_sft.py"
PREP = {"prep": {"train_files": ["/d/train.parquet"], "val_files": ["/d/val.parquet"], "train_rows": 224}}


def facts(**kw: Any) -> Facts:
    base: dict[str, Any] = {
        "trainer_python": PY,
        "work_dir": PurePath("/data/p1/train/attempts/a1"),
        "stage_dir": PurePath("/data/p1/train"),
        "inputs": PREP,
        "needs": ("prep",),
        "cpu_launcher": LAUNCHER,
        "project": "demo",
        "experiment": "train-1",
    }
    base.update(kw)
    return Facts(**base)


def as_dict(overrides: tuple[str, ...]) -> dict[str, str]:
    return dict(token.split("=", 1) for token in overrides)


def test_sft_on_a_cpu_host_runs_through_the_cpu_launcher() -> None:
    plan = build_train_plan({"model": "/m/tiny", "batch_size": 16, "lr": 1e-3, "save_every": 5}, facts())

    assert plan.mode == "cpu" and plan.nproc == 1
    assert plan.argv[:7] == (
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=1",
        LAUNCHER,
    )
    assert plan.argv[7:] == plan.overrides
    ov = as_dict(plan.overrides)
    assert ov["model.path"] == "'/m/tiny'"
    assert ov["data.train_files"] == "['/d/train.parquet']"
    assert ov["data.val_files"] == "['/d/val.parquet']"
    assert ov["data.train_batch_size"] == "16"
    assert ov["data.micro_batch_size_per_gpu"] == "4"
    assert ov["optim.lr"] == "0.001"
    assert ov["trainer.total_epochs"] == "1"
    assert ov["trainer.save_freq"] == "5"
    assert ov["trainer.default_local_dir"] == "'/data/p1/train/checkpoints'"
    assert ov["trainer.logger"] == "['console','file']"
    assert ov["trainer.resume_mode"] == "'auto'"
    assert "trainer.resume_from_path" not in ov
    # The four CPU facts of verl.md.
    assert ov["engine.strategy"] == "'fsdp2'"
    assert ov["+model.override_config.attn_implementation"] == "'sdpa'"
    assert ov["trainer.device"] == "'cpu'"
    assert ov["data.num_workers"] == "0"
    assert plan.env["VERL_PLATFORM"] == "cpu"
    assert plan.env["VERL_FILE_LOGGER_PATH"] == "/data/p1/train/attempts/a1/metrics.jsonl"
    assert plan.env["WANDB_MODE"] == "disabled"
    assert plan.checkpoint_dir == "/data/p1/train/checkpoints"
    assert plan.expected_total_steps == 14  # 224 rows // 16, one epoch
    assert plan.train_files == ("/d/train.parquet",) and plan.val_files == ("/d/val.parquet",)


def test_sft_on_gpus_runs_stock_verl_one_process_per_gpu() -> None:
    plan = build_train_plan({"model": "Qwen/Qwen2.5-0.5B", "batch_size": 32, "epochs": 3}, facts(gpus=(0, 3)))

    assert plan.mode == "gpu" and plan.nproc == 2
    assert plan.argv[:8] == (
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "verl.trainer.sft_trainer",
    )
    ov = as_dict(plan.overrides)
    assert "engine.strategy" not in ov and "+model.override_config.attn_implementation" not in ov
    assert "VERL_PLATFORM" not in plan.env
    assert ov["trainer.n_gpus_per_node"] == "2"
    assert ov["data.micro_batch_size_per_gpu"] == "4"
    assert ov["trainer.save_freq"] == "'after_each_epoch'"
    assert plan.steps_per_epoch == 7  # 224 // 2 ranks = 112 per rank, 16 per rank per step
    assert plan.expected_total_steps == 21


def test_lora_and_the_other_spec_fields_map_to_verl_keys() -> None:
    params = {
        "model": "/m",
        "lora": {"rank": 8, "alpha": 16},
        "max_length": 256,
        "max_steps": 10,
        "save_every": 0,
        "save_hf": True,
        "micro_batch_size": 2,
    }
    ov = as_dict(build_train_plan(params, facts()).overrides)
    assert ov["model.lora_rank"] == "8"
    assert ov["model.lora_alpha"] == "16.0"
    assert ov["data.max_length"] == "256"
    assert ov["trainer.total_training_steps"] == "10"
    assert ov["trainer.save_freq"] == "-1"  # 0: only the final checkpoint
    assert ov["checkpoint.save_contents"] == "['model','optimizer','extra','hf_model']"
    assert ov["data.micro_batch_size_per_gpu"] == "2"


def test_user_overrides_pass_through_and_replace_the_same_key() -> None:
    params = {
        "model": "/m",
        "overrides": {
            "trainer.total_training_steps": 10,
            "data.micro_batch_size_per_gpu": 1,
            "+model.override_config.attn_implementation": "eager",
            "trainer.logger": ["console", "tensorboard"],
            "optim.lr": "1e-5",
            "trainer.project_name": "a,b",
        },
    }
    plan = build_train_plan(params, facts())
    ov = as_dict(plan.overrides)
    assert ov["trainer.total_training_steps"] == "10"
    assert ov["data.micro_batch_size_per_gpu"] == "1"
    assert ov["+model.override_config.attn_implementation"] == "'eager'"
    assert ov["trainer.logger"] == "['console','tensorboard','file']"  # the agent tails the file logger
    assert ov["optim.lr"] == "1e-5"  # a number stays a number, as on verl's command line
    assert ov["trainer.project_name"] == "'a,b'"  # quoted: never a Hydra sweep
    keys = [t.split("=", 1)[0] for t in plan.overrides]
    assert len({bare_key(k) for k in keys}) == len(keys), "one token per config path"
    assert plan.expected_total_steps == 10


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        (None, "null"),
        (True, "true"),
        (3, "3"),
        (0.5, "0.5"),
        (1e-05, "1e-05"),
        ("plain", "'plain'"),
        ("null", "'null'"),
        ("[1,2]", "'[1,2]'"),
        ("it's", "'it\\'s'"),
        ("C:\\dir\\", "'C:\\dir\\\\'"),
        ("${oc.env:SECRET}", "'\\${oc.env:SECRET}'"),
        ("a\\${x}", "'a\\\\\\${x}'"),
        ([1, "x", [True]], "[1,'x',[true]]"),
        ({"a": 1, "b": "c"}, "{a:1,b:'c'}"),
    ],
)
def test_values_are_rendered_for_hydra_safely(value: object, rendered: str) -> None:
    assert render_value(value) == rendered


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"trainer.default_local_dir": "/x"}, "verlyard manages"),
        ({"trainer.resume_mode": "disable"}, "verlyard manages"),
        ({"bad key=1": 1}, "not a valid override key"),
        ({"trainer.logger": 3}, "list of logger names"),
    ],
)
def test_bad_overrides_are_refused(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(TrainConfigError, match=message):
        build_train_plan({"model": "/m", "overrides": overrides}, facts())


def test_verls_own_checkpoint_deletion_is_warned_about() -> None:
    plan = build_train_plan({"model": "/m", "overrides": {"trainer.max_ckpt_to_keep": 1}}, facts())
    assert any("#4873" in w for w in plan.warnings)


def test_resume_from_a_recorded_checkpoint_uses_resume_path() -> None:
    path = "/data/p1/train/checkpoints/global_step_5"
    plan = build_train_plan({"model": "/m"}, facts(resume_from_path=path))
    ov = as_dict(plan.overrides)
    assert ov["trainer.resume_mode"] == "'resume_path'"
    assert ov["trainer.resume_from_path"] == f"'{path}'"
    assert plan.resume_mode == "resume_path" and plan.resume_step == 5


def test_resume_from_a_path_without_a_step_is_refused() -> None:
    with pytest.raises(TrainConfigError, match="global_step_N"):
        build_train_plan({"model": "/m"}, facts(resume_from_path="/somewhere/else"))


@pytest.mark.parametrize(
    ("params", "kw", "message"),
    [
        ({}, {}, "with.model is required"),
        ({"model": "/m"}, {"inputs": {}, "needs": ()}, "no training data"),
        ({"model": "/m", "batch_size": 3}, {"gpus": (0, 1)}, "multiple of the 2 processes"),
        ({"model": "/m", "epochs": 0}, {}, "with.epochs must be an integer"),
        ({"model": "/m", "lr": "fast"}, {}, "with.lr must be a positive number"),
        ({"model": "/m", "algorithm": "dpo"}, {}, "not sft, ppo or a verl"),
        ({"model": "/m"}, {"cpu_launcher": None}, "CPU launcher"),
        ({"model": "/m", "batch_size": 256}, {}, "fewer than one batch"),
    ],
)
def test_unusable_params_fail_clearly(params: dict[str, Any], kw: dict[str, Any], message: str) -> None:
    with pytest.raises(TrainConfigError, match=message):
        build_train_plan(params, facts(**kw))


def test_the_row_count_of_the_preprocess_stage_gives_the_expected_total() -> None:
    prep = {"prep": {"train_files": ["/d/t.parquet"], "val_files": [], "rows": {"total": 100, "train": 90, "val": 10}}}
    plan = build_train_plan({"model": "/m", "batch_size": 8, "epochs": 2}, facts(inputs=prep))
    assert plan.expected_total_steps == 22  # 90 // 8 = 11 a epoch
    assert plan.val_files == () and "data.val_files" not in as_dict(plan.overrides)


def test_files_verl_cannot_read_are_refused() -> None:
    prep = {"prep": {"train_files": ["/d/train.jsonl"], "val_files": []}}
    with pytest.raises(TrainConfigError, match="parquet files only"):
        build_train_plan({"model": "/m"}, facts(inputs=prep))


def test_explicit_files_win_over_the_dependency() -> None:
    plan = build_train_plan({"model": "/m", "train_files": "/x/t.parquet"}, facts())
    assert plan.train_files == ("/x/t.parquet",)
    assert plan.val_files == ("/d/val.parquet",)
    assert plan.expected_total_steps is None  # row count unknown for a file named in the spec


def test_grpo_runs_main_ppo_with_a_private_loopback_ray() -> None:
    plan = build_train_plan(
        {"algorithm": "grpo", "model": "/m", "batch_size": 8, "lr": 1e-6, "lora": {"rank": 16}}, facts(gpus=(0,))
    )
    assert plan.argv[:3] == (PY, "-m", "verl.trainer.main_ppo")
    assert plan.argv[3:] == plan.overrides
    ov = as_dict(plan.overrides)
    assert ov["algorithm.adv_estimator"] == "'grpo'"
    assert ov["actor_rollout_ref.model.path"] == "'/m'"
    assert ov["actor_rollout_ref.actor.optim.lr"] == "1e-06"
    assert ov["actor_rollout_ref.rollout.n"] == "4"
    assert ov["actor_rollout_ref.rollout.name"] == "'vllm'"
    assert ov["actor_rollout_ref.model.lora_rank"] == "16"
    assert ov["actor_rollout_ref.model.lora_alpha"] == "32.0"
    assert ov["data.prompt_key"] == "'prompt'"
    assert ov["trainer.n_gpus_per_node"] == "1"
    assert ov["+ray_kwargs.ray_init.address"] == "'local'"
    assert ov["+ray_kwargs.ray_init._node_ip_address"] == "'127.0.0.1'"
    assert ov["+ray_kwargs.ray_init.include_dashboard"] == "false"
    assert ov["trainer.save_freq"] == "28"  # 224 prompts // 8 per step: a checkpoint each epoch
    assert "critic.model.path" not in ov
    assert plan.env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert plan.final_checkpoint and plan.expected_total_steps == 28


def test_ppo_is_gae_with_a_critic() -> None:
    plan = build_train_plan({"algorithm": "ppo", "model": "/m", "critic_lr": 1e-5}, facts(gpus=(0, 1)))
    ov = as_dict(plan.overrides)
    assert plan.algorithm == "gae"
    assert ov["algorithm.adv_estimator"] == "'gae'"
    assert ov["critic.model.path"] == "'/m'"
    assert ov["critic.optim.lr"] == "1e-05"
    assert ov["actor_rollout_ref.rollout.n"] == "1"


def test_ppo_that_saves_nothing_is_not_expected_to_leave_a_final_checkpoint() -> None:
    plan = build_train_plan(
        {"algorithm": "grpo", "model": "/m", "overrides": {"trainer.save_freq": -1}}, facts(gpus=(0,))
    )
    assert not plan.final_checkpoint


def test_steps_and_checkpoint_paths() -> None:
    assert steps_per_epoch(224, 16) == 14
    assert steps_per_epoch(225, 16, dp=2) == 14  # 112 rows per rank, 8 per rank per step
    assert steps_per_epoch(15, 16) == 0
    assert step_of_checkpoint("/c/global_step_12") == 12
    assert step_of_checkpoint("/c/global_step_12/actor/") == 12
    assert step_of_checkpoint("/c/latest") is None
    assert merger_source("/c/global_step_3", has_actor_subdir=True) == "/c/global_step_3/actor"


def test_export_and_evaluate_commands() -> None:
    assert build_export_argv(PY, "/c/global_step_10", "/p/export/exp") == (
        PY,
        "-m",
        "verl.model_merger",
        "merge",
        "--backend",
        "fsdp",
        "--local_dir",
        "/c/global_step_10",
        "--target_dir",
        "/p/export/exp",
    )
    argv = build_evaluate_argv(PY, "/a/evaluate.py", model_dir="/hf", val_files=["/d/v.parquet"], out_file="/w/e.json")
    assert argv[:2] == (PY, "/a/evaluate.py")
    assert argv[argv.index("--model") + 1] == "/hf"
    assert argv[-2:] == ("--val-files", "/d/v.parquet")
    with pytest.raises(TrainConfigError, match="validation split"):
        build_evaluate_argv(PY, "/a/evaluate.py", model_dir="/hf", val_files=[], out_file="/w/e.json")

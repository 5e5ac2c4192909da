"""Unit: the child's environment and a command stage's argv (no shell, no agent secrets)."""

from __future__ import annotations

import pytest

from verlyard_agent.childenv import ArgvError, child_env, command_argv, command_env

HOST = {
    "PATH": "/usr/bin",
    "HOME": "/home/u",
    "LANG": "C.UTF-8",
    "HF_HOME": "/cache/hf",
    "NCCL_DEBUG": "INFO",
    "CUDA_VISIBLE_DEVICES": "0,1,2,3",
    "VERLYARD_NATS_PASSWORD": "secret",
    "VERLYARD_SECRET_KEY": "k",
    "AWS_SECRET_ACCESS_KEY": "aws",
    "PYTHONPATH": "/agent/venv",
}


def env(extra: dict[str, str] | None = None, gpus: tuple[int, ...] = (1, 3)) -> dict[str, str]:
    return child_env(HOST, extra, gpus=gpus, pipeline_id="p", stage="s", attempt="a", work_dir="/w")


def test_only_allow_listed_host_variables_reach_the_child():
    got = env()
    assert got["PATH"] == "/usr/bin" and got["HF_HOME"] == "/cache/hf" and got["NCCL_DEBUG"] == "INFO"
    for hidden in ("VERLYARD_NATS_PASSWORD", "VERLYARD_SECRET_KEY", "AWS_SECRET_ACCESS_KEY", "PYTHONPATH"):
        assert hidden not in got


def test_the_attempt_identity_and_its_gpus_are_set_last():
    got = env({"CUDA_VISIBLE_DEVICES": "7", "X": "1"})
    assert got["CUDA_VISIBLE_DEVICES"] == "1,3" and got["X"] == "1"
    assert (got["VERLYARD_ATTEMPT"], got["VERLYARD_STAGE"], got["VERLYARD_WORK_DIR"]) == ("a", "s", "/w")
    assert env(gpus=())["CUDA_VISIBLE_DEVICES"] == ""
    assert got["PYTHONUNBUFFERED"] == "1"


def test_command_argv_is_a_list_of_strings():
    assert command_argv({"run": ["python", "train.py", "--lr", "1e-5"]}) == ["python", "train.py", "--lr", "1e-5"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "required"),
        ({"run": "python train.py"}, "there is no shell"),
        ({"run": []}, "non-empty"),
        ({"run": ["python", 3]}, r"run\[1\]` must be a string"),
        ({"run": ["  "]}, "must not be empty"),
        ({"run": ["a\x00b"]}, "NUL"),
    ],
)
def test_bad_argv_is_refused_with_a_clear_message(params: dict[str, object], message: str):
    with pytest.raises(ArgvError, match=message):
        command_argv(params)


def test_command_env():
    assert command_env({"env": {"A": "1", "B": 2}}) == {"A": "1", "B": "2"}
    assert command_env({}) == {}
    for bad in ({"VERLYARD_ATTEMPT": "x"}, {"CUDA_VISIBLE_DEVICES": "0"}, {"A=B": "1"}, {"A": {"x": 1}}):
        with pytest.raises(ArgvError):
            command_env({"env": bad})

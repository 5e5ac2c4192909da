"""Unit: failure classification over recorded log snippets; the earliest cause wins."""

from __future__ import annotations

import pytest

from verlyard_agent.failures import classify, find_cause, signal_of

CUDA_OOM = """\
step:3 - train/loss:5.75 - train/grad_norm:2.7
Traceback (most recent call last):
  File "/opt/trainer/lib/python3.12/site-packages/verl/trainer/sft_trainer.py", line 412, in fit
    loss = self.training_step(batch)
           ^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/opt/trainer/lib/python3.12/site-packages/torch/nn/modules/module.py", line 1775, in _call_impl
    return forward_call(*args, **kwargs)
torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.11 GiB
E1128 10:00:01 torch/distributed/elastic/multiprocessing/api.py:882] failed (exitcode: 1) local_rank: 0
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
"""

OOM_THEN_NCCL = """\
[rank1]: Traceback (most recent call last):
[rank0]: step 12 waiting
[rank1]:   File "train.py", line 10, in <module>
[rank1]:     out = model(x)
[rank1]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 MiB
[rank0]:[E1128 10:05:00 ProcessGroupNCCL.cpp:632] [Rank 0] Watchdog caught collective operation timeout: \
WorkNCCL(SeqNum=9, OpType=ALLREDUCE) ran for 600000 milliseconds before timing out.
[rank0]: torch.distributed.DistBackendError: NCCL communicator was aborted on rank 0.
"""

NCCL_TIMEOUT = """\
step:40 - train/loss:1.2
[rank0]:[E1128 11:00:00 ProcessGroupNCCL.cpp:632] [Rank 0] Watchdog caught collective operation timeout: \
WorkNCCL(SeqNum=77, OpType=ALLGATHER, Timeout(ms)=600000) ran for 600032 milliseconds before timing out.
"""

RAY_HIDES_OOM = """\
(raylet) A worker died or was killed while executing a task by an unexpected system error.
(raylet) Task was killed due to the node running low on memory. Memory on the node was 61.2GB / 62.0GB
Traceback (most recent call last):
  File "main_ppo.py", line 40, in main
ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.
"""

ILLEGAL_ACCESS = """\
Traceback (most recent call last):
  File "kernel.py", line 3, in <module>
RuntimeError: CUDA error: an illegal memory access was encountered
CUDA kernel errors might be asynchronously reported at some other API call
"""

HYDRA = """\
Could not override 'trainer.totl_epochs'.
To append to your config use +trainer.totl_epochs=1
Key 'totl_epochs' is not in struct
    full_key: trainer.totl_epochs
Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.
"""

USER_CODE = """\
loading data
Traceback (most recent call last):
  File "/work/script.py", line 7, in <module>
    main()
  File "/work/script.py", line 5, in main
    raise ValueError("column 'text' missing")
ValueError: column 'text' missing
"""


def lines(text: str) -> list[str]:
    return text.splitlines()


def test_a_cuda_oom_in_a_traceback_is_oom_even_with_a_generic_launcher_error_after_it():
    d = classify(1, lines(CUDA_OOM))
    assert d.failure_class == "oom"
    assert "CUDA out of memory" in d.reason
    assert d.line == 7


def test_an_oom_on_one_rank_wins_over_the_nccl_timeout_it_caused_on_another():
    d = classify(1, lines(OOM_THEN_NCCL))
    assert d.failure_class == "oom"
    assert d.reason.startswith("out of memory: torch.OutOfMemoryError")


def test_an_nccl_watchdog_timeout_is_nccl():
    assert classify(1, lines(NCCL_TIMEOUT)).failure_class == "nccl"


def test_rays_actor_died_error_does_not_hide_the_oom_before_it():
    d = classify(1, lines(RAY_HIDES_OOM))
    assert d.failure_class == "oom" and "running low on memory" in d.reason


def test_illegal_memory_access_is_cuda():
    assert classify(1, lines(ILLEGAL_ACCESS)).failure_class == "cuda"


def test_hydra_config_errors_are_user_errors():
    d = classify(1, lines(HYDRA))
    assert d.failure_class == "user" and "configuration error" in d.reason and "totl_epochs" in d.reason


def test_a_plain_traceback_is_a_user_error_named_by_its_exception_line():
    d = classify(1, lines(USER_CODE), first_line=100)
    assert (d.failure_class, d.reason, d.line) == ("user", "ValueError: column 'text' missing", 106)


@pytest.mark.parametrize(
    ("exit_code", "expected"),
    [(137, "oom"), (-9, "oom"), (143, "preempted"), (-15, "preempted"), (135, "infra"), (139, "unknown")],
)
def test_without_a_log_signature_the_signal_decides(exit_code: int, expected: str):
    assert classify(exit_code, ["doing work", "still working"]).failure_class == expected


def test_a_shells_killed_line_is_an_oom():
    assert classify(137, ["epoch 1", "Killed"]).failure_class == "oom"


def test_a_plain_nonzero_exit_is_a_user_error_quoting_the_last_line():
    d = classify(2, ["usage: tool [-h]", "tool: error: bad flag", ""])
    assert (d.failure_class, d.reason) == ("user", "exit code 2: tool: error: bad flag")


def test_host_problems_are_infra():
    assert classify(1, ["OSError: [Errno 28] No space left on device"]).failure_class == "infra"


def test_the_agents_own_stop_decides_except_that_a_hang_after_an_error_is_that_error():
    assert classify(143, lines(CUDA_OOM), stop="cancelled", stop_detail="by user").failure_class == "cancelled"
    assert classify(143, [], stop="timeout").failure_class == "timeout"
    assert classify(143, [], stop="agent_stop").failure_class == "preempted"
    assert classify(137, ["step:4"], stop="hang", stop_detail="no step for 600 s").reason == "no step for 600 s"
    hung_after_nccl = classify(137, lines(NCCL_TIMEOUT), stop="hang", stop_detail="no step for 600 s")
    assert hung_after_nccl.failure_class == "nccl" and "(then: no step for 600 s)" in hung_after_nccl.reason


def test_a_traceback_cut_off_by_the_end_of_the_log_does_not_decide():
    assert find_cause(["Traceback (most recent call last):", '  File "x.py", line 1']) is None


def test_signal_of_understands_both_conventions():
    assert (signal_of(-9), signal_of(137), signal_of(1), signal_of(None)) == (9, 9, None, None)

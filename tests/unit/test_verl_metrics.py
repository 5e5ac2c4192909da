"""Unit: parsing recorded verl output (file logger, console), the resume guard, checkpoint completeness."""

from __future__ import annotations

from pathlib import Path

import pytest

from verlyard_agent.checkpoints import has_hf_weights, is_complete, parse_tracker, steps_on_disk
from verlyard_agent.metrics import LineBuffer, StepLedger, parse_console_line, parse_record

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "verl"


def recorded_records() -> list[tuple[int, dict[str, float]]]:
    out: list[tuple[int, dict[str, float]]] = []
    for line in (FIXTURES / "sft_cpu_metrics.jsonl").read_bytes().splitlines():
        record = parse_record(line)
        assert record is not None, line
        out.append((record.step, record.values))
    return out


def test_the_recorded_file_logger_output_parses_into_steps() -> None:
    records = recorded_records()
    train = [(step, v) for step, v in records if "train/loss" in v]
    val = [(step, v) for step, v in records if "val/loss" in v]
    assert [step for step, _ in train] == list(range(1, 11))
    assert val == [(10, {"val/loss": pytest.approx(4.46875)})]
    assert train[0][1]["train/loss"] == pytest.approx(5.96875)
    assert train[-1][1]["train/loss"] < train[0][1]["train/loss"]
    assert {"train/lr", "train/grad_norm", "train/global_tokens", "perf/cpu_memory_used_gb"} <= set(train[0][1])


def test_console_lines_agree_with_the_file_logger() -> None:
    by_file = {step: v for step, v in recorded_records() if "train/loss" in v}
    text = (FIXTURES / "sft_cpu_console.log").read_text()
    by_console = {}
    for line in text.replace("\r", "\n").splitlines():
        record = parse_console_line(line)
        if record is not None and "train/loss" in record.values:
            by_console[record.step] = record.values
    assert sorted(by_console) == list(range(1, 11))
    for step, values in by_console.items():
        assert values["train/loss"] == pytest.approx(by_file[step]["train/loss"])
        assert values["train/total_tokens(B)"] == pytest.approx(by_file[step]["train/total_tokens(B)"])


def test_a_console_line_shared_with_tqdm_is_found_mid_line() -> None:
    line = "Epoch 1/4:   7%|▋  | 1/14 [00:02<00:34,  2.67s/it]step:2 - train/loss:5.6875 - train/lr:0.001"
    record = parse_console_line(line)
    assert record is not None
    assert record.step == 2 and record.values == {"train/loss": 5.6875, "train/lr": 0.001}
    assert parse_console_line("step:10 - val/loss:4.46875") is not None
    assert parse_console_line("Saving checkpoint to: /x/global_step_5") is None


def test_non_records_and_non_finite_values() -> None:
    assert parse_record(b"") is None
    assert parse_record(b'{"step": 1, "da') is None
    assert parse_record(b"[1, 2]") is None
    assert parse_record(b'{"step": true, "data": {}}') is None
    record = parse_record(b'{"step": 3, "data": {"train/loss": NaN, "train/lr": 0.1, "note": "x", "z": null}}')
    assert record is not None
    assert record.values == {"train/lr": 0.1}
    assert record.dropped == ("train/loss", "z")


def test_line_buffer_keeps_a_torn_line_until_its_newline() -> None:
    buf = LineBuffer()
    assert buf.feed(b'{"step": 1}\n{"st') == [b'{"step": 1}']
    assert buf.feed(b'ep": 2}\n\n') == [b'{"step": 2}']
    assert buf.feed(b'{"step": 3}') == []
    assert buf.flush() == [b'{"step": 3}']
    assert buf.flush() == []


# ---- the resume guard -----------------------------------------------------------------------------


def ledger_after(steps: list[int], *, resume: int = 0, total: int | None = None) -> StepLedger:
    ledger = StepLedger(resume_step=resume, expected_total=total)
    for step in steps:
        ledger.observe(step)
    return ledger


def test_a_fresh_run_that_reaches_its_total_passes() -> None:
    ledger = ledger_after([*range(1, 11), 10], total=10)
    assert ledger.steps == 10 and ledger.first_step == 1 and ledger.last_step == 10
    assert ledger.verdict(final_checkpoint_step=10) is None


def test_a_resume_that_continues_at_n_plus_one_passes() -> None:
    ledger = ledger_after(list(range(6, 11)), resume=5, total=10)
    assert ledger.verdict(final_checkpoint_step=10) is None


def test_validation_logged_at_the_resume_step_is_not_a_mis_resume() -> None:
    ledger = ledger_after([5, 6, 7], resume=5, total=7)  # main_ppo's val_before_train logs at step 5
    assert ledger.first_step == 6
    assert ledger.verdict(final_checkpoint_step=7) is None


def test_a_resume_that_restarts_from_scratch_is_mis_resumed() -> None:
    ledger = ledger_after(list(range(1, 11)), resume=5, total=10)
    reason = ledger.verdict(final_checkpoint_step=10)
    assert reason is not None and reason.startswith("mis-resumed") and "expected 6" in reason


def test_a_resume_that_skips_ahead_is_mis_resumed() -> None:
    ledger = ledger_after(list(range(15, 21)), resume=5, total=20)
    assert (ledger.mis_resumed() or "").startswith("mis-resumed")


def test_a_run_that_stops_short_of_its_total_is_under_trained() -> None:
    # verl #7401: the resume skipped an epoch; verl exited 0 at step 14 of 28.
    ledger = ledger_after(list(range(8, 15)), resume=7, total=28)
    reason = ledger.verdict(final_checkpoint_step=14)
    assert reason is not None and reason.startswith("under-trained") and "step 28" in reason


def test_without_a_known_total_a_missing_final_checkpoint_means_under_trained() -> None:
    ledger = ledger_after(list(range(1, 9)))
    reason = ledger.verdict(final_checkpoint_step=5)
    assert reason is not None and "final checkpoint" in reason
    assert ledger.verdict(final_checkpoint_step=8) is None
    assert ledger.verdict(final_checkpoint_step=5, expect_final_checkpoint=False) is None


def test_a_clean_exit_without_any_step_is_under_trained() -> None:
    assert (ledger_after([]).verdict(final_checkpoint_step=None) or "").startswith("under-trained")


# ---- checkpoint folders ---------------------------------------------------------------------------


def recorded_checkpoint_files() -> dict[str, set[str]]:
    folders: dict[str, set[str]] = {}
    for rel in (FIXTURES / "sft_cpu_checkpoint_files.txt").read_text().split():
        parts = rel.removeprefix("./").split("/")
        if len(parts) == 2:
            folders.setdefault(parts[0], set()).add(parts[1])
        elif len(parts) == 3:
            folders.setdefault(f"{parts[0]}/{parts[1]}", set()).add(parts[2])
    return folders


def test_the_recorded_checkpoints_are_complete() -> None:
    folders = recorded_checkpoint_files()
    assert steps_on_disk(["global_step_10", "global_step_5", "latest_checkpointed_iteration.txt"]) == [5, 10]
    assert is_complete(folders["global_step_5"]) and is_complete(folders["global_step_10"])
    assert has_hf_weights(folders["global_step_10/huggingface"])
    assert not has_hf_weights(folders["global_step_10/huggingface"] - {"model.safetensors"})


def test_a_checkpoint_is_incomplete_until_every_rank_and_the_dataloader_state_are_there() -> None:
    two_ranks = {
        "model_world_size_2_rank_0.pt",
        "model_world_size_2_rank_1.pt",
        "optim_world_size_2_rank_0.pt",
        "optim_world_size_2_rank_1.pt",
        "data_0.pt",
    }
    assert is_complete(two_ranks)
    assert not is_complete(two_ranks - {"model_world_size_2_rank_1.pt"})
    assert not is_complete(two_ranks - {"data_0.pt"})
    assert not is_complete(set())
    assert is_complete({"model_world_size_1_rank_0.pt"}, has_actor_subdir=True)  # RL: actor/ has no data_0.pt


@pytest.mark.parametrize(("text", "step"), [("10", 10), (b"7\n", 7), ("", None), ("1x", None)])
def test_tracker_file(text: str | bytes, step: int | None) -> None:
    assert parse_tracker(text) == step

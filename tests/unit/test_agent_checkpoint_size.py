"""Unit: a checkpoint's reported size is the total of its folder's files."""

from __future__ import annotations

from pathlib import Path

from verlyard_agent.runner import folder_size


def test_folder_size_sums_nested_files(tmp_path: Path) -> None:
    step = tmp_path / "global_step_5"
    (step / "huggingface").mkdir(parents=True)
    (step / "model_world_size_1_rank_0.pt").write_bytes(b"x" * 1000)
    (step / "huggingface" / "config.json").write_bytes(b"{}")
    assert folder_size(str(step)) == 1002


def test_folder_size_of_a_missing_path_is_unknown(tmp_path: Path) -> None:
    assert folder_size(str(tmp_path / "nope")) is None

"""Unit: the checkpoint retention plan (never the newest complete checkpoint; verl #4873)."""

from __future__ import annotations

import pytest

from verlyard_agent.retention import parse_latest, plan_retention, step_of


def test_keeps_the_last_n_complete_and_deletes_older_ones():
    plan = plan_retention([10, 20, 30, 40], 40, keep_last=2)
    assert plan.delete == (10, 20) and plan.keep == (30, 40) and plan.newest_complete == 40


def test_never_deletes_the_newest_complete_checkpoint_even_with_keep_last_zero():
    plan = plan_retention([10, 20, 30], 30, keep_last=0)
    assert plan.delete == (10, 20) and plan.keep == (30,)
    assert plan.why_kept[30] == "newest complete checkpoint"


def test_folders_newer_than_the_latest_file_are_in_progress_and_untouched():
    plan = plan_retention([10, 20, 30], 20, keep_last=0)
    assert plan.delete == (10,) and plan.incomplete == (30,) and plan.keep == (20, 30)


def test_pinned_steps_are_kept():
    plan = plan_retention([10, 20, 30, 40], 40, keep_last=1, pinned=[10])
    assert plan.delete == (20, 30) and plan.why_kept[10] == "pinned"


def test_without_a_latest_file_nothing_is_deleted():
    plan = plan_retention([10, 20], None, keep_last=0)
    assert plan.delete == () and plan.newest_complete is None


def test_a_latest_step_whose_folder_is_gone_leaves_the_newest_older_one_as_newest_complete():
    plan = plan_retention([10, 20], 30, keep_last=0)
    assert plan.delete == (10,) and plan.newest_complete == 20


def test_names_and_latest_file_parsing():
    assert (step_of("global_step_12"), step_of("global_step_x"), step_of("global_step_1.bak")) == (12, None, None)
    assert (parse_latest("10\n"), parse_latest(""), parse_latest("ten")) == (10, None, None)
    with pytest.raises(ValueError, match="keep_last"):
        plan_retention([1], 1, keep_last=-1)

"""Pure core: facts about verl checkpoint folders (tracker file, completeness), from names the caller listed.

Layout (verl 0.9.1):
    <default_local_dir>/latest_checkpointed_iteration.txt      "10", renamed into place by rank 0
    <default_local_dir>/global_step_10/{model,optim,extra_state}_world_size_W_rank_R.pt  data_R.pt ...
    <default_local_dir>/global_step_10/huggingface/             config, tokenizer (+ weights with hf_model)
    <default_local_dir>/global_step_10/actor/ ...               (main_ppo: the policy, and critic/)
Rank 0 updates the tracker after its own files, but other ranks may still be writing theirs, so a
checkpoint is reported only once the tracker names it *and* every rank's model shard is there.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Final

_SHARD: Final = re.compile(r"model_world_size_(\d+)_rank_(\d+)\.pt")
_STEP_DIR: Final = re.compile(r"global_step_(\d+)")
WEIGHT_SUFFIXES: Final = (".safetensors", ".bin")


def parse_tracker(text: str | bytes) -> int | None:
    """The step in `latest_checkpointed_iteration.txt`; None while it is empty or torn."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    text = text.strip()
    return int(text) if text.isdigit() else None


def step_dir_name(step: int) -> str:
    return f"global_step_{step}"


def steps_on_disk(names: Iterable[str]) -> list[int]:
    """Steps of the `global_step_N` folders among `names`, ascending."""
    return sorted(int(m.group(1)) for n in names if (m := _STEP_DIR.fullmatch(n)))


def is_complete(files: Collection[str], *, has_actor_subdir: bool = False) -> bool:
    """Whether a `global_step_N` folder holds a whole checkpoint.

    `files` are the names in the folder (SFT) or in its `actor/` subfolder (RL, `has_actor_subdir`).
    Every rank's model shard must be present, and the dataloader state of rank 0 for SFT (verl
    writes it after the model, optimizer and extra state).
    """
    shards = [(int(m.group(1)), int(m.group(2))) for f in files if (m := _SHARD.fullmatch(f))]
    if not shards:
        return False
    world = shards[0][0]
    if any(w != world for w, _ in shards) or {r for _, r in shards} != set(range(world)):
        return False
    return has_actor_subdir or "data_0.pt" in files


def has_hf_weights(files: Collection[str]) -> bool:
    """Whether a `huggingface/` folder holds weights (verl writes them only with save_contents hf_model)."""
    return "config.json" in files and any(f.endswith(WEIGHT_SUFFIXES) for f in files)

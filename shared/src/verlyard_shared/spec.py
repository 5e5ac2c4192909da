"""Contracts: the pipeline spec as it travels on the wire (validation lives in `validation.py`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, Literal

import msgspec

StageKind = Literal["noop", "preprocess", "train", "evaluate", "export", "cleanup", "command"]
STAGE_KINDS: tuple[str, ...] = ("noop", "preprocess", "train", "evaluate", "export", "cleanup", "command")
When = Literal["on_success", "on_failure", "always"]
WITH_EXTENSION_PREFIX: Final = "x-"
"""`with:` keys starting with it are the user's own (annotations, test hooks such as the soak's
`x-soak-poison`): never checked, never read by a verlyard stage kind (as `x-` fields in Compose files)."""
COMMON_WITH_KEYS: Final = frozenset({"watchdog"})
"""`with:` keys of every kind, read by the agent's runner: `watchdog: false` or `{floor_s, factor}`."""
WITH_KEYS: Final[Mapping[str, frozenset[str]]] = {
    kind: frozenset(keys) | COMMON_WITH_KEYS
    for kind, keys in {
        "noop": ("sleep_ms", "steps", "step_ms", "checkpoint_every", "fail", "exit_code", "failure_class", "reason"),
        "preprocess": ("dataset", "format", "val_fraction", "seed", "max_dropped_fraction", "tokenizer", "max_length"),
        "train": (
            "algorithm",
            "model",
            "epochs",
            "max_steps",
            "batch_size",
            "micro_batch_size",
            "lr",
            "lora",
            "save_every",
            "max_length",
            "save_hf",
            "train_files",
            "val_files",
            "nproc_per_node",
            "overrides",
            # RL only
            "rollout",
            "rollout_n",
            "rollout_tp",
            "mini_batch_size",
            "max_prompt_length",
            "max_response_length",
            "prompt_key",
            "critic_lr",
            "reward_function",
        ),
        "evaluate": (
            "model",
            "checkpoint",
            "val_files",
            "max_length",
            "batch_size",
            "max_samples",
            "generate",
            "max_new_tokens",
        ),
        "export": ("checkpoint",),
        "cleanup": ("keep_last", "pinned", "stage", "dry_run"),
        "command": ("run", "env"),
    }.items()
}
"""The `with:` keys each stage kind reads: the one list the API's validation (which rejects any other
key but `x-` ones), the agent's stage kinds and tests/unit/test_examples.py (which checks the agent's
sources read exactly these) share."""
FailureClass = Literal[
    "infra",
    "preempted",
    "hang",
    "lost",
    "oom",
    "nccl",
    "cuda",
    "user",
    "timeout",
    "poison",
    "cancelled",
    "unknown",
    "resume",
]


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """How a failed attempt is retried. Durations are seconds once validated."""

    max_attempts: int = 1
    backoff: Literal["fixed", "exponential"] = "exponential"
    initial_delay_s: float = 10.0
    max_delay_s: float = 600.0
    jitter: Literal["none", "full"] = "full"
    retry_on: tuple[str, ...] = ("infra", "preempted", "hang", "lost")


class Resources(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a stage needs from an agent: GPUs (with a per-GPU memory floor), CPU slots, labels."""

    gpus: int = 0
    gpu_memory_gb: float = 0.0
    cpu_slots: int = 1
    labels: dict[str, str] = {}


class StageSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One stage after defaults are applied."""

    kind: StageKind
    needs: tuple[str, ...] = ()
    when: When = "on_success"
    retry: RetryPolicy = RetryPolicy()
    timeout_s: float | None = None
    resources: Resources = Resources()
    priority: int = 0
    params: dict[str, Any] = {}
    """The stage's `with:` block, kind-specific."""


class PipelineSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A validated, normalised pipeline: what `pipeline.submitted` records."""

    name: str
    labels: dict[str, str] = {}
    priority: int = 0
    stages: dict[str, StageSpec]

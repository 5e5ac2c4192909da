"""Contracts: the pipeline spec as it travels on the wire (validation lives in `validation.py`)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

StageKind = Literal["noop", "preprocess", "train", "evaluate", "export", "cleanup", "command"]
STAGE_KINDS: tuple[str, ...] = ("noop", "preprocess", "train", "evaluate", "export", "cleanup", "command")
When = Literal["on_success", "on_failure", "always"]
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

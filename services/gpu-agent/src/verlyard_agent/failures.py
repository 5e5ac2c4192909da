"""Pure core: classify a failed attempt from how it stopped, its exit code and its log (earliest cause wins).

Classes are those of `verlyard_shared.spec.FailureClass`: oom, nccl, cuda, user (user code and config
errors), hang, timeout, preempted, lost, infra, cancelled, unknown. The retry policy decides by class
(`retry_on`), so the class must name the root cause: an OOM on rank 1 that makes rank 0 time out in
NCCL, or a Ray `ActorDiedError` that hides an OOM, is an `oom` (users.md, pain 8). Hence: scan the log
in order, take the FIRST line that carries a known cause; a Python traceback counts at its header's
position and is classified by its exception line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

StopReason = Literal["cancelled", "hang", "timeout", "agent_stop"]
"""Why the agent itself stopped an attempt (None: it ended on its own)."""

_MAX_REASON = 400


@dataclass(frozen=True, kw_only=True)
class Diagnosis:
    failure_class: str
    reason: str
    line: int | None = None
    """Line number in attempt.log (from 0) of the line that decided, when a log line did."""


@dataclass(frozen=True)
class _Signature:
    failure_class: str
    pattern: re.Pattern[str]
    label: str


def _sig(failure_class: str, label: str, *patterns: str) -> _Signature:
    return _Signature(failure_class, re.compile("|".join(f"(?:{p})" for p in patterns)), label)


# Order matters within ONE line: an NCCL or CUDA line that says "out of memory" is an OOM.
_SIGNATURES: tuple[_Signature, ...] = (
    _sig(
        "oom",
        "out of memory",
        r"CUDA out of memory",
        r"OutOfMemoryError",
        r"CUDA error: out of memory",
        r"CUBLAS_STATUS_ALLOC_FAILED",
        r"\bHIP out of memory",
        r"\bMemoryError\b",
        r"std::bad_alloc",
        r"Cannot allocate memory",
        r"[Oo]ut of memory: Killed process",
        r"oom[-_]kill",
        r"running low on memory",  # Ray's memory monitor killing a worker
        r"^\s*Killed\s*$",  # what a shell prints when the kernel's OOM killer took its child
        r"\bNCCL\b.*\bout of memory\b",
    ),
    _sig(
        "nccl",
        "NCCL",
        r"\bnccl(?:InternalError|SystemError|UnhandledCudaError|RemoteError|InvalidUsage|InvalidArgument)\b",
        r"\bNCCL error\b",
        r"\bNCCL communicator was aborted",
        r"Watchdog caught collective operation timeout",
        r"ProcessGroupNCCL.*(?:[Tt]imeout|timed out)",
        r"\bDistBackendError\b",
        r"NCCL (?:WARN|ERROR).*(?:[Tt]imeout|timed out|[Ff]ailed|[Ee]rror)",
    ),
    _sig(
        "cuda",
        "CUDA error",
        r"CUDA error\b",
        r"illegal memory access",
        r"device-side assert triggered",
        r"CUBLAS_STATUS_\w+",
        r"CUDNN_STATUS_\w+",
        r"cudaError\w+",
        r"unspecified launch failure",
        r"\bXid\b.*\bGPU\b",
        r"GPU has fallen off the bus",
        r"uncorrectable ECC error",
    ),
    _sig(
        "infra",
        "host problem",
        r"No space left on device",
        r"No CUDA GPUs are available",
        r"CUDA driver version is insufficient",
        r"NVIDIA-SMI has failed",
        r"Found no NVIDIA driver",
        r"Address already in use",
        r"Too many open files",
        r"Bus error",
        r"[Ss]tale file handle",
        r"Read-only file system",
    ),
    _sig(
        "user",
        "configuration error",
        r"Could not override '",
        r"Key '[^']*' is not in struct",
        r"\bConfig(?:Attribute|Key|Type|Value)Error\b",
        r"\bConfigCompositionException\b",
        r"\bMissingMandatoryValue\b",
        r"Error merging override",
        r"\bomegaconf\.errors\.",
        r"hydra\.errors\.",
        r"unrecognized arguments:",
    ),
    _sig(
        "preempted",
        "terminated from outside",
        r"[Ss]ignal(?:Exception)?.*got signal: (?:15|SIGTERM)",
        r"Received SIGTERM",
        r"received signal SIGTERM",
    ),
)

_TRACEBACK = re.compile(r"Traceback \(most recent call last\):")
_TRACEBACK_SCAN = 400
"""How many lines after a traceback header its exception line may be (interleaved ranks)."""


def _trim(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 1] + "…"


def _match(line: str) -> _Signature | None:
    for signature in _SIGNATURES:
        if signature.pattern.search(line):
            return signature
    return None


def _exception_of(lines: Sequence[str], header: int) -> tuple[int, str] | None:
    """The exception line that ends the traceback starting at `header` (None if the log ends first).

    Launchers prefix every line of a rank (`[rank0]: `, `(TaskRunner pid=12) `): only lines with
    the header's prefix belong to this traceback, so interleaved output of other ranks is skipped.
    """
    start = _TRACEBACK.search(lines[header])
    assert start is not None
    prefix = lines[header][: start.start()]
    for i in range(header + 1, min(len(lines), header + 1 + _TRACEBACK_SCAN)):
        line = lines[i]
        if prefix and not line.startswith(prefix):
            continue
        body = line[len(prefix) :]
        if not body.strip() or body[0] in " \t" or body.lstrip().startswith(("^", "~")):
            continue  # frames, source lines, carets
        if _TRACEBACK.search(body):
            return None  # a new traceback began without an exception line
        return i, body
    return None


def find_cause(lines: Sequence[str], *, first_line: int = 0) -> Diagnosis | None:
    """The earliest recognised cause in `lines` (a log, or its tail starting at line `first_line`)."""
    for i, line in enumerate(lines):
        if _TRACEBACK.search(line):
            found = _exception_of(lines, i)
            if found is None:
                continue
            at, exception = found
            signature = _match(exception)
            if signature is None:
                return Diagnosis(failure_class="user", reason=_trim(exception), line=first_line + at)
            return Diagnosis(
                failure_class=signature.failure_class,
                reason=_trim(f"{signature.label}: {exception.strip()}"),
                line=first_line + at,
            )
        signature = _match(line)
        if signature is not None:
            return Diagnosis(
                failure_class=signature.failure_class,
                reason=_trim(f"{signature.label}: {line.strip()}"),
                line=first_line + i,
            )
    return None


_SIGNAL_NAMES = {1: "SIGHUP", 2: "SIGINT", 6: "SIGABRT", 7: "SIGBUS", 9: "SIGKILL", 11: "SIGSEGV", 15: "SIGTERM"}


def signal_of(exit_code: int | None) -> int | None:
    """The signal that ended a process: Python's negative return codes and the shell's 128+N."""
    if exit_code is None:
        return None
    if exit_code < 0:
        return -exit_code
    if 128 < exit_code < 128 + 65:
        return exit_code - 128
    return None


def _last_words(lines: Sequence[str]) -> str:
    for line in reversed(lines):
        if line.strip():
            return _trim(line)
    return ""


def _from_exit_code(exit_code: int | None, lines: Sequence[str], oom_kills: int | None) -> Diagnosis:
    sig = signal_of(exit_code)
    if sig == 9 and oom_kills is not None and oom_kills > 0:
        return Diagnosis(
            failure_class="oom",
            reason=f"killed by the kernel's OOM killer (the memory cgroup recorded {oom_kills} OOM kill(s) meanwhile)",
        )
    if sig == 9 and oom_kills == 0:
        return Diagnosis(
            failure_class="preempted",
            reason="killed by SIGKILL from outside verlyard "
            "(not the OOM killer: the memory cgroup recorded no OOM kill)",
        )
    if sig == 9:
        return Diagnosis(
            failure_class="oom",
            reason="killed by SIGKILL from outside verlyard (most likely the kernel's OOM killer)",
        )
    if sig == 15:
        return Diagnosis(failure_class="preempted", reason="terminated by SIGTERM from outside verlyard")
    if sig == 7:
        return Diagnosis(failure_class="infra", reason="bus error (SIGBUS): often /dev/shm is too small")
    if sig is not None:
        return Diagnosis(failure_class="unknown", reason=f"killed by {_SIGNAL_NAMES.get(sig, f'signal {sig}')}")
    last = _last_words(lines)
    code = f"exit code {exit_code}" if exit_code is not None else "failed"
    return Diagnosis(failure_class="user", reason=f"{code}: {last}" if last else code)


def classify(
    exit_code: int | None,
    lines: Sequence[str],
    *,
    stop: StopReason | None = None,
    stop_detail: str = "",
    first_line: int = 0,
    oom_kills: int | None = None,
) -> Diagnosis:
    """Why a failed attempt failed. `lines` is its log (or tail), `stop` what the agent did to it,
    `oom_kills` how many OOM kills its memory cgroup recorded while it ran (None: unknown).

    A stop the agent made wins (the user cancelled; the stage timed out; the agent was shut down),
    except a hang: processes that hang after an OOM or a CUDA/NCCL error (the other ranks waiting
    in a collective) are classified by that error, which is the cause worth retrying on.
    """
    if stop == "cancelled":
        return Diagnosis(failure_class="cancelled", reason=stop_detail or "cancelled")
    if stop == "timeout":
        return Diagnosis(failure_class="timeout", reason=stop_detail or "the stage's timeout elapsed")
    if stop == "agent_stop":
        return Diagnosis(failure_class="preempted", reason=stop_detail or "the agent was stopped")
    cause = find_cause(lines, first_line=first_line)
    if stop == "hang":
        hang = stop_detail or "no progress: the watchdog stopped it"
        if cause is not None and cause.failure_class in ("oom", "nccl", "cuda"):
            return Diagnosis(failure_class=cause.failure_class, reason=_trim(f"{cause.reason} (then: {hang})"))
        return Diagnosis(failure_class="hang", reason=hang)
    if cause is not None:
        return cause
    return _from_exit_code(exit_code, lines, oom_kills)

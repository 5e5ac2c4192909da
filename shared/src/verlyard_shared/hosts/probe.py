"""Pure core: the probe of an SSH host — one shell script (built from quoted tokens) and the parser of its
output: GPUs (nvidia-smi query), driver and CUDA versions, disk space, whether the trainer's Python
imports verl. A host without nvidia-smi, or whose nvidia-smi finds no GPU, has no GPUs (not an error).
"""

from __future__ import annotations

import shlex
from typing import Any, Final

import msgspec

from verlyard_shared.hosts.remote import check_program

GPU_QUERY: Final = "index,name,uuid,memory.total,memory.used,utilization.gpu"
MARK: Final = "@@verlyard-probe "
VERL_CHECK: Final = "import verl, sys; print(getattr(verl, '__version__', 'unknown'))"


class ProbedGpu(msgspec.Struct, frozen=True, kw_only=True):
    index: int
    name: str
    uuid: str = ""
    memory_total_mb: int = 0
    memory_used_mb: int = 0
    utilization_pct: int | None = None


class ProbeResult(msgspec.Struct, frozen=True, kw_only=True):
    """What a probe found (recorded in `hosts.last_probe` and in `host.probed`; no secret in it)."""

    ok: bool
    error: str | None = None
    home: str | None = None
    gpus: tuple[ProbedGpu, ...] = ()
    gpu_note: str | None = None
    """Why there are no GPUs (no nvidia-smi, no device, a driver error)."""
    driver_version: str | None = None
    cuda_version: str | None = None
    disk_free_bytes: int | None = None
    disk_total_bytes: int | None = None
    trainer_python: str | None = None
    verl_version: str | None = None
    verl_error: str | None = None


def probe_script(trainer_python: str) -> str:
    """The probe's remote command: sections introduced by `@@verlyard-probe NAME` lines."""
    python = shlex.quote(check_program(trainer_python))
    mark = shlex.quote(MARK)
    smi_query = shlex.join(["nvidia-smi", f"--query-gpu={GPU_QUERY}", "--format=csv,noheader,nounits"])
    parts = [
        f'printf "%shome\\n" {mark}; printf "%s\\n" "$HOME"',
        f'printf "%sgpus\\n" {mark}',
        "if command -v nvidia-smi >/dev/null 2>&1; then "
        f'out=$({smi_query} 2>&1); rc=$?; printf "%s\\n" "$out"; printf "%sgpus_rc %s\\n" {mark} "$rc"; '
        f'printf "%sdriver\\n" {mark}; nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null '
        "| head -n 1; "
        f"printf \"%scuda\\n\" {mark}; nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\\([0-9.]*\\).*/\\1/p' "
        "| head -n 1; "
        f'else printf "%sgpus_rc missing\\n" {mark}; fi',
        f'printf "%sdisk\\n" {mark}; df -Pk "$HOME" 2>/dev/null | tail -n 1',
        f'printf "%sverl\\n" {mark}; out=$({python} -c {shlex.quote(VERL_CHECK)} 2>&1); rc=$?; '
        f'printf "%s\\n" "$out" | tail -n 3; printf "%sverl_rc %s\\n" {mark} "$rc"',
    ]
    return "; ".join(parts)


def _sections(stdout: str) -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in stdout.splitlines():
        if line.startswith(MARK):
            name, _, value = line[len(MARK) :].partition(" ")
            if name.endswith("_rc"):
                sections[name] = [value]
                continue
            current = sections.setdefault(name, [])
            continue
        if current is not None:
            current.append(line)
    return sections


def _int(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isascii() and text.isdigit() else None


def parse_gpus(lines: list[str]) -> tuple[tuple[ProbedGpu, ...], str | None]:
    gpus: list[ProbedGpu] = []
    notes: list[str] = []
    for line in lines:
        cells = [c.strip() for c in line.split(",")]
        index = _int(cells[0]) if cells else None
        if len(cells) < 4 or index is None:
            if line.strip():
                notes.append(line.strip())
            continue
        used = _int(cells[4]) if len(cells) > 4 else None
        util = _int(cells[5]) if len(cells) > 5 else None
        gpus.append(
            ProbedGpu(
                index=index,
                name=cells[1],
                uuid=cells[2],
                memory_total_mb=_int(cells[3]) or 0,
                memory_used_mb=used or 0,
                utilization_pct=util,
            )
        )
    return tuple(gpus), ("; ".join(notes)[:500] or None)


def parse_probe(stdout: str, *, trainer_python: str) -> ProbeResult:
    s = _sections(stdout)
    home = (s.get("home") or [""])[0].strip() or None
    gpus: tuple[ProbedGpu, ...] = ()
    note: str | None = None
    rc = (s.get("gpus_rc") or ["missing"])[0].strip()
    if rc == "missing":
        note = "nvidia-smi is not installed: no GPUs"
    else:
        gpus, errors = parse_gpus(s.get("gpus", []))
        if rc != "0" or not gpus:
            note = f"nvidia-smi found no GPU (exit {rc})" + (f": {errors}" if errors else "")
    driver = next((line.strip() for line in s.get("driver", []) if line.strip()), None)
    cuda = next((line.strip() for line in s.get("cuda", []) if line.strip()), None)
    free = total = None
    disk = [line for line in s.get("disk", []) if line.strip()]
    if disk:
        cells = disk[-1].split()
        if len(cells) >= 4 and _int(cells[1]) is not None and _int(cells[3]) is not None:
            total, free = (_int(cells[1]) or 0) * 1024, (_int(cells[3]) or 0) * 1024
    verl_lines = [line for line in s.get("verl", []) if line.strip()]
    verl_ok = (s.get("verl_rc") or [""])[0].strip() == "0"
    return ProbeResult(
        ok=True,
        home=home,
        gpus=gpus,
        gpu_note=note,
        driver_version=driver,
        cuda_version=cuda,
        disk_free_bytes=free,
        disk_total_bytes=total,
        trainer_python=trainer_python,
        verl_version=verl_lines[-1].strip() if verl_ok and verl_lines else None,
        verl_error=None if verl_ok else (verl_lines[-1].strip()[:300] if verl_lines else "no output"),
    )


def failed(error: str) -> ProbeResult:
    return ProbeResult(ok=False, error=error)


def to_json(result: ProbeResult) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(result)
    return out

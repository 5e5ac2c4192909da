# pyright: reportMissingImports=false, reportMissingModuleSource=false
"""Launcher (run by the trainer's Python, never imported by the agent): verl 0.9.1 SFT on a CPU-only host.

    torchrun --standalone --nnodes=1 --nproc_per_node=N verl_cpu_sft.py <hydra overrides>
    python verl_cpu_sft.py --verlyard-check        # apply the patches, train nothing, exit 0 if they hold

Stock verl 0.9.1 has no CPU platform: it falls back to "nvidia" and dies in NCCL. Before handing over to
`verl.trainer.sft_trainer.main()` (unchanged, reading the same Hydra overrides from argv) this:
1. registers a `cpu` platform (gloo backend, `torch.cpu` plus no-op stand-ins for cuda-only calls);
2. adds `cpu` entries for the fsdp/fsdp2 engines (registered for cuda/npu only) — private name
   `EngineRegistry._engines`;
3. replaces `verl.utils.distributed.initialize_global_process_group` (it builds the invalid backend
   `cpu:gloo,cpu:gloo`) with a plain gloo `init_process_group` — a private function.
The agent passes `engine.strategy=fsdp2` and `+model.override_config.attn_implementation=sdpa` itself.
This file lives outside the agent's import graph (a folder without `__init__.py`): it is data shipped with
the agent and run as a script. Pinned to verl==0.9.1; tests/integration/test_verl_cpu_launcher.py fails
loudly when the private names move.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib
import os
import sys
import types
from typing import Any

SUPPORTED_VERL = "0.9.1"


class LauncherError(RuntimeError):
    """verl changed under the launcher: a name it patches is gone."""


def _device_module(torch: Any) -> types.ModuleType:
    extra = {
        "get_device_name": lambda *a, **k: "CPU",  # utils/flops_counter.py formats it: must be a str
        "is_bf16_supported": lambda *a, **k: True,
        "mem_get_info": lambda *a, **k: (0, 0),
    }

    class _Dev(types.ModuleType):
        """torch.cpu, plus stand-ins for torch.cuda-only calls (memory stats read 0, the rest are no-ops)."""

        def __getattr__(self, name: str) -> Any:
            if hasattr(torch.cpu, name):
                return getattr(torch.cpu, name)
            return extra.get(name, lambda *a, **k: 0)

    return _Dev("verlyard_cpu_device")


def register_cpu_platform() -> None:
    import torch
    from verl.plugin.platform import PlatformBase, PlatformRegistry

    dev = _device_module(torch)

    def _none(self: object, *a: object, **k: object) -> None:
        return None

    namespace: dict[str, Any] = {
        "device_name": property(lambda s: "cpu"),
        "vendor_name": property(lambda s: "cpu"),
        "device_module": property(lambda s: dev),
        "is_available": lambda s: True,
        "current_device": lambda s: "cpu",
        "device_count": lambda s: 1,
        "communication_backend_name": lambda s: "gloo",
        "visible_devices_envvar": lambda s: "CUDA_VISIBLE_DEVICES",
        "get_device_capability": lambda s, i=0: (None, None),
        "ray_resource_name": lambda s: "CPU",
        "ray_noset_envvars": lambda s: [],
        "is_ipc_supported": lambda s: False,
        "nvtx_range": lambda s, m: contextlib.nullcontext(),
        "manual_seed": lambda s, x: torch.manual_seed(x),
        "manual_seed_all": lambda s, x: torch.manual_seed(x),
        **{
            n: _none
            for n in (
                "set_device",
                "synchronize",
                "set_allocator_settings",
                "empty_cache",
                "profiler_start",
                "profiler_stop",
                "cudart",
            )
        },
    }
    PlatformRegistry.register(platform="cpu")(type("PlatformCPU", (PlatformBase,), namespace))


def register_cpu_engines() -> None:
    import verl.workers.engine  # noqa: F401  (registers the engines)
    from verl.workers.engine.base import EngineRegistry

    engines = getattr(EngineRegistry, "_engines", None)
    if not isinstance(engines, dict):
        raise LauncherError("verl.workers.engine.base.EngineRegistry._engines is gone")
    for model_type in ("language_model", "value_model"):
        for backend in ("fsdp", "fsdp2"):
            try:
                by_device = engines[model_type][backend]
                by_device.setdefault("cpu", by_device["cuda"])
            except (KeyError, TypeError) as exc:
                raise LauncherError(f"EngineRegistry._engines[{model_type!r}][{backend!r}]['cuda'] is gone") from exc


def patch_process_group() -> None:
    import torch
    import verl.utils.distributed as vd

    if not callable(getattr(vd, "initialize_global_process_group", None)):
        raise LauncherError("verl.utils.distributed.initialize_global_process_group is gone")

    def initialize_global_process_group(timeout_second: int = 36000) -> tuple[int, int, int]:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_second))
        return int(os.environ["LOCAL_RANK"]), int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    vd.initialize_global_process_group = initialize_global_process_group


def prepare() -> None:
    os.environ.setdefault("VERL_PLATFORM", "cpu")
    import verl

    version = getattr(verl, "__version__", "?")
    if version != SUPPORTED_VERL:
        print(
            f"verlyard CPU launcher: verl {version} is installed; this launcher was checked against "
            f"verl=={SUPPORTED_VERL}",
            file=sys.stderr,
        )
    register_cpu_platform()
    register_cpu_engines()
    patch_process_group()


def main(argv: list[str]) -> int:
    try:
        prepare()
    except LauncherError as exc:
        print(f"verlyard CPU launcher: {exc} (supported: verl=={SUPPORTED_VERL})", file=sys.stderr)
        return 3
    if argv[1:] == ["--verlyard-check"]:
        import verl
        from verl.workers.engine.base import EngineRegistry

        engines = EngineRegistry._engines  # pyright: ignore[reportPrivateUsage]
        assert all("cpu" in engines[m][b] for m in ("language_model", "value_model") for b in ("fsdp", "fsdp2")), (
            "cpu engines missing"
        )
        print(f"verlyard CPU launcher: ok (verl {verl.__version__})")
        return 0
    entry = importlib.import_module(os.environ.get("VERLYARD_VERL_ENTRY", "verl.trainer.sft_trainer"))
    entry.main()  # Hydra reads the overrides from sys.argv
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

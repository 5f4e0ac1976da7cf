"""verl's SFT trainer entry point (`verl.trainer.sft_trainer.main`) on CPU, for the opt-in verl tests only.

    torchrun --nproc_per_node 1 tests/integrations/verl_cpu_main.py model.path=... data.train_files=... ...

verl 0.9 has no CPU platform: it falls back to CUDA, registers its FSDP engines for cuda/npu only and joins
the process group as "cpu:gloo,cuda:nccl". This script changes exactly that, before verl's `main` runs: a CPU
platform (gloo; device memory statistics read 0), verl's own `FSDPEngineWithLMHead` registered for it, and a
plain "gloo" process group. The trainer, its FSDP2 engine, data loading and loss slot are verl's own.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from verl.plugin.platform.platform_base import PlatformBase
from verl.plugin.platform.platform_manager import set_platform


class _CPUModule:
    """`torch.cpu`, plus the device queries verl makes (memory statistics read 0)."""

    def get_device_name(self, *args) -> str:
        return "CPU"

    def mem_get_info(self, *args) -> tuple[int, int]:
        return 0, 0

    def __getattr__(self, name: str):
        if hasattr(torch.cpu, name):
            return getattr(torch.cpu, name)
        return lambda *args, **kwargs: 0


class PlatformCPU(PlatformBase):
    device_name = "cpu"
    vendor_name = "cpu"

    @property
    def device_module(self):
        return _CPUModule()

    def is_available(self) -> bool:
        return True

    def current_device(self) -> str:
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index) -> None:
        pass

    def synchronize(self, device_index=None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0):
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextlib.contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self):
        return None


def _use_cpu() -> None:
    set_platform(PlatformCPU())
    join = dist.init_process_group
    dist.init_process_group = lambda backend=None, **kwargs: join(backend="gloo", **kwargs)
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead

    for backend in ("fsdp", "fsdp2"):
        EngineRegistry._engines["language_model"][backend]["cpu"] = FSDPEngineWithLMHead


if __name__ == "__main__":
    _use_cpu()
    from verl.trainer.sft_trainer import main

    main()

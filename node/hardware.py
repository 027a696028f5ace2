"""What this machine can give: accelerator, memory and cores, reported to the coordinator's shard plan."""

from __future__ import annotations

import os
from pathlib import Path


def detect(max_vram_gb: float | None = None, max_cpu_threads: int | None = None) -> dict:
    import torch

    cores = os.cpu_count() or 1
    threads = min(cores, max_cpu_threads) if max_cpu_threads else cores
    info: dict = {"device": "cpu", "vram_gb": None, "cpu_cores": threads, "ram_gb": _ram_gb(),
                  "ram_free_gb": _free_ram_gb(), "bf16": False}
    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        vram = free / 2**30
        info.update(
            device="cuda", gpu=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(),
            vram_gb=round(min(vram, max_vram_gb) if max_vram_gb else vram, 2),
        )
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        info.update(device="mps", bf16=False)
    return info


def _ram_gb() -> float:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return round(pages * size / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return 0.0


def _free_ram_gb() -> float | None:
    """RAM a new allocation can get without swapping (Linux MemAvailable); None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return round(int(line.split()[1]) / 2**20, 2)
    except (OSError, ValueError, IndexError):
        pass
    return None


def train_placement() -> tuple[str, object]:
    """Where to train and in which dtype: CUDA in bf16 where the card supports it, else float32."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps", torch.float32
    return "cpu", torch.float32

"""Launch configurations of the Triton resident-expert kernel, and what it supports.

A configuration comes from a sweep on the device (`benchmarks/gpu/check_kernel.py --sweep`), kept
as JSON under `triton_configs/`, one file per (device, dtype, E, H, I) as `config_file_name` spells
it; shapes without a file take `LaunchConfig()`'s defaults. This module imports no Triton, so
that the engine can say why it falls back without it.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).with_name("triton_configs")
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class LaunchConfig:
    few_pairs_max: int = 32  # up to this many (token, k) pairs: the GEMV-shaped launch
    gemv_block_i: int = 64
    gemv_block_h: int = 128
    gemv_warps: int = 4
    block_m: int = 16  # the grouped (GEMM-shaped) launch
    block_i: int = 64
    block_h: int = 64
    warps: int = 4

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> LaunchConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown launch config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace(" ", "_")
    return device.type


def config_file_name(device: str, dtype: torch.dtype, num_experts: int, hidden: int, intermediate: int) -> str:
    return f"device={device},dtype={str(dtype).removeprefix('torch.')},E={num_experts},H={hidden},I={intermediate}.json"


@functools.lru_cache(maxsize=None)  # looked up at every launch: the device name and file read once per shape
def launch_config(device: torch.device, dtype: torch.dtype, num_experts: int, hidden: int, intermediate: int,
                  config_dir: Path = CONFIG_DIR) -> LaunchConfig:
    """The swept configuration for this device and shape, else the defaults."""
    path = config_dir / config_file_name(device_name(device), dtype, num_experts, hidden, intermediate)
    return LaunchConfig.from_json(json.loads(path.read_text())) if path.exists() else LaunchConfig()


def supports(device: torch.device, dtype: torch.dtype | None = None) -> tuple[bool, str]:
    """(whether the Triton kernel can run resident experts of `dtype` (any, if None) here, and if
    not, why)."""
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False, f"the Triton kernel needs CUDA (device {device})"
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        return False, f"expert dtype {dtype} (the kernel takes {', '.join(str(d) for d in SUPPORTED_DTYPES)})"
    return True, ""

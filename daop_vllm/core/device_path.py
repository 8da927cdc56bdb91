"""Which implementation runs the resident experts: the Triton kernel on CUDA; where device and
host are one memory (the CPU) the executor runs them with the others, in one job (DaopMoE), and
this function only in vLLM's dummy runs; the torch reference where Triton is missing."""

from __future__ import annotations

from collections.abc import Callable

import torch

from daop_vllm.core.expert_math import routed_experts_forward
from daop_vllm.core.triton_configs import supports

ExpertsForward = Callable[..., torch.Tensor]


def pick_device_forward(device: torch.device) -> tuple[ExpertsForward, str]:
    """(function, description for the startup log)."""
    if device.type == "cpu":
        return routed_experts_forward, "CPU executor, every expert in one job (device and host are one memory)"
    supported, reason = supports(device)
    if not supported:
        return routed_experts_forward, f"torch reference on {device} ({reason})"
    from daop_vllm.core.triton_moe import resident_experts_forward_triton

    return resident_experts_forward_triton, f"Triton fused kernel on {device}"

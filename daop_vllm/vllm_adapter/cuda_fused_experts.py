"""vLLM's own FP8 MoE method for device experts held in FP8 blocks (an FP8 checkpoint's experts
as loaded, or `device_expert_format` "fp8"): its Triton `fused_experts` with fp8 weights and
activations (w8a8, blocks of 128 x 128), the layer's slot table as its expert map (-1: not in a
slot, a pair it leaves out), the computation stock vLLM runs for such a checkpoint. Our own
Triton kernel (weights dequantised to the activations' dtype) stays the fallback.

Untested: no machine here runs vLLM on a GPU."""

from __future__ import annotations

import torch

from daop_vllm.core.device_path import ExpertsForward
from daop_vllm.core.quantized_experts import FP8_BLOCK, QuantizedWeights

# Triton's fp8 dots need Ada or Hopper (compute capability 8.9) or later
FP8_MIN_CAPABILITY = (8, 9)


def fp8_device_forward(device: torch.device) -> tuple[ExpertsForward | None, str]:
    """(the device forward through vLLM's FP8 MoE kernels, or None; the startup log's words
    for it, or why not)."""
    if device.type != "cuda":
        return None, f"vLLM's FP8 MoE kernels need CUDA (device {device})"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        return None, (f"vLLM's Triton FP8 MoE kernels need compute capability "
                      f"{'.'.join(map(str, FP8_MIN_CAPABILITY))}, this GPU has {'.'.join(map(str, capability))}")
    from vllm.model_executor.layers.fused_moe.config import fp8_w8a8_moe_quant_config
    from vllm.model_executor.layers.fused_moe.fused_moe import fused_experts

    def forward(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: QuantizedWeights,
                w2: QuantizedWeights, slot_of_expert: torch.Tensor) -> torch.Tensor:
        config = fp8_w8a8_moe_quant_config(w1_scale=w13.scales, w2_scale=w2.scales, block_shape=[FP8_BLOCK, FP8_BLOCK])
        return fused_experts(x.contiguous(), w13.data.view(torch.float8_e4m3fn), w2.data.view(torch.float8_e4m3fn),
                             topk_weights.float(), topk_ids.to(torch.int32), global_num_experts=slot_of_expert.numel(),
                             expert_map=slot_of_expert.to(torch.int32), quant_config=config)

    return forward, ("vLLM's FP8 MoE method (fused_experts, fp8 w8a8 in blocks of 128), the slot table as its expert "
                     "map (untested on a GPU)")

"""vLLM's FP8 MoE method as the device path of FP8 slots: chosen only where it runs, and on a
GPU the same results as our reference on the dequantised weights (with fp8 activations)."""

import pytest
import torch

from daop_vllm.core.expert_math import routed_experts_forward
from daop_vllm.core.quantized_experts import QuantizedWeights, quantize
from daop_vllm.vllm_adapter.cuda_fused_experts import fp8_device_forward


def test_not_chosen_without_cuda_and_the_reason_says_so():
    forward, reason = fp8_device_forward(torch.device("cpu"))
    assert forward is None and "CUDA" in reason


def test_slot_table_as_expert_map_on_a_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (compute capability 8.9+) with vLLM installed: vLLM's FP8 MoE kernels")
    device = torch.device("cuda")
    forward, reason = fp8_device_forward(device)
    if forward is None:
        pytest.skip(reason)
    torch.manual_seed(0)
    experts, hidden, inter, slots = 8, 256, 384, 3
    w13 = quantize(torch.randn(experts, 2 * inter, hidden) * 0.05, "fp8")
    w2 = quantize(torch.randn(experts, hidden, inter) * 0.05, "fp8")
    resident = [5, 1, 6]  # slot s holds expert resident[s]
    slot_of_expert = torch.full((experts,), -1, dtype=torch.int64)
    slot_of_expert[resident] = torch.arange(slots)
    x = torch.randn(7, hidden, dtype=torch.bfloat16)
    weights, ids = torch.softmax(torch.randn(7, experts), -1).topk(2, -1)
    slots13, slots2 = (QuantizedWeights("fp8", w.data[resident], w.scales[resident], torch.Size((slots, *w.shape[1:])))
                       for w in (w13, w2))
    on_device = [QuantizedWeights("fp8", w.data.to(device), w.scales.to(device), w.shape) for w in (slots13, slots2)]
    out = forward(x.to(device), ids.to(device), weights.to(device), *on_device, slot_of_expert.to(device))
    reference = routed_experts_forward(x.float(), ids, weights, slots13, slots2, slot_of_expert)  # others left out
    torch.testing.assert_close(out.float().cpu(), reference, rtol=0.1, atol=0.05)

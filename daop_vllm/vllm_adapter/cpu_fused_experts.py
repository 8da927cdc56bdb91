"""vLLM's CPU fused-MoE op for a layer's experts where device and host are one memory (CPU-only
machines). On the layer of our CPU serving benchmark (8 experts, hidden 512, intermediate 1792) it
took 0.31-0.84x the executor's time at 1-64 tokens in fp32 and 0.48-0.86x at 4-64 in bf16, but
1.6x at one token in bf16 (benchmarks/results/cpu_moe_ops.json). It reads its own prepacked copy
of the weights, made here once: as many bytes again as the layer's experts (the plain store stays,
for the executor's pre-computation and fault recovery)"""

from __future__ import annotations

from collections.abc import Callable

import torch

from daop_vllm.core.expert_store import HostExpertStore

# vLLM's kernel tiles both dimensions by 32 (it pads the intermediate size itself in its own layer)
_ALIGNMENT = 32


def kernel_isa(dtype: torch.dtype) -> str:
    return "amx" if dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported() else "vec"


ExpertsCall = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def cpu_fused_experts(store: HostExpertStore) -> ExpertsCall | None:
    """(x [T, H], topk_ids [T, K], topk_weights [T, K]) -> [T, H] through vLLM's op, ids < 0
    contributing nothing; None where the op does not take this layer (dtype, alignment)."""
    from vllm import _custom_ops as ops

    _, two_i, hidden = store.w13.shape
    if store.w13.dtype not in (torch.bfloat16, torch.float32) or hidden % _ALIGNMENT or (two_i // 2) % _ALIGNMENT:
        return None
    isa = kernel_isa(store.w13.dtype)
    w13 = ops.cpu_prepack_moe_weight(store.w13, isa)
    w2 = ops.cpu_prepack_moe_weight(store.w2, isa)

    def experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        ids, weights, rows = topk_ids.to(torch.int32), topk_weights.float(), None
        skipped = topk_ids < 0  # pre-computed pairs: the op takes no gaps
        if bool(skipped.any()):
            # rows with nothing left drop out; a skipped pair repeats one of its row's other experts
            # at weight 0, so that no expert is read for it
            rows = (~skipped).any(1).nonzero().squeeze(1)
            skipped, ids, weights = skipped[rows], ids[rows], weights[rows]
            kept = ids.gather(1, (~skipped).to(torch.int64).argmax(1, keepdim=True))
            ids, weights = torch.where(skipped, kept, ids), weights.masked_fill(skipped, 0.0)
        rows_x = x.contiguous() if rows is None else x[rows]
        out = torch.empty_like(rows_x)
        ops.cpu_fused_moe(out, rows_x, w13, w2, None, None, weights, ids, "silu", isa, False)
        if rows is None:
            return out
        return torch.zeros_like(x).index_copy_(0, rows, out)
    return experts


def prepacked_bytes(store: HostExpertStore) -> int:
    return store.w13.nbytes + store.w2.nbytes

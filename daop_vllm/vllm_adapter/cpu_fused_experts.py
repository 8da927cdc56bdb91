"""vLLM's CPU fused-MoE op for a layer's experts where device and host are one memory (CPU-only
machines). On the layer of our CPU serving benchmark (8 experts, hidden 512, intermediate 1792) it
took 0.31-0.84x the executor's time at 1-64 tokens in fp32 and 0.48-0.86x at 4-64 in bf16, but
1.6x at one token in bf16 (benchmarks/results/cpu_moe_ops.json). It reads its own prepacked copy
of the weights, made here once: as many bytes again as the layer's experts (the plain store stays,
for the executor's pre-computation and fault recovery)"""

from __future__ import annotations

from collections.abc import Callable

import torch

from daop_vllm.core.expert_math import summed_into_rows
from daop_vllm.core.expert_store import HostExpertStore

# vLLM's kernel tiles both dimensions by 32 (it pads the intermediate size itself in its own layer)
_ALIGNMENT = 32


def kernel_isa(dtype: torch.dtype) -> str:
    return "amx" if dtype == torch.bfloat16 and torch.cpu._is_amx_tile_supported() else "vec"


# (x [N, H], topk_ids [N, K], topk_weights [N, K], out_rows [N] or None, like [T, H] or None) -> the
# experts' sum per row of x, or with out_rows summed into the rows of a [T, H] result (like `like`)
ExpertsCall = Callable[..., torch.Tensor]


def cpu_fused_experts(store: HostExpertStore) -> ExpertsCall | None:
    """The layer's ExpertsCall through vLLM's op, ids < 0 contributing nothing; None where the
    op does not take this layer (dtype, alignment)."""
    from vllm import _custom_ops as ops

    _, two_i, hidden = store.w13.shape
    if store.w13.dtype not in (torch.bfloat16, torch.float32) or hidden % _ALIGNMENT or (two_i // 2) % _ALIGNMENT:
        return None
    isa = kernel_isa(store.w13.dtype)
    w13 = ops.cpu_prepack_moe_weight(store.w13, isa)
    w2 = ops.cpu_prepack_moe_weight(store.w2, isa)

    def experts(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                out_rows: torch.Tensor | None = None, like: torch.Tensor | None = None) -> torch.Tensor:
        skipped = topk_ids < 0  # pre-computed pairs: the op takes no gaps
        if not bool(skipped.any()):
            out = torch.empty_like(x, memory_format=torch.contiguous_format)
            ops.cpu_fused_moe(out, x.contiguous(), w13, w2, None, None, topk_weights.float(),
                              topk_ids.to(torch.int32), "silu", isa, False)
            return summed_into_rows(out, out_rows, like)
        # Each kept pair a row of its own, top-1: the op computes every entry it is given, and a
        # gap filled with one of its row's experts at weight 0 cost as much as a real pair. The
        # pairs are summed into their result rows at once.
        row, k = (~skipped).nonzero(as_tuple=True)
        pairs_out = torch.empty((row.numel(), x.shape[1]), dtype=x.dtype, device="cpu")
        ops.cpu_fused_moe(pairs_out, x[row], w13, w2, None, None, topk_weights[row, k, None].float(),
                          topk_ids[row, k, None].to(torch.int32), "silu", isa, False)
        return summed_into_rows(pairs_out, row if out_rows is None else out_rows[row], x if like is None else like)
    return experts


def prepacked_bytes(store: HostExpertStore) -> int:
    return store.w13.nbytes + store.w2.nbytes

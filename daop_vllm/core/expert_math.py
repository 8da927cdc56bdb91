"""The expert computation in plain torch, over any slot table.

One function serves both sides of DAOP: the device path passes the device slot buffers and
the device slot table; the CPU executor passes the host store and a table that maps only the
experts it was given. Legend: T tokens, K top-k, E experts, S slots, H hidden, I intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from daop_vllm.core.quantized_experts import QuantizedWeights, dequantize

ExpertWeights = torch.Tensor | QuantizedWeights  # [S, rows, cols], as loaded or quantized


def summed_into_rows(out: torch.Tensor, out_rows: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """`out` [T', H] summed into the rows `out_rows` [T'] names, in fp32 (like `like` [T, H], on
    the host); as is without them."""
    if out_rows is None:
        return out
    return torch.zeros(like.shape, dtype=torch.float32, device="cpu").index_add_(0, out_rows, out.float()).to(like.dtype)


def routed_experts_forward(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: ExpertWeights,
    w2: ExpertWeights,
    slot_of_expert: torch.Tensor,
) -> torch.Tensor:
    """Sum over k of topk_weights[t, k] * expert(topk_ids[t, k])(x[t]), for the experts that
    `slot_of_expert` maps to a slot; unmapped experts (-1) and ids < 0 contribute nothing.

    x [T, H]; topk_ids, topk_weights [T, K]; w13 [S, 2I, H] (gate rows, then up rows);
    w2 [S, H, I]; slot_of_expert [E] (slot index or -1). Returns [T, H] in x's dtype.
    """
    out = torch.zeros_like(x)
    slots = torch.where(topk_ids >= 0, slot_of_expert[topk_ids.clamp_min(0)], -1)  # [T, K]
    mapped = slots >= 0
    if not bool(mapped.any()):
        return out
    token_idx, k_idx = mapped.nonzero(as_tuple=True)
    slot_idx = slots[token_idx, k_idx]
    order = torch.argsort(slot_idx, stable=True)
    token_idx, k_idx, slot_idx = token_idx[order], k_idx[order], slot_idx[order]
    used_slots, counts = torch.unique_consecutive(slot_idx, return_counts=True)
    start = 0
    for slot, count in zip(used_slots.tolist(), counts.tolist()):
        rows = token_idx[start : start + count]
        weights = topk_weights[rows, k_idx[start : start + count]].to(x.dtype)
        start += count
        out.index_add_(0, rows, expert_mlp(x[rows], w13[slot], w2[slot]) * weights[:, None])
    return out


def expert_mlp(x: torch.Tensor, w13: ExpertWeights, w2: ExpertWeights) -> torch.Tensor:
    """One expert on its tokens: x [n, H], w13 [2I, H], w2 [H, I] -> [n, H]; quantized weights
    through their dequantised values in x's dtype (the torch reference of quantized experts)."""
    if isinstance(w13, QuantizedWeights):
        w13, w2 = dequantize(w13, x.dtype), dequantize(w2, x.dtype)
    gate, up = (x @ w13.t()).chunk(2, dim=-1)  # [n, I] each
    return (F.silu(gate) * up) @ w2.t()

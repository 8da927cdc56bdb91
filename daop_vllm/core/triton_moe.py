"""The resident experts of one layer in one fused Triton launch.

The (token, k) pairs routed to device-resident experts, with the slot table as indirection: per
slot and chunk of the intermediate dimension, a program computes gate and up projections,
SiLU-and-multiply, scales by the routing weight, runs its chunk of the down projection and adds
the partial result into the output with atomics (split over I, so no program holds a whole
intermediate row). Few pairs (decode) take a GEMV-shaped launch that finds each slot's pairs in
the kernel; more take a grouped GEMM over the pairs sorted by slot. Pairs routed to experts that
are not resident are skipped. Same contract as `expert_math.routed_experts_forward`. Quantized
slots (int8, int4, fp8: quantized_experts.py) are dequantised in the kernel, each weight to q * scale
in the activations' dtype, as `dequantize` gives them.

Legend: T tokens, K top-k, P = T*K pairs, E experts, S slots, H hidden, I intermediate.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from daop_vllm.core.quantized_experts import QuantizedWeights, weight_parts
from daop_vllm.core.triton_configs import LaunchConfig, launch_config

# fp32 experts multiply in fp32: Triton's default for fp32 dots on tensor cores is TF32, which on
# the H200 was 1e-3 off the reference at unit scale (bf16/fp16 dots ignore this setting).
FP32_DOT: tl.constexpr = tl.constexpr("ieee")


@triton.jit
def _weights(w_ptr, s_ptr, row, col, stride_row, stride_col, stride_s_row, stride_s_group, mask,
             QUANT: tl.constexpr, dtype: tl.constexpr):
    """A tile of weights w[row, col] (`col` along the input), in `dtype`: loaded, or dequantised
    (int8: a scale per row; int4: nibbles, column j and j + 32 of each 64 in one byte, a scale
    per 128 columns; fp8: e4m3 bytes, a scale per block of 128 x 128)."""
    if QUANT == 0:
        w = tl.load(w_ptr + row * stride_row + col * stride_col, mask=mask, other=0.0)
    elif QUANT == 1:
        q = tl.load(w_ptr + row * stride_row + col * stride_col, mask=mask, other=0).to(tl.float32)
        w = (q * tl.load(s_ptr + row * stride_s_row, mask=mask, other=0.0)).to(dtype)
    elif QUANT == 3:
        # e4m3 as fp16 bits (sign; exponent and mantissa shifted into place): the value times 2^-8
        byte = tl.load(w_ptr + row * stride_row + col * stride_col, mask=mask, other=0).to(tl.int32)
        half = (((byte & 0x7F) << 7) | ((byte & 0x80) << 8)).to(tl.uint16).to(tl.float16, bitcast=True)
        scale = tl.load(s_ptr + (row // 128) * stride_s_row + (col // 128) * stride_s_group, mask=mask, other=0.0)
        w = (half.to(tl.float32) * 256.0 * scale).to(dtype)
    else:
        byte = tl.load(w_ptr + row * stride_row + (col // 64 * 32 + col % 32) * stride_col, mask=mask,
                       other=0).to(tl.int32)
        q = ((byte >> ((col % 64) // 32 * 4)) & 15).to(tl.float32) - 8.0
        scale = tl.load(s_ptr + row * stride_s_row + (col // 128) * stride_s_group, mask=mask, other=0.0)
        w = (q * scale.to(tl.float32)).to(dtype)
    return w


@triton.jit
def _expert_rows(
    x_ptr, w13_ptr, w2_ptr, s13_ptr, s2_ptr, out_ptr, token, valid, weight, slot, pid_i, H, I,
    stride_xt, stride_xh, stride_w13s, stride_w13n, stride_w13h, stride_w2s, stride_w2h, stride_w2i,
    stride_s13s, stride_s13n, stride_s13g, stride_s2s, stride_s2h, stride_s2g, stride_ot, stride_oh,
    BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, QUANT: tl.constexpr,
):
    """Rows `token` (where `valid`) through one chunk of the intermediate dimension of the expert
    in `slot`: gate and up, SiLU-and-multiply, times `weight`, then that chunk's share of the down
    projection added into out."""
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_i = offs_i < I
    # int64: a slot's offset passes 2^31 elements for large experts (DeepSeek-V3's w13 slot
    # holds 29.4M, so from slot 74 on), where Triton would multiply int32 strides in int32.
    w13 = w13_ptr + slot.to(tl.int64) * stride_w13s
    s13 = s13_ptr + slot.to(tl.int64) * stride_s13s
    dtype = x_ptr.dtype.element_ty
    gate = tl.zeros((token.shape[0], BLOCK_I), dtype=tl.float32)
    up = tl.zeros((token.shape[0], BLOCK_I), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        x = tl.load(x_ptr + token[:, None] * stride_xt + offs_h[None, :] * stride_xh,
                    mask=valid[:, None] & mask_h[None, :], other=0.0)  # [M, BH]
        w_mask = mask_h[:, None] & mask_i[None, :]
        w_gate = _weights(w13, s13, offs_i[None, :], offs_h[:, None], stride_w13n, stride_w13h, stride_s13n,
                          stride_s13g, w_mask, QUANT, dtype)  # [BH, BI]
        w_up = _weights(w13, s13, offs_i[None, :] + I, offs_h[:, None], stride_w13n, stride_w13h, stride_s13n,
                        stride_s13g, w_mask, QUANT, dtype)  # [BH, BI]
        gate = tl.dot(x, w_gate, gate, input_precision=FP32_DOT)
        up = tl.dot(x, w_up, up, input_precision=FP32_DOT)
    act = gate * tl.sigmoid(gate) * up * weight[:, None]  # [M, BI], routing weight applied
    act = act.to(dtype)

    w2 = w2_ptr + slot.to(tl.int64) * stride_w2s
    s2 = s2_ptr + slot.to(tl.int64) * stride_s2s
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        w_down = _weights(w2, s2, offs_h[None, :], offs_i[:, None], stride_w2h, stride_w2i, stride_s2h, stride_s2g,
                          mask_i[:, None] & mask_h[None, :], QUANT, dtype)  # [BI, BH]
        part = tl.dot(act, w_down, input_precision=FP32_DOT)  # [M, BH]
        tl.atomic_add(out_ptr + token[:, None] * stride_ot + offs_h[None, :] * stride_oh, part,
                      mask=valid[:, None] & mask_h[None, :])


@triton.jit
def _grouped_moe_kernel(
    x_ptr, w13_ptr, w2_ptr, s13_ptr, s2_ptr, out_ptr, pair_ptr, block_slot_ptr, pair_weight_ptr,
    num_pairs, H, I, top_k,
    stride_xt, stride_xh, stride_w13s, stride_w13n, stride_w13h, stride_w2s, stride_w2h, stride_w2i,
    stride_s13s, stride_s13n, stride_s13g, stride_s2s, stride_s2h, stride_s2g, stride_ot, stride_oh,
    BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, QUANT: tl.constexpr,
):
    """GEMM-shaped: program (m, i) takes block m of the pairs grouped by slot (group_pairs_by_slot)."""
    pid_m = tl.program_id(0)
    slot = tl.load(block_slot_ptr + pid_m)
    if slot >= 0:
        pair = tl.load(pair_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # a pair index, or num_pairs: padding
        valid = pair < num_pairs
        weight = tl.load(pair_weight_ptr + pair, mask=valid, other=0.0)
        _expert_rows(x_ptr, w13_ptr, w2_ptr, s13_ptr, s2_ptr, out_ptr, tl.where(valid, pair // top_k, 0), valid,
                     weight, slot, tl.program_id(1), H, I, stride_xt, stride_xh, stride_w13s, stride_w13n,
                     stride_w13h, stride_w2s, stride_w2h, stride_w2i, stride_s13s, stride_s13n, stride_s13g,
                     stride_s2s, stride_s2h, stride_s2g, stride_ot, stride_oh, BLOCK_I, BLOCK_H, QUANT)


@triton.jit
def _few_pairs_moe_kernel(
    x_ptr, w13_ptr, w2_ptr, s13_ptr, s2_ptr, out_ptr, topk_ids_ptr, topk_weights_ptr, slot_of_expert_ptr,
    num_pairs, H, I, top_k,
    stride_xt, stride_xh, stride_w13s, stride_w13n, stride_w13h, stride_w2s, stride_w2h, stride_w2i,
    stride_s13s, stride_s13n, stride_s13g, stride_s2s, stride_s2h, stride_s2g, stride_ot, stride_oh,
    BLOCK_P: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, QUANT: tl.constexpr,
):
    """GEMV-shaped, for few pairs (decode): program (s, i) reads chunk i of slot s's weights once
    for all the pairs routed to it, found by masking every pair's expert against the slot, so
    nothing is grouped or sorted before the launch. Slots no pair uses return at once."""
    slot = tl.program_id(0)
    offs_p = tl.arange(0, BLOCK_P)
    in_range = offs_p < num_pairs
    expert = tl.load(topk_ids_ptr + offs_p, mask=in_range, other=-1)
    pair_slot = tl.load(slot_of_expert_ptr + expert, mask=in_range & (expert >= 0), other=-1)
    mine = in_range & (pair_slot == slot)
    if tl.max(mine.to(tl.int32), axis=0) > 0:
        weight = tl.load(topk_weights_ptr + offs_p, mask=mine, other=0.0).to(tl.float32)
        _expert_rows(x_ptr, w13_ptr, w2_ptr, s13_ptr, s2_ptr, out_ptr, tl.where(mine, offs_p // top_k, 0), mine,
                     weight, slot, tl.program_id(1), H, I, stride_xt, stride_xh, stride_w13s, stride_w13n,
                     stride_w13h, stride_w2s, stride_w2h, stride_w2i, stride_s13s, stride_s13n, stride_s13g,
                     stride_s2s, stride_s2h, stride_s2g, stride_ot, stride_oh, BLOCK_I, BLOCK_H, QUANT)


def group_pairs_by_slot(
    topk_ids: torch.Tensor, slot_of_expert: torch.Tensor, num_slots: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the (token, k) pairs by slot, each slot's run padded to a multiple of `block_m`,
    without a host sync: every shape here follows from the arguments' shapes alone (the grid is
    sized for the worst case), so no op reads a value back (no bincount, no boolean indexing).

    Returns pair_of_row [R] (pair index, or P for padding) and slot_of_block [R / block_m]
    (-1 for blocks past the end), R = cdiv(P, block_m) * block_m + num_slots * block_m.
    """
    pairs = topk_ids.numel()
    device = topk_ids.device
    slots = slot_of_expert[topk_ids.flatten()]  # [P], -1 for host experts
    order = torch.argsort(slots, stable=True)
    sorted_slots = slots[order]
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, slots + 1, torch.ones_like(slots))
    counts = counts[1:]  # [S] pairs per slot
    padded = (counts + block_m - 1) // block_m * block_m
    padded_start = torch.cumsum(padded, 0) - padded  # [S]
    start = torch.cumsum(counts, 0) - counts + (pairs - counts.sum())  # [S], host pairs sort first
    num_rows = triton.cdiv(pairs, block_m) * block_m + num_slots * block_m
    resident = sorted_slots >= 0
    slot_idx = sorted_slots.clamp(min=0)
    rank = torch.arange(pairs, device=device) - start[slot_idx]
    row = torch.where(resident, padded_start[slot_idx] + rank, num_rows)  # host pairs: a spare row, cut below
    pair_of_row = torch.full((num_rows + 1,), pairs, dtype=torch.int32, device=device)
    pair_of_row.scatter_(0, row, order.to(torch.int32))
    pair_of_row = pair_of_row[:num_rows]
    block_end = torch.cumsum(padded, 0) // block_m  # [S]
    blocks = torch.arange(num_rows // block_m, device=device)
    slot_of_block = torch.searchsorted(block_end, blocks, right=True)
    slot_of_block = torch.where(slot_of_block < num_slots, slot_of_block, -1).to(torch.int32)
    return pair_of_row, slot_of_block


def _parts(weights: torch.Tensor | QuantizedWeights) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The kernel's weight and scale tensors (a weight tensor stands in for scales it has none
    of) and the QUANT code."""
    data, scales, code = weight_parts(weights)
    return data, data if scales is None else scales, code


def _scale_strides(scales: torch.Tensor) -> tuple[int, int, int]:
    """(slot, row, group) strides of scales [S, rows] (int8), [S, rows, groups] (int4) or
    [S, row blocks, column blocks] (fp8)."""
    return (*scales.stride()[:2], scales.stride(2) if scales.dim() == 3 else 0)


def prepare_launch(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor | QuantizedWeights,
    w2: torch.Tensor | QuantizedWeights,
    slot_of_expert: torch.Tensor,
    config: LaunchConfig | None = None,
) -> Callable[[torch.Tensor], None]:
    """Everything of a call but the kernel: returns launch(out), which runs only the kernel, adding
    the resident experts' contributions into `out` ([T, H] fp32), so that it can be timed alone.
    Few pairs take the GEMV-shaped kernel (one launch, nothing prepared), more the grouped one."""
    num_slots, two_i, hidden = w13.shape
    intermediate = two_i // 2
    pairs = topk_ids.numel()
    config = config or launch_config(x.device, x.dtype, slot_of_expert.numel(), hidden, intermediate)
    (w13, s13, quant), (w2, s2, _) = _parts(w13), _parts(w2)
    strides = (x.stride(0), x.stride(1), *w13.stride(), *w2.stride(), *_scale_strides(s13), *_scale_strides(s2))
    if pairs <= config.few_pairs_max:
        ids, weights = topk_ids.contiguous(), topk_weights.contiguous()
        grid = (num_slots, triton.cdiv(intermediate, config.gemv_block_i))
        block_p = max(16, triton.next_power_of_2(pairs))  # tl.dot takes 16 rows at least

        def launch(out: torch.Tensor) -> None:
            _few_pairs_moe_kernel[grid](
                x, w13, w2, s13, s2, out, ids, weights, slot_of_expert, pairs, hidden, intermediate,
                topk_ids.shape[1], *strides, out.stride(0), out.stride(1),
                BLOCK_P=block_p, BLOCK_I=config.gemv_block_i, BLOCK_H=config.gemv_block_h, QUANT=quant,
                num_warps=config.gemv_warps)
        return launch
    pair_of_row, slot_of_block = group_pairs_by_slot(topk_ids, slot_of_expert, num_slots, config.block_m)
    pair_weight = topk_weights.flatten().to(torch.float32).contiguous()
    grid = (slot_of_block.numel(), triton.cdiv(intermediate, config.block_i))

    def launch(out: torch.Tensor) -> None:
        _grouped_moe_kernel[grid](
            x, w13, w2, s13, s2, out, pair_of_row, slot_of_block, pair_weight, pairs, hidden, intermediate,
            topk_ids.shape[1], *strides, out.stride(0), out.stride(1),
            BLOCK_M=config.block_m, BLOCK_I=config.block_i, BLOCK_H=config.block_h, QUANT=quant,
            num_warps=config.warps)
    return launch


def resident_experts_forward_triton(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor | QuantizedWeights,
    w2: torch.Tensor | QuantizedWeights,
    slot_of_expert: torch.Tensor,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """x [T, H]; topk_ids, topk_weights [T, K]; w13 [S, 2I, H]; w2 [S, H, I] (tensors of x's
    dtype, or both quantized); slot_of_expert [E] -> [T, H] in x's dtype: the contributions of
    the experts mapped to slots. No host sync; three launches for few pairs (zeros, the kernel,
    the cast)."""
    assert x.dim() == 2 and topk_ids.shape == topk_weights.shape and topk_ids.shape[0] == x.shape[0], (
        f"x {tuple(x.shape)}, topk_ids {tuple(topk_ids.shape)}, topk_weights {tuple(topk_weights.shape)}"
    )
    num_slots, two_i, hidden = w13.shape
    assert hidden == x.shape[1] and w2.shape == (num_slots, hidden, two_i // 2), (
        f"w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not match x {tuple(x.shape)}"
    )
    quantized = isinstance(w13, QuantizedWeights)
    assert quantized == isinstance(w2, QuantizedWeights), "w13 and w2 quantized alike"
    assert quantized or x.dtype == w13.dtype == w2.dtype, f"dtypes differ: x {x.dtype}, w13 {w13.dtype}, w2 {w2.dtype}"
    tensors = (topk_ids, topk_weights, *_parts(w13)[:2], *_parts(w2)[:2], slot_of_expert)
    assert all(t.device == x.device for t in tensors), "mixed devices"
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if num_slots == 0 or x.shape[0] == 0:
        return out.to(x.dtype)
    prepare_launch(x, topk_ids, topk_weights, w13, w2, slot_of_expert, config)(out)
    return out.to(x.dtype)

"""Experts stored in fewer bytes: weight-only int8, int4 and fp8, quantized once from the loaded
weights (fp8 also as a checkpoint publishes it).

- `int8`: symmetric, a scale per output channel (row): w[r, c] ~ q[r, c] * scale[r], q in
  [-127, 127], scales fp32.
- `int4`: symmetric, groups of `INT4_GROUP` along the input (columns), a bf16 scale per group:
  w[r, c] ~ q[r, c] * scale[r, c // 128], q in [-8, 7], stored as q + 8 in a nibble. Each 64
  columns are 32 bytes, byte j holding column j in its low nibble and column j + 32 in its high
  one, so that a vector load of 32 bytes yields 64 consecutive columns in two halves
  (csrc/cpu_quantized.c). 0.5 bytes per weight and 2 per 128 for the scales: 0.516.
- `fp8`: float8 e4m3 (torch.float8_e4m3fn bits, held as uint8) in blocks of 128 x 128, a fp32
  scale per block: w[r, c] ~ fp8(q[r, c]) * scale[r // 128, c // 128], the layout DeepSeek-V3's and
  Qwen3's FP8 checkpoints publish (`weight_block_size` [128, 128], `weight_scale_inv`). 1 byte per
  weight and 4 per 16,384 for the scales. Quantized here, the scales are powers of two.

A weight tensor is [E, rows, cols] (w13 [E, 2I, H], w2 [E, H, I]); `QuantizedWeights` keeps
the same logical shape and indexes by expert like a tensor. The torch reference of an expert in
these formats is `expert_mlp` on them: their dequantised weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from daop_vllm.core.errors import DaopConfigError

FORMATS = ("bf16", "int8", "int4", "fp8")
# The kernels' codes for the weights' format: FMT_* in csrc/cpu_common.h, QUANT in triton_moe.py
FORMAT_CODES = {"bf16": 0, "int8": 1, "int4": 2, "fp8": 3}
INT4_GROUP = 128
FP8_BLOCK = 128  # rows and columns of a block that shares one scale
_FP8_MAX = 448.0  # e4m3's largest finite value
_INT4_BLOCK = 64  # columns whose nibbles share 32 bytes
_INT8_MAX, _INT4_MIN, _INT4_MAX = 127, -8, 7


@dataclass(frozen=True)
class QuantizedWeights:
    """The experts' quantized values `data` and their `scales`, for weights of logical `shape`
    [E, rows, cols]: int8 [E, rows, cols] with fp32 scales [E, rows]; int4 uint8
    [E, rows, cols / 2] with bf16 scales [E, rows, cols / 128]; fp8 uint8 (e4m3 bits)
    [E, rows, cols] with fp32 scales [E, rows / 128, cols / 128]."""

    format: str
    data: torch.Tensor
    scales: torch.Tensor
    shape: torch.Size

    def __getitem__(self, expert: int) -> QuantizedWeights:
        return QuantizedWeights(self.format, self.data[expert], self.scales[expert], self.shape[1:])

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()

    def is_contiguous(self) -> bool:
        return self.data.is_contiguous() and self.scales.is_contiguous()

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data, self.scales

    def empty_slots(self, num_slots: int, device: torch.device) -> QuantizedWeights:
        """Room for `num_slots` experts of this format on `device`."""
        data, scales = (torch.empty((num_slots, *t.shape[1:]), dtype=t.dtype, device=device) for t in self.tensors)
        return QuantizedWeights(self.format, data, scales, torch.Size((num_slots, *self.shape[1:])))


def weight_parts(weights: torch.Tensor | QuantizedWeights) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """What the kernels read of expert weights: the values, the scales (None for weights as
    loaded) and the format's code."""
    if isinstance(weights, QuantizedWeights):
        return weights.data, weights.scales, FORMAT_CODES[weights.format]
    return weights, None, FORMAT_CODES["bf16"]


def check_format(name: str, cols: int | None = None, what: str = "experts", rows: int | None = None) -> None:
    """Raises DaopConfigError (one line) for a format name we do not know, int4 on a weight
    whose input size is not a multiple of the group size, or fp8 on one whose sizes are not
    multiples of the block's."""
    if name not in FORMATS:
        raise DaopConfigError(f"expert format {name!r} is not one of {', '.join(FORMATS)}")
    if name == "int4" and cols is not None and cols % INT4_GROUP:
        raise DaopConfigError(f"int4 {what} need input sizes that are multiples of {INT4_GROUP}; got {cols}")
    if name == "fp8" and any(size is not None and size % FP8_BLOCK for size in (rows, cols)):
        raise DaopConfigError(f"fp8 {what} need sizes that are multiples of {FP8_BLOCK} (blocks of "
                              f"{FP8_BLOCK} x {FP8_BLOCK}); got {rows} x {cols}")


def bytes_per_weight(name: str, element_size: int = 2) -> float:
    """Bytes one weight takes in host memory in format `name`, its share of the scales included
    (bf16: `element_size`, the loaded dtype's)."""
    check_format(name)
    return {"bf16": float(element_size), "int8": 1.0, "int4": 0.5 + 2 / INT4_GROUP,
            "fp8": 1.0 + 4 / FP8_BLOCK**2}[name]


def quantize(weights: torch.Tensor, name: str) -> QuantizedWeights:
    """[E, rows, cols] (or [rows, cols]) weights in format `name` (int8, int4 or fp8), computed in
    fp32 an expert at a time (no fp32 copy of every expert at once)."""
    check_format(name, weights.shape[-1], rows=weights.shape[-2])
    if name == "bf16":
        raise ValueError("bf16 experts are kept as loaded, not quantized")
    if weights.dim() == 2:
        return _quantize_matrix(weights, name)
    parts = [_quantize_matrix(expert, name) for expert in weights]
    data = torch.stack([p.data for p in parts]) if parts else torch.empty(0, dtype=torch.uint8)
    scales = torch.stack([p.scales for p in parts]) if parts else torch.empty(0)
    return QuantizedWeights(name, data, scales, weights.shape)


def _quantize_matrix(weights: torch.Tensor, name: str) -> QuantizedWeights:
    w = weights.float()
    if name == "fp8":
        blocks = w.unflatten(-1, (-1, FP8_BLOCK)).unflatten(0, (-1, FP8_BLOCK))  # [rows/B, B, cols/B, B]
        # powers of two (as DeepSeek-V3.1's UE8M0 scales): q * scale is then exact in bf16 too, and
        # e4m3 keeps its 3 mantissa bits over the block's range (only its top octave may go unused)
        scales = torch.exp2(torch.ceil(torch.log2(
            (blocks.abs().amax(dim=(1, 3)) / _FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny))))
        q = (blocks / scales[:, None, :, None]).to(torch.float8_e4m3fn).flatten(2).flatten(0, 1)
        return QuantizedWeights(name, q.view(torch.uint8), scales, weights.shape)
    if name == "int8":
        scales = w.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny) / _INT8_MAX
        data = torch.round(w / scales[..., None]).clamp_(-_INT8_MAX, _INT8_MAX).to(torch.int8)
        return QuantizedWeights(name, data, scales, weights.shape)
    groups = w.unflatten(-1, (-1, INT4_GROUP))  # [rows, cols / 128, 128]
    # bf16 scales as stored; the values are rounded against the stored scale
    scales = (groups.abs().amax(dim=-1) / _INT4_MAX).to(torch.bfloat16)
    scales = torch.where(scales.float() > 0, scales, torch.ones_like(scales))  # an all-zero group
    q = (torch.round(groups / scales.float()[..., None]).clamp_(_INT4_MIN, _INT4_MAX) - _INT4_MIN).to(torch.uint8)
    blocks = q.flatten(-2).unflatten(-1, (-1, 2, _INT4_BLOCK // 2))  # [rows, blocks, low / high half, 32]
    data = blocks[..., 0, :] | (blocks[..., 1, :] << 4)
    return QuantizedWeights(name, data.flatten(-2).contiguous(), scales.contiguous(), weights.shape)


def dequantize(weights: QuantizedWeights, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weights the quantized values stand for, [.., rows, cols] in `dtype` (rounded once)."""
    if weights.format == "fp8":
        scales = weights.scales.repeat_interleave(FP8_BLOCK, dim=-2).repeat_interleave(FP8_BLOCK, dim=-1)
        return (weights.data.view(torch.float8_e4m3fn).float() * scales).to(dtype)
    if weights.format == "int8":
        return (weights.data.float() * weights.scales[..., None]).to(dtype)
    blocks = weights.data.unflatten(-1, (-1, _INT4_BLOCK // 2))  # [..., blocks, 32]
    q = torch.stack((blocks & 0xF, blocks >> 4), dim=-2).flatten(-3).float() + _INT4_MIN  # [..., cols]
    scales = weights.scales.float().repeat_interleave(INT4_GROUP, dim=-1)
    return (q * scales).to(dtype)


def from_checkpoint_fp8(values: torch.Tensor, scale_inv: torch.Tensor) -> QuantizedWeights:
    """fp8 weights as a block-quantized checkpoint holds them (float8_e4m3fn values [.., rows,
    cols], `weight_scale_inv` [.., rows / 128, cols / 128]: what the values are multiplied by)."""
    check_format("fp8", values.shape[-1], rows=values.shape[-2])
    blocks = (values.shape[-2] // FP8_BLOCK, values.shape[-1] // FP8_BLOCK)
    if tuple(scale_inv.shape[-2:]) != blocks:
        raise DaopConfigError(f"fp8 weights {tuple(values.shape)} need block scales of {blocks}, got "
                              f"{tuple(scale_inv.shape)}")
    return QuantizedWeights("fp8", values.view(torch.uint8), scale_inv.float(), values.shape)

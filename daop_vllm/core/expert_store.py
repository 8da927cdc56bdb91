"""Host memory holding every routed expert of one MoE layer."""

from __future__ import annotations

import weakref

import torch

from daop_vllm.core.quantized_experts import FP8_BLOCK, QuantizedWeights, check_format, quantize


def pin_in_place(tensor: torch.Tensor) -> None:
    """Page-lock `tensor`'s memory for the CUDA driver, at its exact size, until the tensor is
    freed. `torch.empty(..., pin_memory=True)` goes through torch's caching host allocator,
    which rounds each allocation up to a power of two: Mixtral's w13 of one layer (1.75 GiB)
    took 2 GiB, ~96 GiB pinned for 84 GiB of experts."""
    cudart = torch.cuda.cudart()
    nbytes = tensor.numel() * tensor.element_size()
    status = cudart.cudaHostRegister(tensor.data_ptr(), nbytes, 0)
    if int(status) != 0:
        raise RuntimeError(f"cudaHostRegister of {nbytes / 2**30:.2f} GiB of expert weights failed ({status})")
    weakref.finalize(tensor.untyped_storage(), cudart.cudaHostUnregister, tensor.data_ptr())


def tensors_of(weights: torch.Tensor | QuantizedWeights) -> tuple[torch.Tensor, ...]:
    """The tensors that hold expert weights: the tensor, or a quantized one's values and scales."""
    return weights.tensors if isinstance(weights, QuantizedWeights) else (weights,)


class HostExpertStore:
    """All E experts of one layer in host memory, in the fused layout vLLM uses:
    w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I], in the loaded `dtype`, or after
    `quantize` in a smaller `format` (quantized_experts.py); or, for a checkpoint that publishes
    them so (`checkpoint_format` fp8), loaded in that format directly, `dtype` the activations'.

    `device_w13` and `device_w2` are what device slots copy: the same tensors, or where the
    device's format differs (`device_format`) every expert a second time in that format, since
    re-allocation may bring any expert to the device.

    Pinned when a CUDA device exists, so that copies to device slots run asynchronously.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype,
        pin_memory: bool,
        checkpoint_format: str = "bf16",
    ) -> None:
        shape13 = (num_experts, 2 * intermediate_size, hidden_size)
        shape2 = (num_experts, hidden_size, intermediate_size)
        self.w13: torch.Tensor | QuantizedWeights
        self.w2: torch.Tensor | QuantizedWeights
        if checkpoint_format == "fp8":
            check_format("fp8", hidden_size, rows=intermediate_size, what="the checkpoint's experts")
            self.w13, self.w2 = (QuantizedWeights(
                "fp8", torch.empty(shape, dtype=torch.uint8, device="cpu"),
                torch.empty((num_experts, shape[1] // FP8_BLOCK, shape[2] // FP8_BLOCK), dtype=torch.float32,
                            device="cpu"),
                torch.Size(shape)) for shape in (shape13, shape2))
        elif checkpoint_format == "bf16":
            self.w13 = torch.empty(shape13, dtype=dtype, device="cpu")
            self.w2 = torch.empty(shape2, dtype=dtype, device="cpu")
        else:
            raise ValueError(f"experts load as bf16 (the model's dtype) or fp8, not {checkpoint_format!r}")
        self.dtype = dtype  # the loaded weights' and the activations'
        self.format = checkpoint_format  # bf16: as loaded, in `dtype`
        self.device_w13, self.device_w2, self.device_format = self.w13, self.w2, self.format
        self.pinned = pin_memory
        if pin_memory:
            for tensor in tensors_of(self.w13) + tensors_of(self.w2):
                pin_in_place(tensor)

    def quantize(self, name: str, device_name: str | None = None) -> None:
        """Store the host's experts in format `name` and the device's in `device_name` (default:
        the same), once, after they are loaded (bf16 keeps them as loaded). The loaded tensors
        are dropped where neither format is bf16: whoever else holds them must let go too."""
        device_name = name if device_name is None else device_name
        if (name, device_name) == (self.format, self.device_format):
            return
        if self.format != "bf16" or self.device_format != "bf16":
            raise ValueError(f"the experts are {self.format} already")
        stored = {"bf16": (self.w13, self.w2)}
        for fmt in {name, device_name} - {"bf16"}:
            stored[fmt] = quantize(self.w13, fmt), quantize(self.w2, fmt)
            if self.pinned:
                for tensor in stored[fmt][0].tensors + stored[fmt][1].tensors:
                    pin_in_place(tensor)
        (self.w13, self.w2), self.format = stored[name], name
        (self.device_w13, self.device_w2), self.device_format = stored[device_name], device_name

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def flops_per_token(self) -> int:
        """FLOPs of one token through one expert: a multiply-add per weight of w1, w3 and w2."""
        _, hidden, intermediate = self.w2.shape
        return 6 * hidden * intermediate

    @property
    def expert_bytes(self) -> int:
        """Host bytes of one expert (w1, w3 and w2) as stored, scales included: what the CPU reads."""
        return self._bytes_per_expert(self.w13, self.w2)

    @property
    def device_expert_bytes(self) -> int:
        """Bytes of one expert in the device's format: what a slot holds and a copy moves."""
        return self._bytes_per_expert(self.device_w13, self.device_w2)

    def _bytes_per_expert(self, w13: torch.Tensor | QuantizedWeights, w2: torch.Tensor | QuantizedWeights) -> int:
        return sum(t.numel() * t.element_size() for t in tensors_of(w13) + tensors_of(w2)) // self.num_experts

    @property
    def host_bytes(self) -> int:
        """Host memory the store holds: its tensors' own bytes (allocated at that size), both
        formats where the device's differs."""
        tensors = {id(t): t for w in (self.w13, self.w2, self.device_w13, self.device_w2) for t in tensors_of(w)}
        return sum(t.untyped_storage().nbytes() for t in tensors.values())

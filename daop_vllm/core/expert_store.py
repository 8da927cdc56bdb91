"""Host memory holding every routed expert of one MoE layer."""

from __future__ import annotations

import torch


class HostExpertStore:
    """All E experts of one layer in host memory, in the fused layout vLLM uses:
    w13 [E, 2I, H] (gate rows, then up rows) and w2 [E, H, I].

    Pinned when a CUDA device exists, so that copies to device slots run asynchronously.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype,
        pin_memory: bool,
    ) -> None:
        shape13 = (num_experts, 2 * intermediate_size, hidden_size)
        shape2 = (num_experts, hidden_size, intermediate_size)
        self.w13 = torch.empty(shape13, dtype=dtype, device="cpu", pin_memory=pin_memory)
        self.w2 = torch.empty(shape2, dtype=dtype, device="cpu", pin_memory=pin_memory)

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert (w1, w3 and w2)."""
        return (self.w13[0].numel() + self.w2[0].numel()) * self.w13.element_size()

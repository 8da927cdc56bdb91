"""Re-allocation policies: which host-resident experts take the place of device-resident ones."""

from __future__ import annotations

import torch

REALLOC_POLICIES = ("off", "paper")


def paper_swaps(
    counts: torch.Tensor, resident: list[int], swap_threshold: float = 1.05
) -> list[tuple[int, int]]:
    """The DAOP paper's rule for one layer after a sequence's prefill.

    counts [E]: prompt tokens per expert. Up to E/2 host-resident experts with the most tokens
    ("hot", descending) are paired in order with up to E/2 device-resident ones with the fewest
    ("cold", ascending); a pair swaps when count[hot] > swap_threshold * count[cold]. Returns
    (hot, cold) pairs; one for one, so the layer keeps its quota.
    """
    num_experts = counts.numel()
    candidates = num_experts // 2
    on_device = set(resident)
    values = counts.tolist()
    hot = sorted((e for e in range(num_experts) if e not in on_device), key=lambda e: (-values[e], e))[:candidates]
    cold = sorted(on_device, key=lambda e: (values[e], e))[:candidates]
    return [(h, c) for h, c in zip(hot, cold) if values[h] > swap_threshold * values[c]]

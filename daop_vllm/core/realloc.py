"""Re-allocation policies: which host-resident experts take the place of device-resident ones."""

from __future__ import annotations

import torch

REALLOC_POLICIES = ("auto", "paper", "off")
# "auto" re-evaluates every this many steps during decode (and whenever a prompt completes).
AUTO_INTERVAL_STEPS = 8


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


def auto_swaps(
    demand: torch.Tensor, resident: list[int], saving_per_token: float, swap_seconds: float, hysteresis: float = 1.0
) -> list[tuple[int, int]]:
    """The `auto` rule for one layer: demand [E] is the (token, expert) work expected over the
    requests in flight. Host-resident experts by demand (descending) pair with device-resident
    ones (ascending); a pair swaps when the time its demand difference saves beats the copy
    with margin: (d[hot] - d[cold]) * saving_per_token > (1 + hysteresis) * swap_seconds, and
    d[hot] > (1 + hysteresis / 10) * d[cold]. The margin pays for a possible copy back, so two
    requests with different experts do not make them ping-pong."""
    on_device = set(resident)
    values = demand.tolist()
    hot = sorted((e for e in range(len(values)) if e not in on_device), key=lambda e: (-values[e], e))
    cold = sorted(on_device, key=lambda e: (values[e], e))
    swaps = []
    for h, c in zip(hot, cold):
        gain = (values[h] - values[c]) * saving_per_token
        if gain <= (1 + hysteresis) * swap_seconds or values[h] <= (1 + hysteresis / 10) * values[c]:
            break  # pairs are in order of decreasing gain
        swaps.append((h, c))
    return swaps

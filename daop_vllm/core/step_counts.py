"""One step's routing counts, kept where the routing is and folded into the counters once.

Counting each layer's routing on the host would copy its expert ids there, a device sync per
layer, even in layers whose experts are all on the device. Instead each layer adds its routing
into [L, R+1, E] counts on the routing's device (R requests, and a last row for rows of no
request: padding, or every row outside engine steps), and the step's end copies them once.

Legend: L layers, R the step's requests, E experts, T rows, K top-k.
"""

from __future__ import annotations

import torch

from daop_vllm.core.stats import DaopStats


class StepCounts:
    """`executed`: the routing each layer ran (device/CPU counters); `chosen`: its own router's
    choice (per-request demand for re-allocation), which differs only where a prediction or
    degradation rerouted decode rows (elsewhere only `executed` is counted, and copied)."""

    def __init__(self) -> None:
        self._counts: torch.Tensor | None = None  # [2, L, R+1, E]: executed, chosen
        self._rerouted: set[int] = set()  # layers whose chosen routing was counted apart
        self._one: torch.Tensor | None = None

    def clear(self) -> None:
        self._counts = None
        self._rerouted = set()

    def add(self, layer: int, count_rows: torch.Tensor, executed: torch.Tensor, chosen: torch.Tensor,
            shape: tuple[int, int, int]) -> None:
        """count_rows [T]: each row's request index, R for rows of no request; the ids [T, K];
        all on one device. `shape`: (L, R, E) of the step."""
        num_layers, num_requests, num_experts = shape
        if self._counts is None:
            self._counts = torch.zeros(2, num_layers, num_requests + 1, num_experts, device=executed.device)
            self._one = torch.ones((), device=executed.device)
        rows = count_rows[:, None].expand_as(executed)
        self._counts[0, layer].index_put_((rows, executed), self._one, accumulate=True)
        if chosen is not executed:
            self._counts[1, layer].index_put_((rows, chosen), self._one, accumulate=True)
            self._rerouted.add(layer)

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(executed, chosen) [L, R+1, E] on the host, and zeroed; None when nothing was added."""
        counts, rerouted = self._counts, self._rerouted
        self.clear()
        if counts is None:
            return None
        executed = counts[0].cpu()  # the step's one copy (two where a layer was rerouted)
        if not rerouted:
            return executed, executed
        chosen = executed.clone()
        layers = sorted(rerouted)
        chosen[layers] = counts[1, layers].cpu()
        return executed, chosen


def add_to_stats(stats: DaopStats, layers: list[int], executed: torch.Tensor, is_resident: torch.Tensor,
                 prefill: tuple[bool, ...] | None) -> None:
    """The executed counts [L', R+1, E] of `layers` into the device/CPU counters (every row)
    and, with the requests' prefill flags [R], the per-phase ones (rows of a request only);
    is_resident [L', E]. A handful of tensor ops for all layers at once, one read of the sums."""
    on_device = (executed * is_resident[:, None, :]).sum(-1)  # [L', R+1] device pairs per request row
    total = executed.sum(-1)
    groups = torch.zeros(executed.shape[1], 3, device="cpu")  # rows summed: all, prefill, decode
    groups[:, 0] = 1
    if prefill is not None:
        flags = torch.tensor(prefill, dtype=torch.float32, device="cpu")
        groups[:-1, 1], groups[:-1, 2] = flags, 1 - flags
    sums = (torch.stack([on_device, total]) @ groups).round().to(torch.int64).tolist()  # [2, L', 3]
    for index, layer in enumerate(layers):
        (device, device_prefill, device_decode), (every, prefill_rows, decode_rows) = (sums[0][index],
                                                                                      sums[1][index])
        counts = {"device_expert_tokens": device, "cpu_expert_tokens": every - device}
        if prefill is not None:
            counts.update(prefill_device_expert_tokens=device_prefill,
                          prefill_cpu_expert_tokens=prefill_rows - device_prefill,
                          decode_device_expert_tokens=device_decode, decode_cpu_expert_tokens=decode_rows - device_decode)
        stats.add(layer, **counts)

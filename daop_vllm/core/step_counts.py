"""One step's routing counts, kept where the routing is and folded into the counters once.

Counting each layer's routing on the host would copy its expert ids there, a device sync per
layer, even in layers whose experts are all on the device. Instead each layer adds its routing
into [L, R+1, E] counts on the routing's device (R requests, and a last row for rows of no
request: padding, or every row outside engine steps), and the step's end copies them once.

Legend: L layers, R the step's requests, E experts, T rows, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from daop_vllm.core.batch import StepBatch
from daop_vllm.core.stats import DaopStats


@dataclass(frozen=True)
class PredictionOutcome:
    """How one layer's prediction fared, counted at the step's end: the predicted ids before
    degradation [R, K] for the rows `rows` [R]; the layer's own routing [T, K]; of the
    pre-computed pairs [P], those its routing used and those the staleness gate turned away
    (None: no gate)."""

    layer: int
    raw_ids: torch.Tensor
    rows: torch.Tensor
    own_ids: torch.Tensor
    used: torch.Tensor
    rejected: torch.Tensor | None


class StepCounts:
    """`executed`: the routing each layer ran (device/CPU counters); `chosen`: its own router's
    choice (per-request demand for re-allocation), which differs only where a prediction or
    degradation rerouted decode rows (elsewhere only `executed` is counted, and copied).

    A layer's `add` only keeps its ids; `take` counts every layer's at once (a handful of ops
    per step instead of one scatter per layer, which at batch 1 cost as much as the experts)."""

    def __init__(self) -> None:
        self._added: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self._shape: tuple[int, int, int] | None = None
        self.resident: list[tuple[int, int, int]] = []  # (layer, rows, top-k) of layers that ran on the device alone
        self.predictions: list[PredictionOutcome] = []
        self.degraded: list[tuple[int, torch.Tensor]] = []  # (layer, [R] bool: the rows degradation rerouted)

    def clear(self) -> None:
        self._added = []
        self.resident = []
        self.predictions = []
        self.degraded = []

    def take_predictions(self) -> tuple[list[PredictionOutcome], list[tuple[int, torch.Tensor]]]:
        """The step's prediction outcomes and degraded rows (add_predictions_to_stats), zeroed."""
        taken = self.predictions, self.degraded
        self.predictions, self.degraded = [], []
        return taken

    def add(self, layer: int, count_rows: torch.Tensor, executed: torch.Tensor, chosen: torch.Tensor,
            shape: tuple[int, int, int]) -> None:
        """count_rows [T]: each row's request index, R for rows of no request; the ids [T, K];
        all on one device. `shape`: (L, R, E) of the step."""
        self._shape = shape
        self._added.append((layer, count_rows, executed, None if chosen is executed else chosen))

    def add_resident(self, layer: int, rows: int, top_k: int) -> None:
        """A layer whose every expert is resident ran all its pairs on the device: its counters
        follow from the rows alone, and its routing needs no reading (nor re-allocation)."""
        self.resident.append((layer, rows, top_k))

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None, list[tuple[int, int, int]]]:
        """(executed, chosen) [L, R+1, E] on the host (None when no layer added its routing),
        and the `resident` layers; all zeroed."""
        added, resident = self._added, self.resident
        self.clear()
        if not added:
            return None, None, resident
        num_layers, num_requests, num_experts = self._shape
        device = added[0][2].device
        counts = torch.zeros(2 * num_layers * (num_requests + 1) * num_experts, device=device)
        indices = [self._flat_indices(0, added)]
        rerouted = [entry for entry in added if entry[3] is not None]
        if rerouted:
            indices.append(self._flat_indices(1, [(layer, rows, chosen, None) for layer, rows, _, chosen in rerouted]))
        flat = torch.cat(indices) if len(indices) > 1 else indices[0]
        counts.index_put_((flat,), torch.ones((), device=device), accumulate=True)
        counts = counts.view(2, num_layers, num_requests + 1, num_experts)
        executed = counts[0].cpu()  # the step's one copy (two where a layer was rerouted)
        if not rerouted:
            return executed, executed, resident
        chosen = executed.clone()
        layers = sorted({layer for layer, *_ in rerouted})
        chosen[layers] = counts[1, layers].cpu()
        return executed, chosen, resident

    def _flat_indices(self, which: int, added: list) -> torch.Tensor:
        """Flat indices into [2, L, R+1, E] (`which`: executed 0, chosen 1) of every pair of
        `added`: one stack where the layers share their rows (a step's), else one per layer."""
        num_layers, num_requests, num_experts = self._shape
        rows = added[0][1]
        if all(entry[1] is rows for entry in added):
            ids = torch.stack([entry[2] for entry in added])  # [n, T, K]
            layers = torch.tensor([entry[0] for entry in added], device=ids.device)
            base = (which * num_layers + layers[:, None]) * (num_requests + 1) + rows[None, :]  # [n, T]
            return (base[:, :, None] * num_experts + ids).reshape(-1)
        return torch.cat([self._flat_indices(which, [entry]) for entry in added])


def add_to_stats(stats: DaopStats, layers: list[int], executed: torch.Tensor, is_resident: torch.Tensor,
                 prefill: tuple[bool, ...] | None) -> None:
    """The executed counts [L', R+1, E] of `layers` into the device/CPU counters and, with the
    requests' prefill flags [R], the per-phase ones; is_resident [L', E]. In an engine step
    (flags given) only the rows of a request count: the last row holds padding (CUDA graphs pad
    a batch to a captured size), which is no one's work; outside steps every row does. A handful
    of tensor ops for all layers at once, one read of the sums."""
    on_device = (executed * is_resident[:, None, :]).sum(-1)  # [L', R+1] device pairs per request row
    total = executed.sum(-1)
    groups = torch.zeros(executed.shape[1], 3, device="cpu")  # rows summed: all, prefill, decode
    groups[:, 0] = 1
    if prefill is not None:
        flags = torch.tensor(prefill, dtype=torch.float32, device="cpu")
        groups[:-1, 1], groups[:-1, 2] = flags, 1 - flags
        groups[-1, 0] = 0  # padding
    sums = torch.stack([on_device, total]) @ groups  # [2, L', 3]: (device, every) x (all, prefill, decode)
    counters = torch.stack([sums[0], sums[1] - sums[0]])  # [2 (device, cpu), L', 3 (phase)]
    names = [("device_expert_tokens", "cpu_expert_tokens")]
    if prefill is not None:
        names += [("prefill_device_expert_tokens", "prefill_cpu_expert_tokens"),
                  ("decode_device_expert_tokens", "decode_cpu_expert_tokens")]
    values = counters.permute(2, 0, 1).round().to(torch.int64).tolist()  # [phase, device/cpu, L']
    stats.add_per_layer(layers, **{name: values[phase][side] for phase, pair in enumerate(names)
                                   for side, name in enumerate(pair)})


def add_resident_to_stats(stats: DaopStats, resident: list[tuple[int, int, int]], batch: StepBatch | None) -> None:
    """The counters of layers that ran on the device alone ((layer, rows, top-k)): every pair
    a device pair, padding rows past the batch's left out; per phase, the rows of the batch's
    prompt and generated tokens (as add_to_stats counts them: none where the rows do not match
    the batch)."""
    if not resident:
        return
    alike: dict[tuple[int, int], dict[str, int]] = {}  # a step's layers share their rows and top-k
    counts = []
    for _, rows, top_k in resident:
        if (rows, top_k) not in alike:
            alike[rows, top_k] = _resident_counts(rows, top_k, batch)
        counts.append(alike[rows, top_k])
    stats.add_per_layer([layer for layer, _, _ in resident], **{name: [c[name] for c in counts] for name in counts[0]})


def _resident_counts(rows: int, top_k: int, batch: StepBatch | None) -> dict[str, int]:
    if batch is None:
        return {"device_expert_tokens": rows * top_k}
    if rows < batch.num_rows:  # rows that do not cover the batch (a dummy run's): counted in no phase
        return {"device_expert_tokens": rows * top_k, "prefill_device_expert_tokens": 0,
                "decode_device_expert_tokens": 0}
    prefill_rows = sum(n for n, prefill in zip(batch.rows, batch.prefill) if prefill)
    return {"device_expert_tokens": batch.num_rows * top_k, "prefill_device_expert_tokens": prefill_rows * top_k,
            "decode_device_expert_tokens": (batch.num_rows - prefill_rows) * top_k}


def add_predictions_to_stats(stats: DaopStats, outcomes: list[PredictionOutcome],
                             degraded: list[tuple[int, torch.Tensor]]) -> None:
    """A step's prediction counters, for every layer at once (a layer counting its own read
    a handful of sums back, each an op of its own, in every predicted layer)."""
    n = len(outcomes)
    counted = _true_counts([outcome.used for outcome in outcomes] + [outcome.rejected for outcome in outcomes]
                           + [rows for _, rows in degraded])
    if degraded:
        stats.add_per_layer([layer for layer, _ in degraded], degraded=counted[2 * n:])
    if not outcomes:
        return
    used, rejected = counted[:n], counted[n:2 * n]
    stats.add_per_layer([outcome.layer for outcome in outcomes],
                        predictions=[outcome.raw_ids.numel() for outcome in outcomes],
                        predictions_correct=_correct_predictions(outcomes).tolist(), precomputed_used=used,
                        precomputed_rejected=rejected,
                        precomputed_wasted=[outcome.used.numel() - u - r
                                            for outcome, u, r in zip(outcomes, used, rejected)])


def _true_counts(flags: list[torch.Tensor | None]) -> list[int]:
    """The number of True elements of each of the 1-d bool tensors `flags` (0 for None), in one read."""
    present = [f for f in flags if f is not None]
    if not present:
        return [0] * len(flags)
    owner = torch.repeat_interleave(torch.arange(len(present)), torch.tensor([f.numel() for f in present]))
    counts = iter(torch.zeros(len(present), dtype=torch.int64).index_add_(0, owner, torch.cat(present).long()).tolist())
    return [0 if f is None else next(counts) for f in flags]


def _correct_predictions(outcomes: list[PredictionOutcome]) -> torch.Tensor:
    """[n] per outcome, the (row, predicted expert) pairs its layer's own router also chose: one
    stack where the layers share their rows (a step's), else one per layer."""
    rows = outcomes[0].rows
    if all(outcome.rows is rows for outcome in outcomes):
        predicted = torch.stack([outcome.raw_ids for outcome in outcomes])  # [n, R, K]
        own = torch.stack([outcome.own_ids for outcome in outcomes])[:, rows]  # [n, R, K]
        return (predicted[..., None] == own[..., None, :]).any(-1).sum((1, 2))
    return torch.cat([_correct_predictions([outcome]) for outcome in outcomes])

"""DAOP's second mechanism, per token row: at layer i, layer i+1's router applied to layer i's
MoE input predicts layer i+1's experts; the predicted host-resident ones start on the CPU at
once, with layer i's input, and layer i+1 consumes the results. Graceful degradation keeps at
most one host-resident expert per predicted row.

Legend: T rows in the step, R predicted (decode) rows, K top-k, E experts, P pre-computed
(row, expert) pairs. Everything here is on the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from daop_vllm.core.cpu_executor import CpuJob

MODES = ("exact", "verified", "daop")
# How far a row's input moved between the layer that pre-computed for it and the layer that uses
# it; the gate uses the cosine distance, which separates good pre-computed results from bad ones
# as well as the relative distance does on the trained model (benchmarks/stale_inputs.py) and
# ignores the two layers' different RMSNorm gains.
STALENESS_DISTANCE = "cosine_distance"
# The paper: the first four MoE blocks use their own router.
DEFAULT_FIRST_PREDICTED_LAYER = 4


@dataclass(frozen=True)
class Fidelity:
    """How a model's MoE layers trade accuracy for CPU time (the `mode` option and its knobs).

    exact: own router, CPU experts on their true input. verified: own router; a CPU expert
    that was predicted uses its result pre-computed from the previous layer's input. daop:
    decode rows of layers from `first_predicted_layer` on are routed by the prediction.

    `staleness_tolerance` gates both per row: a row whose input moved by `STALENESS_DISTANCE`
    (1 - cosine) of at least the tolerance since the layer before neither uses its pre-computed
    results nor its predicted routing; it runs as in `exact`. 0: every row does (`exact`'s
    output); None: no row does (no gate)."""

    mode: str = "exact"
    first_predicted_layer: int | None = None  # None: DEFAULT_FIRST_PREDICTED_LAYER, or L-1 if fewer
    degrade: bool | None = None  # None: on in daop, off in verified
    staleness_tolerance: float | None = None

    def first_layer(self, num_layers: int) -> int:
        if self.first_predicted_layer is not None:
            return self.first_predicted_layer
        return min(DEFAULT_FIRST_PREDICTED_LAYER, num_layers - 1)

    @property
    def degrades(self) -> bool:
        return self.degrade if self.degrade is not None else self.mode == "daop"


@dataclass
class Prediction:
    """Layer i+1's routing for the decode rows of one step, predicted at layer i, and the CPU
    work started for it: one result per (row, host-resident predicted expert) pair, keyed by
    row so that a row's result can only reach that row."""

    step: int
    num_rows: int  # T: the step's rows, padding included
    rows: torch.Tensor  # [R] the predicted rows
    raw_ids: torch.Tensor  # [R, K] before degradation: what prediction accuracy counts
    ids: torch.Tensor  # [R, K] after degradation (daop mode routes by these)
    weights: torch.Tensor  # [R, K]
    degraded_rows: torch.Tensor | None  # [R] bool: rows whose experts degradation replaced (None: it is off)
    pair_rows: torch.Tensor  # [P] step row of each pre-computed pair
    pair_experts: torch.Tensor  # [P]
    pair_ranks: torch.Tensor  # [P] each pair's place in its row's predicted experts (a column of `ids`)
    job: CpuJob | None  # its result [P, H] is each pair's unweighted expert output
    inputs: torch.Tensor | None = None  # [R, H] the predicting layer's input, where a tolerance gates
    staged_experts: list[int] = field(default_factory=list)  # host experts copied to staging rows a layer early
    staged: tuple | None = None  # their (w13, w2, slot table) in the staging rows
    # [P, H] each pair's input, where device and host are one memory: nothing to overlap there, so
    # the consuming layer computes the pairs its routing uses in its own job instead of a job here
    pair_inputs: torch.Tensor | None = None

    def fresh_rows(self, actual: torch.Tensor, tolerance: float | None) -> torch.Tensor | None:
        """[R] bool: the predicted rows whose input `actual` [T, H] (the consuming layer's) is
        within `tolerance` of the input they were pre-computed on; None without a gate."""
        if tolerance is None:
            return None
        return input_distance(self.inputs, actual[self.rows], STALENESS_DISTANCE) < tolerance

    def degraded(self, fresh: torch.Tensor | None) -> torch.Tensor | None:
        """[R] bool: the degraded rows among those the routing takes from the prediction (None:
        degradation is off)."""
        if self.degraded_rows is None or fresh is None:
            return self.degraded_rows
        return self.degraded_rows & fresh

    def keep_pairs(self, kept: torch.Tensor | slice) -> None:
        """Only the pairs `kept` (a mask or slice over them) stay to be pre-computed."""
        self.pair_rows, self.pair_experts, self.pair_ranks = (
            self.pair_rows[kept], self.pair_experts[kept], self.pair_ranks[kept])

    def discard(self) -> None:
        """Wait for the CPU work (its lane's workspace is about to be reused) and drop it;
        its results, or its failure, no longer matter."""
        if self.job is not None:
            try:
                self.job.result()
            except Exception:  # noqa: BLE001, S110 - nothing of it is used
                pass
            self.job = None


def degrade(
    ids: torch.Tensor, weights: torch.Tensor, scores: torch.Tensor, is_resident: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Graceful degradation: a row whose experts are all host-resident keeps its top-ranked
    one; the lower-ranked ones are replaced by the device-resident experts with the highest
    scores, and the weights are renormalised over the kept experts (same total as before).

    ids, weights [R, K] in rank order; scores [R, E] router probabilities; is_resident [E].
    Returns (ids, weights, degraded rows [R] bool). With fewer device-resident experts than
    K-1 a row keeps some of its lower-ranked host experts; with none it is unchanged."""
    top_k = ids.shape[1]
    substitutes = min(top_k - 1, int(is_resident.sum()))
    if substitutes == 0:
        return ids, weights, torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    degraded = ~is_resident[ids].any(dim=1)
    if not bool(degraded.any()):
        return ids, weights, degraded
    # Every row's substitutes at once, kept where a row degrades: cheaper than picking the rows out
    device_best = scores.masked_fill(~is_resident, float("-inf")).topk(substitutes, dim=1).indices
    parts = [ids[:, :1], device_best] + ([ids[:, 1 + substitutes:]] if 1 + substitutes < top_k else [])
    substituted = torch.cat(parts, dim=1)
    kept = scores.gather(1, substituted)  # fp32
    reweighted = kept / kept.sum(1, keepdim=True) * weights.sum(1, keepdim=True)
    rows = degraded[:, None]
    return (torch.where(rows, substituted, ids), torch.where(rows, reweighted.to(weights.dtype), weights), degraded)


def input_distance(earlier: torch.Tensor, actual: torch.Tensor, metric: str) -> torch.Tensor:
    """Per row of earlier, actual [R, H]: ||actual - earlier|| / ||actual|| (relative_distance)
    or 1 - cos(earlier, actual) (cosine_distance), in fp32; 0 for equal rows."""
    earlier, actual = earlier.float(), actual.float()
    if metric == "relative_distance":
        return (actual - earlier).norm(dim=-1) / actual.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    return 1 - torch.nn.functional.cosine_similarity(earlier, actual, dim=-1)


_TRUE = torch.tensor(True, device="cpu")


@dataclass
class PrecomputedMatch:
    """Which pre-computed pairs a layer's final routing uses."""

    covered: torch.Tensor  # [T, K] routing entries served by a pre-computed result
    used: torch.Tensor  # [P] pairs the routing uses
    weights: torch.Tensor  # [P] the routing weight of each used pair (0 where unused)
    rejected: torch.Tensor | None  # [P] pairs of rows the staleness gate turned away (None: no gate)
    every_pair_used: bool = False  # known without reading `used`

    @property
    def any_used(self) -> bool:
        return self.used.numel() > 0 if self.every_pair_used else bool(self.used.any())

    def used_pairs(self) -> torch.Tensor | slice:
        """An index of the used pairs into tensors with a row per pair."""
        return slice(None) if self.every_pair_used else self.used.nonzero().squeeze(1)


def match_precomputed(prediction: Prediction, ids: torch.Tensor, weights: torch.Tensor,
                      fresh: torch.Tensor | None = None) -> PrecomputedMatch:
    """Match the pre-computed pairs against the final routing ids, weights [T, K]; with
    `fresh` ([R] bool, Prediction.fresh_rows), only the pairs of fresh rows."""
    rows = prediction.pair_rows
    if ids is prediction.ids:  # every row routed by the prediction (R = T): each pair is where it was predicted
        place = (rows, prediction.pair_ranks)
        covered = torch.zeros(ids.shape, dtype=torch.bool, device="cpu").index_put_(place, _TRUE)
        return PrecomputedMatch(covered, torch.ones(rows.shape, dtype=torch.bool, device="cpu"), weights[place], None,
                                every_pair_used=True)
    match = ids[rows] == prediction.pair_experts[:, None]  # [P, K]
    rejected = None
    if fresh is not None:
        fresh_step_rows = torch.zeros(ids.shape[0], dtype=torch.bool)
        fresh_step_rows[prediction.rows] = fresh
        rejected = ~fresh_step_rows[rows]
        match &= ~rejected[:, None]
    covered = torch.zeros(ids.shape, dtype=torch.int64, device="cpu").index_add_(0, rows, match.long()) > 0
    return PrecomputedMatch(covered, match.any(dim=1), (weights[rows] * match).sum(dim=1), rejected)

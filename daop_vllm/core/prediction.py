"""DAOP's second mechanism, per token row: at layer i, layer i+1's router applied to layer i's
MoE input predicts layer i+1's experts; the predicted host-resident ones start on the CPU at
once, with layer i's input, and layer i+1 consumes the results. Graceful degradation keeps at
most one host-resident expert per predicted row.

Legend: T rows in the step, R predicted (decode) rows, K top-k, E experts, P pre-computed
(row, expert) pairs. Everything here is on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from daop_vllm.core.cpu_executor import CpuJob

MODES = ("exact", "verified", "daop")
# The paper: the first four MoE blocks use their own router.
DEFAULT_FIRST_PREDICTED_LAYER = 4


@dataclass(frozen=True)
class Fidelity:
    """How a model's MoE layers trade accuracy for CPU time (the `mode` option and its knobs).

    exact: own router, CPU experts on their true input. verified: own router; a CPU expert
    that was predicted uses its result pre-computed from the previous layer's input. daop:
    decode rows of layers from `first_predicted_layer` on are routed by the prediction."""

    mode: str = "exact"
    first_predicted_layer: int | None = None  # None: DEFAULT_FIRST_PREDICTED_LAYER, or L-1 if fewer
    degrade: bool | None = None  # None: on in daop, off in verified

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
    degraded: int  # rows whose experts degradation replaced
    pair_rows: torch.Tensor  # [P] step row of each pre-computed pair
    pair_experts: torch.Tensor  # [P]
    job: CpuJob | None  # its result [P, H] is each pair's unweighted expert output

    def correct_predictions(self, true_ids: torch.Tensor) -> int:
        """(row, predicted expert) pairs that the layer's own router also chose; true_ids [T, K]."""
        return int((self.raw_ids[:, :, None] == true_ids[self.rows][:, None, :]).any(-1).sum())

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
    degraded = ~is_resident[ids].any(dim=1)
    substitutes = min(top_k - 1, int(is_resident.sum()))
    if substitutes == 0:
        return ids, weights, torch.zeros_like(degraded)
    rows = degraded.nonzero().squeeze(1)
    if rows.numel() == 0:
        return ids, weights, degraded
    ids, weights = ids.clone(), weights.clone()
    device_scores = scores[rows].masked_fill(~is_resident, float("-inf"))
    ids[rows, 1 : 1 + substitutes] = device_scores.topk(substitutes, dim=1).indices
    kept = scores[rows].gather(1, ids[rows]).float()
    weights[rows] = (kept / kept.sum(1, keepdim=True) * weights[rows].sum(1, keepdim=True)).to(weights.dtype)
    return ids, weights, degraded


@dataclass
class PrecomputedMatch:
    """Which pre-computed pairs a layer's final routing uses."""

    covered: torch.Tensor  # [T, K] routing entries served by a pre-computed result
    used: torch.Tensor  # [P] pairs the routing uses
    weights: torch.Tensor  # [P] the routing weight of each used pair (0 where unused)


def match_precomputed(prediction: Prediction, ids: torch.Tensor, weights: torch.Tensor) -> PrecomputedMatch:
    """Match the pre-computed pairs against the final routing ids, weights [T, K]."""
    rows = prediction.pair_rows
    match = ids[rows] == prediction.pair_experts[:, None]  # [P, K]
    covered = torch.zeros_like(ids, dtype=torch.bool)
    pair, k = match.nonzero(as_tuple=True)
    covered[rows[pair], k] = True
    return PrecomputedMatch(covered, match.any(dim=1), (weights[rows] * match).sum(dim=1))

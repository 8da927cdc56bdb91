"""The DAOP forward of one MoE layer: resident experts on the device, the others on the CPU,
at the same time, combined with the routing weights; in `verified` and `daop` mode, also the
prediction of the next layer's experts and their pre-computation (prediction.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from daop_vllm.core.cpu_executor import CpuExpertExecutor
from daop_vllm.core.device_cache import DeviceExpertCache
from daop_vllm.core.device_path import ExpertsForward
from daop_vllm.core.expert_math import routed_experts_forward
from daop_vllm.core.expert_store import HostExpertStore
from daop_vllm.core.faults import log_fault_once
from daop_vllm.core.host_staging import HostStaging
from daop_vllm.core.prediction import Fidelity, Prediction, degrade, match_precomputed
from daop_vllm.core.requests import RequestTracker
from daop_vllm.core.stats import DaopStats

RoutingFunction = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
RouterLogits = Callable[[torch.Tensor], torch.Tensor]  # MoE input [T, H] -> router logits [T, E]

# Executor lanes: the layer's own CPU work, and the pre-computation aimed at a layer (by parity).
_OWN_LANE = 0


def _precompute_lane(layer: int) -> int:
    return 1 + layer % 2


class DaopMoE:
    """One MoE layer: its host store, device cache, router function and shared executor.
    `next_layer` is set (by the engine) when this layer predicts the next one's experts."""

    def __init__(
        self,
        layer: int,
        store: HostExpertStore,
        cache: DeviceExpertCache,
        route: RoutingFunction,
        device_forward: ExpertsForward,
        executor: CpuExpertExecutor,
        stats: DaopStats,
        requests: RequestTracker,
        staging: HostStaging | None = None,
    ) -> None:
        self.layer = layer
        self.store = store
        self.cache = cache
        self.route = route
        self.device_forward = device_forward
        self.executor = executor
        self.stats = stats
        self.requests = requests
        self.staging = staging or HostStaging(cache.device)
        self.router_logits: RouterLogits | None = None  # this layer's gate, for the layer before
        self.fidelity = Fidelity()
        self.predicted = False  # decode rows may be routed / pre-computed from a prediction
        self.next_layer: DaopMoE | None = None
        self._pending: Prediction | None = None  # made by the layer before, for this step

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [T, H] and router_logits [T, E] on the device -> [T, H] on the device."""
        topk_weights, topk_ids = self.route(router_logits)
        if self.requests.dummy_run:
            return self._resident_only(x, topk_ids, topk_weights)
        own_ids, own_weights = topk_ids.cpu(), topk_weights.cpu()
        decode_rows = self._decode_rows(x.shape[0])
        prediction = self._take_prediction(x.shape[0])
        ids, weights, degraded = self._final_routing(router_logits, own_ids, own_weights, decode_rows, prediction)
        if ids is not own_ids:  # the device runs the routing this layer really uses
            topk_ids, topk_weights = ids.to(x.device), weights.to(x.device)
        on_cpu = ~self.cache.is_resident[ids]  # [T, K]
        match = match_precomputed(prediction, ids, weights) if prediction is not None else None
        to_compute = on_cpu & ~match.covered if match is not None else on_cpu
        next_prediction = self._predict_next(x, decode_rows)
        cpu_now = bool(to_compute.any())
        job_ids = ids.masked_fill(~to_compute, -1)  # the pairs this layer's own CPU job computes
        x_host = None
        if cpu_now or (next_prediction is not None and next_prediction.pair_rows.numel()):
            x_host = self.staging.to_host(x)
        own_job = None
        if cpu_now:
            own_job = self.executor.submit(x_host, job_ids, weights, self.store.w13,
                                           self.store.w2, self.cache.host_slot_table, lane=_OWN_LANE)
        if next_prediction is not None:
            self._precompute(next_prediction, x_host)
        cpu_tokens = int(on_cpu.sum())
        if ids.numel() - cpu_tokens:
            out = self.device_forward(
                x, topk_ids, topk_weights, self.cache.w13, self.cache.w2, self.cache.slot_of_expert
            )
        else:
            out = torch.zeros_like(x)
        cpu_out = self._cpu_result(own_job, job_ids, weights, prediction, match, x, x_host)
        if cpu_out is not None:
            out += self.staging.to_device(cpu_out, own_job)
        self._count(own_ids, own_weights, on_cpu, prediction, match, degraded)
        return out

    def _resident_only(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The resident experts' share alone, for vLLM's dummy runs (DaopEngine.dummy_run)."""
        if self.cache.num_slots == 0:
            return torch.zeros_like(x)
        return self.device_forward(x, topk_ids, topk_weights, self.cache.w13, self.cache.w2, self.cache.slot_of_expert)

    def _take_prediction(self, num_rows: int) -> Prediction | None:
        """The prediction the layer before made for this step, if any."""
        prediction, self._pending = self._pending, None
        if prediction is not None and (prediction.step, prediction.num_rows) != (self.requests.step, num_rows):
            prediction.discard()  # made for another step: never applied to these rows
            return None
        return prediction

    def _decode_rows(self, num_rows: int) -> torch.Tensor | None:
        """This step's generated-token rows, or None outside engine steps (no prediction then)."""
        phases = self.requests.row_phases(num_rows)
        if phases is None:
            return None
        row_request, row_prefill = phases
        return ((row_request >= 0) & ~row_prefill).nonzero().squeeze(1)

    def _final_routing(self, router_logits, ids, weights, decode_rows, prediction):
        """The routing this layer runs: its own router, except decode rows of predicted layers
        (routed by the prediction in daop mode; degraded where degradation is on)."""
        degraded = 0
        if not self.predicted or decode_rows is None or decode_rows.numel() == 0:
            return ids, weights, degraded
        if self.fidelity.mode == "daop" and prediction is not None:
            ids, weights = ids.clone(), weights.clone()
            ids[prediction.rows], weights[prediction.rows] = prediction.ids, prediction.weights
            degraded = prediction.degraded
        elif self.fidelity.degrades:
            scores = self.route.scores(router_logits[decode_rows.to(router_logits.device)]).cpu()
            new_ids, new_weights, rows = degrade(ids[decode_rows], weights[decode_rows], scores,
                                                 self.cache.is_resident)
            if bool(rows.any()):
                ids, weights = ids.clone(), weights.clone()
                ids[decode_rows], weights[decode_rows] = new_ids, new_weights
                degraded = int(rows.sum())
        return ids, weights, degraded

    def _predict_next(self, x: torch.Tensor, decode_rows: torch.Tensor | None) -> Prediction | None:
        """Layer i+1's experts for this step's decode rows, from its router on layer i's input."""
        target = self.next_layer
        if target is None or decode_rows is None or decode_rows.numel() == 0:
            return None
        logits = target.router_logits(x[decode_rows.to(x.device)])
        raw_weights, raw_ids = target.route(logits)
        raw_ids, raw_weights = raw_ids.cpu(), raw_weights.cpu()
        ids, weights, degraded = raw_ids, raw_weights, torch.zeros(0, dtype=torch.bool, device="cpu")
        if target.fidelity.mode == "daop" and target.fidelity.degrades:
            ids, weights, degraded = degrade(raw_ids, raw_weights, target.route.scores(logits).cpu(),
                                             target.cache.is_resident)
        on_cpu = ~target.cache.is_resident[ids]
        pair, k = on_cpu.nonzero(as_tuple=True)
        return Prediction(self.requests.step, x.shape[0], decode_rows, raw_ids, ids, weights, int(degraded.sum()),
                          decode_rows[pair], ids[pair, k], None)

    def _precompute(self, prediction: Prediction, x_host: torch.Tensor | None) -> None:
        """Start the predicted host-resident experts of the next layer on this layer's input,
        one row per (row, expert) pair, unweighted (the consumer weighs them)."""
        target = self.next_layer
        if prediction.pair_rows.numel():
            pairs = prediction.pair_rows.numel()
            prediction.job = self.executor.submit(
                x_host[prediction.pair_rows], prediction.pair_experts[:, None], torch.ones(pairs, 1, device="cpu"),
                target.store.w13, target.store.w2, target.cache.host_slot_table, lane=_precompute_lane(target.layer),
            )
        target._pending = prediction

    def _cpu_result(self, own_job, job_ids, weights, prediction, match, x, x_host) -> torch.Tensor | None:
        """This layer's CPU share: its own job's output plus the used pre-computed pairs. A job
        that failed is recomputed here on the fallback path (torch, this thread) - a failed
        pre-computation on this layer's true input - so that the step still completes."""
        out = None
        if own_job is not None:
            try:
                out = own_job.result()
            except Exception as exc:  # noqa: BLE001 - recovered: the engine must not die mid-step
                self._recovered(exc)
                out = routed_experts_forward(x_host, job_ids, weights, self.store.w13, self.store.w2,
                                             self.cache.host_slot_table)
        if prediction is None or prediction.job is None or not bool(match.used.any()):
            if prediction is not None:
                prediction.discard()
            return out
        used = match.used.nonzero().squeeze(1)
        rows = prediction.pair_rows[used]
        try:
            results = prediction.job.result()[used].float()
        except Exception as exc:  # noqa: BLE001 - as above
            self._recovered(exc)
            inputs = (x_host if x_host is not None else self.staging.to_host(x))[rows]
            experts = prediction.pair_experts[used][:, None]
            results = routed_experts_forward(inputs, experts, torch.ones(experts.shape, device="cpu"), self.store.w13,
                                             self.store.w2,
                                             self.cache.host_slot_table).float()
        precomputed = torch.zeros(x.shape, dtype=torch.float32, device="cpu")
        precomputed.index_add_(0, rows, results * match.weights[used, None])
        return precomputed.to(x.dtype) if out is None else (out.float() + precomputed).to(x.dtype)

    def _recovered(self, exc: Exception) -> None:
        self.stats.add(self.layer, faults_recovered=1)
        log_fault_once(f"daop: CPU expert job failed in layer {self.layer} ({exc!r}); recomputed on the "
                       "fallback path (counted in faults_recovered; further faults are not logged)")

    def _count(self, own_ids, own_weights, on_cpu, prediction, match, degraded) -> None:
        cpu_tokens = int(on_cpu.sum())
        self.stats.add(self.layer, device_expert_tokens=on_cpu.numel() - cpu_tokens, cpu_expert_tokens=cpu_tokens,
                       degraded=degraded)
        if prediction is not None:
            used = int(match.used.sum())
            self.stats.add(self.layer, predictions=prediction.raw_ids.numel(),
                           predictions_correct=prediction.correct_predictions(own_ids),
                           precomputed_used=used, precomputed_wasted=match.used.numel() - used)
        phases = self.requests.row_phases(on_cpu.shape[0])
        if phases is None:
            return
        row_request, row_prefill = phases
        for phase, rows in (("prefill", row_prefill), ("decode", ~row_prefill & (row_request >= 0))):
            cpu = int(on_cpu[rows].sum())
            self.stats.add(self.layer, **{f"{phase}_device_expert_tokens": int(rows.sum()) * on_cpu.shape[1] - cpu,
                                          f"{phase}_cpu_expert_tokens": cpu})
        # requests and traces keep what the model's own router chose
        self.requests.record(self.layer, own_ids, own_weights if self.requests.recording else None)

"""The DAOP forward of one MoE layer: resident experts on the device, the others on the CPU,
at the same time, combined with the routing weights; in `verified` and `daop` mode, also the
prediction of the next layer's experts and their pre-computation (prediction.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from daop_vllm.core.cpu_executor import CpuExpertExecutor
from daop_vllm.core.device_cache import DeviceExpertCache
from daop_vllm.core.device_path import ExpertsForward
from daop_vllm.core.expert_math import routed_experts_forward, summed_into_rows
from daop_vllm.core.expert_store import HostExpertStore
from daop_vllm.core.faults import log_fault_once
from daop_vllm.core.prediction import Fidelity, Prediction, degrade, match_precomputed
from daop_vllm.core.requests import RequestTracker
from daop_vllm.core.staging import BANKS, StagingSlots
from daop_vllm.core.stats import DaopStats
from daop_vllm.core.step_counts import PredictionOutcome, add_resident_to_stats, add_to_stats
from daop_vllm.core.streaming import MissCosts, plan_early_staging, plan_streaming
from daop_vllm.core.transfers import HostTransfers

RoutingFunction = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
RouterLogits = Callable[[torch.Tensor], torch.Tensor]  # MoE input [T, H] -> router logits [T, E]

# Executor lanes: the layer's own CPU work, and the pre-computation aimed at a layer (by parity).
_OWN_LANE = 0


def _precompute_lane(layer: int) -> int:
    return 1 + layer % 2


def _experts_seconds(cost: Callable[[int], float], ids: torch.Tensor, num_experts: int) -> float:
    """The seconds of the experts named in `ids` (an entry per (token, expert) pair), each
    costing `cost(its tokens)`: a layer's work on one side, for the streaming plans."""
    tokens = torch.bincount(ids.flatten(), minlength=num_experts)
    return sum(map(cost, tokens[tokens > 0].tolist()))


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
        transfers: HostTransfers | None = None,
    ) -> None:
        self.layer = layer
        self.store = store
        self.cache = cache
        self.route = route
        self.device_forward = device_forward
        self.executor = executor
        self.stats = stats
        self.requests = requests
        self.transfers = transfers or HostTransfers(cache.device)
        self.router_logits: RouterLogits | None = None  # this layer's gate, for the layer before
        self.fidelity = Fidelity()
        self.predicted = False  # decode rows may be routed / pre-computed from a prediction
        self.next_layer: DaopMoE | None = None
        # Where device and host are one memory: a call that runs the layer's routed experts (ids < 0
        # skipped) on x at once, if one is faster than the executor's job (DaopEngine.use_experts_call):
        # (x, topk_ids, topk_weights, out_rows=None, like=None), cpu_fused_experts.ExpertsCall
        self.experts_call: Callable[..., torch.Tensor] | None = None
        # Streaming (streaming.py): "off", "auto" or "all", the shared staging rows, the cost model
        self.stream_mode = "off"
        self.staging: StagingSlots | None = None
        self.stream_costs: MissCosts | None = None
        self.streamed_this_step: torch.Tensor | None = None  # [E] experts this step streamed: device work
        self.stages_next = False  # copies the next layer's predicted host experts a layer early (stream "auto")
        with torch.inference_mode(False):  # a normal tensor: the executor checks a table once per version
            self._store_index = torch.arange(store.num_experts, device="cpu")  # every expert by its store index

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [T, H] and router_logits [T, E] on the device -> [T, H] on the device."""
        if not self.requests.dummy_run and self._in_one_call():
            return self._every_expert_at_once(x, router_logits)
        topk_weights, topk_ids = self.route(router_logits)
        if self.requests.dummy_run:
            return self._resident_only(x, topk_ids, topk_weights)
        decode_rows = self.requests.decode_rows(x.shape[0])  # None outside engine steps: no prediction then
        predicting = self._predict_on_device(x, decode_rows)
        own_scores = self._own_scores_for_degradation(router_logits, decode_rows)
        on_device = (topk_ids, topk_weights, x, *predicting, *own_scores)
        own_ids, own_weights, x_host, *rest = self.transfers.to_host(*on_device)  # the layer's one copy to the host
        next_prediction = self._prediction_from(rest[:len(predicting)], decode_rows, x_host)
        prediction = self._take_prediction(x.shape[0])
        fresh = prediction.fresh_rows(x_host, self.fidelity.staleness_tolerance) if prediction is not None else None
        ids, weights, degraded = self._final_routing(own_ids, own_weights, decode_rows, prediction, fresh,
                                                     rest[len(predicting):])
        executed_ids, executed_weights = topk_ids, topk_weights
        if ids is not own_ids:  # the device runs the routing this layer really uses
            executed_ids, executed_weights = self.transfers.to_device(ids, weights)
        on_cpu = self.cache.is_host[ids]  # [T, K]
        match = match_precomputed(prediction, ids, weights, fresh) if prediction is not None else None
        to_compute = on_cpu & ~match.covered if match is not None else on_cpu
        one_memory = self.cache.shares_host_memory
        streamed, early = self._plan_streaming(ids, on_cpu, to_compute, match, prediction)
        if self.streamed_this_step is not None and not one_memory:
            to_compute = to_compute & ~self.streamed_this_step[ids]
        if one_memory:  # device and host are one memory: every expert in the executor's one job (streamed
            # too) but the pre-computed pairs, which are host pairs
            to_compute = ~match.covered if match is not None else torch.ones_like(on_cpu)
        job_table = self._store_index if one_memory else self.cache.host_slot_table
        job_ids = ids.masked_fill(~to_compute, -1)  # the pairs this layer's own CPU job computes
        cpu_rows = (x_host, job_ids, weights, *self._used_pairs_as_rows(prediction, match))
        own_job = own_out = None
        own_work = len(cpu_rows) > 3 or bool(to_compute.any())
        in_one_call = one_memory and self.experts_call is not None
        if own_work and not one_memory:  # the CPU starts at once, beside the device
            own_job = self._submit_own(cpu_rows, job_table)
        stage_next = []
        if next_prediction is not None:
            stage_next = self._choose_staged_early(next_prediction, ids, on_cpu, to_compute)
            self._precompute(next_prediction, x_host)
        # On one memory the job starts after this thread's own work for the layer: with both on
        # the same cores, this thread would wait its turn for a core in the middle of that work.
        if own_work and in_one_call:
            x_rows, ids_rows, weight_rows, out_rows = self._job_rows(cpu_rows)
            own_out = self.experts_call(x_rows, ids_rows, weight_rows, out_rows, x_host)
        elif own_work and one_memory:
            own_job = self._submit_own(cpu_rows, job_table)
        bank = self.layer % BANKS
        early_out = None
        if early:  # staged a layer early: run first, so that this layer's own copies may reuse the rows
            self.staging.ready(bank)
            early_out = self.device_forward(x, executed_ids, executed_weights, *prediction.staged)
        staged = None  # the first staging round's copies start before the resident experts' kernel
        if streamed and not one_memory:
            staged = self.staging.stage(self.store, streamed[:self.staging.num_slots], bank)
        if stage_next:  # after this layer's own copies: they are needed first
            self._stage_next(next_prediction, stage_next)
        if not one_memory and not bool(on_cpu.all()):
            out = self.device_forward(
                x, executed_ids, executed_weights, self.cache.w13, self.cache.w2, self.cache.slot_of_expert
            )
        else:
            out = torch.zeros_like(x)
        if early_out is not None:
            out += early_out
        if staged is not None:  # the copies ran beside the resident experts
            out += self._streamed_forward(x, executed_ids, executed_weights, streamed, staged, bank)
        cpu_out = self._cpu_result(own_job, own_out, cpu_rows, job_table, prediction, match)
        if cpu_out is not None:
            job = own_job if own_job is not None and own_job.owns(cpu_out) else None
            out += self.transfers.to_device(cpu_out, job=job)[0]  # the layer's one copy back
        self._count_routing(executed_ids, topk_ids)
        self._count_predictions(own_ids, own_weights, prediction, match, degraded)
        return out

    def _in_one_call(self) -> bool:
        """Whether this step's work is one call of every routed expert: every expert of the
        layer resident, or device and host one memory (where the resident experts are host
        experts too); nothing predicted for it or by it, no trace recorded (traces need the ids
        on the host), nothing streamed (where device and host are one memory only `stream`
        "all" streams: its bookkeeping, for tests)."""
        streams = self.stream_mode == "all" and not self.cache.holds_every_expert
        return ((self.cache.holds_every_expert or self.cache.shares_host_memory) and not self.predicted
                and self.next_layer is None and not self.requests.recording and not streams)

    def _plan_streaming(self, ids: torch.Tensor, on_cpu: torch.Tensor, to_compute: torch.Tensor, match,
                        prediction: Prediction | None) -> tuple[list[int], list[int]]:
        """(the host experts this step streams, heaviest first; those of them the layer before
        staged early that the routing chose), also as the mask `streamed_this_step`; counted
        in the stats. Experts with pre-computed results this step stay on the CPU (their results
        are partly there already), and where device and host are one memory only `stream` "all"
        streams (there is nothing to copy to)."""
        self.streamed_this_step = None
        if self.staging is None or self.stream_mode == "off" or not bool(to_compute.any()):
            return [], []
        if self.cache.shares_host_memory and self.stream_mode != "all":
            return [], []
        num_experts = self.store.num_experts
        tokens = torch.bincount(ids[to_compute], minlength=num_experts)
        if match is not None and bool(match.covered.any()):
            tokens[torch.bincount(ids[match.covered], minlength=num_experts) > 0] = 0
        early = []  # staged a layer early and routed to: on the device whatever the plan
        if prediction is not None and prediction.staged_experts:
            early = [e for e in prediction.staged_experts if tokens[e] > 0]
        early_tokens = tokens[early].tolist()
        tokens[early] = 0
        host = tokens.nonzero().squeeze(1)
        if host.numel() == 0 and not early:
            return [], []
        costs = self.stream_costs
        device_busy = _experts_seconds(costs.device_s, ids[~on_cpu], num_experts)
        device_busy += sum(map(costs.device_s, early_tokens))
        counts = tokens[host].tolist()
        plan = plan_streaming(counts, costs, device_busy, self.staging.num_slots, self.stream_mode)
        streamed = [e for _, e in sorted(((n, e) for n, e, s in zip(counts, host.tolist(), plan) if s), reverse=True)]
        if streamed or early:
            self.streamed_this_step = torch.zeros(num_experts, dtype=torch.bool, device="cpu")
            self.streamed_this_step[streamed + early] = True
            self._count_streamed(ids, to_compute, streamed, early)
        return streamed, early

    def _count_streamed(self, ids: torch.Tensor, to_compute: torch.Tensor, streamed: list[int],
                        early: list[int]) -> None:
        """Streamed experts (`early`: staged a layer early, their bytes counted then), their
        bytes (none copied where device and host are one memory), and per phase the experts
        streamed for the phase's rows."""
        copied = 0 if self.cache.shares_host_memory else len(streamed) * self.store.device_expert_bytes
        counts = {"streamed_experts": len(streamed) + len(early), "staged_early_used": len(early), "stream_bytes": copied}
        phases = self.requests.row_phases(ids.shape[0])
        if phases is not None:
            row_request, row_prefill = phases
            pairs = to_compute & self.streamed_this_step[ids]  # [T, K]
            for phase, rows in (("prefill", row_prefill), ("decode", (row_request >= 0) & ~row_prefill)):
                counts[f"{phase}_streamed_experts"] = int(torch.unique(ids[pairs & rows[:, None]]).numel())
        self.stats.add(self.layer, **counts)

    def _streamed_forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: list[int],
                          staged: tuple, bank: int) -> torch.Tensor:
        """The streamed experts' share on the device: `staged` holds the first staging round
        (already copying into `bank`); further rounds reuse the rows once the round before has run."""
        rounds = self.staging.num_slots
        out = None
        for start in range(0, len(experts), rounds):
            if start:
                staged = self.staging.stage(self.store, experts[start:start + rounds], bank)
            self.staging.ready(bank)
            part = self.device_forward(x, ids, weights, *staged)
            out = part if out is None else out + part
        return out

    def _every_expert_at_once(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """Every routed expert in one call, counted: the device kernel (every expert resident);
        where device and host are one memory, the executor's one job (its native kernels are the
        fastest CPU path; nothing to copy), which also routes where no ids are counted, or the
        layer's `experts_call`."""
        one_job = self.cache.shares_host_memory and self.experts_call is None
        if one_job and self.cache.holds_every_expert and self.executor.routes_in_job(self.route, router_logits):
            out = self._one_job(x, None, None, router_logits)
            self._count_resident(x.shape[0], self.route.top_k)
            return out
        topk_weights, topk_ids = self.route(router_logits)
        if one_job:
            out = self._one_job(x, topk_ids, topk_weights, router_logits)
        elif self.cache.shares_host_memory:
            out = self.experts_call(x, topk_ids, topk_weights)
        else:
            out = self.device_forward(x, topk_ids, topk_weights, self.cache.w13, self.cache.w2,
                                      self.cache.slot_of_expert)
        if self.cache.holds_every_expert:
            self._count_resident(*topk_ids.shape)
        else:
            self._count_routing(topk_ids, topk_ids)
        return out

    def _one_job(self, x: torch.Tensor, topk_ids: torch.Tensor | None, topk_weights: torch.Tensor | None,
                 router_logits: torch.Tensor) -> torch.Tensor:
        """The layer in one executor job; without ids, the job routes `router_logits` too."""
        routing = (self.route, router_logits) if topk_ids is None else None
        job = self.executor.submit(x, topk_ids, topk_weights, self.store.w13, self.store.w2, self._store_index,
                                   lane=_OWN_LANE, out=torch.empty_like(x, memory_format=torch.contiguous_format),
                                   routing=routing)
        try:
            return job.result()
        except Exception as exc:  # noqa: BLE001 - recovered: the engine must not die mid-step
            self._recovered(exc)
            if topk_ids is None:
                topk_weights, topk_ids = self.route(router_logits)
            return routed_experts_forward(x, topk_ids, topk_weights, self.store.w13, self.store.w2, self._store_index)

    def _resident_only(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """The resident experts' share alone, for vLLM's dummy runs (DaopEngine.dummy_run)."""
        if self.cache.num_slots == 0:
            return torch.zeros_like(x)
        return self.device_forward(x, topk_ids, topk_weights, self.cache.w13, self.cache.w2, self.cache.slot_of_expert)

    def _take_prediction(self, num_rows: int) -> Prediction | None:
        """The prediction the layer before made for this step, if any."""
        prediction = self.requests.predictions.pop(self.layer, None)
        if prediction is not None and prediction.num_rows != num_rows:
            prediction.discard()  # made for other rows: never applied to these
            return None
        return prediction

    def _own_scores_for_degradation(self, router_logits: torch.Tensor, decode_rows: torch.Tensor | None) -> tuple:
        """Where this layer degrades its own routing (a predicted layer outside daop mode): its
        router's probabilities for the decode rows, to go to the host with the routing."""
        if (not self.predicted or self.fidelity.mode == "daop" or not self.fidelity.degrades
                or decode_rows is None or decode_rows.numel() == 0):
            return ()
        return (self.route.scores(self._decode_part(router_logits, decode_rows)),)

    def _decode_part(self, rows: torch.Tensor, decode_rows: torch.Tensor) -> torch.Tensor:
        """The decode rows of `rows` [T, ...] (on the device): all of them in a step of decode rows alone."""
        if decode_rows.numel() == rows.shape[0]:
            return rows
        return rows[self.requests.on_device("decode", decode_rows, rows.device)]

    def _final_routing(self, ids, weights, decode_rows, prediction, fresh, own_scores):
        """The routing this layer runs: its own router, except decode rows of predicted layers
        (routed by the prediction in daop mode, where the staleness gate lets them; degraded
        where degradation is on)."""
        degraded = None
        if not self.predicted or decode_rows is None or decode_rows.numel() == 0:
            return ids, weights, degraded
        if self.fidelity.mode == "daop" and prediction is not None:
            degraded = prediction.degraded(fresh)
            if fresh is None and prediction.rows.numel() == ids.shape[0]:  # a step of decode rows alone
                return prediction.ids, prediction.weights, degraded
            ids, weights = ids.clone(), weights.clone()
            if fresh is None:
                ids[prediction.rows], weights[prediction.rows] = prediction.ids, prediction.weights
            else:
                rows = prediction.rows[fresh]
                ids[rows], weights[rows] = prediction.ids[fresh], prediction.weights[fresh]
        elif own_scores:
            new_ids, new_weights, rows = degrade(ids[decode_rows], weights[decode_rows], own_scores[0],
                                                 self.cache.is_resident)
            if bool(rows.any()):
                ids, weights = ids.clone(), weights.clone()
                ids[decode_rows], weights[decode_rows] = new_ids, new_weights
                degraded = rows
        return ids, weights, degraded

    def _predict_on_device(self, x: torch.Tensor, decode_rows: torch.Tensor | None) -> tuple:
        """Layer i+1's routing for this step's decode rows, from its router on layer i's input
        (on the device; it goes to the host in the layer's one copy): raw ids, raw weights, and
        the scores where the target degrades them."""
        target = self.next_layer
        if target is None or decode_rows is None or decode_rows.numel() == 0:
            return ()
        logits = target.router_logits(self._decode_part(x, decode_rows))
        raw_weights, raw_ids = target.route(logits)
        if target.fidelity.mode == "daop" and target.fidelity.degrades:
            return raw_ids, raw_weights, target.route.scores(logits)
        return raw_ids, raw_weights

    def _prediction_from(self, predicted: list, decode_rows: torch.Tensor | None,
                         x_host: torch.Tensor) -> Prediction | None:
        """The prediction for layer i+1 from its routing on the host; its host-resident pairs
        are the ones to pre-compute, on this layer's input x_host (kept for the rows where
        layer i+1 gates on staleness)."""
        if not predicted:
            return None
        target = self.next_layer
        raw_ids, raw_weights, *scores = predicted
        ids, weights, degraded = raw_ids, raw_weights, None
        if scores:
            ids, weights, degraded = degrade(raw_ids, raw_weights, scores[0], target.cache.is_resident)
        pair, rank = target.cache.is_host[ids].nonzero(as_tuple=True)
        inputs = x_host[decode_rows] if target.fidelity.staleness_tolerance is not None else None
        return Prediction(self.requests.step, x_host.shape[0], decode_rows, raw_ids, ids, weights, degraded,
                          decode_rows[pair], ids[pair, rank], rank, None, inputs)

    def _choose_staged_early(self, prediction: Prediction, ids: torch.Tensor, on_cpu: torch.Tensor,
                             to_compute: torch.Tensor) -> list[int]:
        """Where this layer stages the next one's experts early (streaming.plan_early_staging, as
        the simulator plans it): the copies' head start is this layer's time (its own CPU work or
        its resident experts, the longer); the next layer's device is busy with its predicted
        resident pairs; where the next layer is predicted, the pre-computation the copies would
        replace starts once this layer's CPU work is done, a head start of its own. The staged
        experts' pairs leave the pre-computation: the next layer runs them on the device, on its
        true input."""
        if not self.stages_next or prediction.pair_experts.numel() == 0:
            return []
        target = self.next_layer
        counts = torch.bincount(prediction.pair_experts, minlength=target.store.num_experts)
        experts = counts.nonzero().squeeze(1)
        cpu_s = _experts_seconds(self.stream_costs.cpu_s, ids[to_compute], self.store.num_experts)
        layer_s = max(cpu_s, _experts_seconds(self.stream_costs.device_s, ids[~on_cpu], self.store.num_experts))
        predicted = prediction.ids
        next_device_s = _experts_seconds(target.stream_costs.device_s, predicted[target.cache.is_resident[predicted]],
                                        target.store.num_experts)
        chosen = plan_early_staging(dict(zip(experts.tolist(), counts[experts].tolist())), target.stream_costs,
                                    next_device_s, self.staging.num_slots, cpu_s - layer_s if target.predicted else 0.0,
                                    -layer_s)
        if chosen:
            prediction.keep_pairs(~torch.isin(prediction.pair_experts, torch.tensor(chosen, dtype=torch.int64)))
        return chosen

    def _stage_next(self, prediction: Prediction, experts: list[int]) -> None:
        """Copy `experts` of the next layer into its bank of staging rows (counted there)."""
        target = self.next_layer
        prediction.staged_experts = experts
        prediction.staged = self.staging.stage(target.store, experts, target.layer % BANKS)
        self.stats.add(target.layer, staged_early=len(experts),
                       stream_bytes=len(experts) * target.store.device_expert_bytes)

    def _precompute(self, prediction: Prediction, x_host: torch.Tensor | None) -> None:
        """Start the predicted host-resident experts of the next layer on this layer's input,
        one row per (row, expert) pair, unweighted (the consumer weighs them); where device and
        host are one memory, keep the pairs' inputs for the next layer's own job instead. A layer
        that is not predicted (exact mode) gets the prediction for its staged experts only:
        nothing pre-computed, its routing its own."""
        target = self.next_layer
        if not target.predicted:
            prediction.keep_pairs(slice(0))
        if prediction.pair_rows.numel():
            inputs = x_host[prediction.pair_rows]
            if self.cache.shares_host_memory:
                prediction.pair_inputs = inputs
            else:
                prediction.job = self.executor.submit(
                    inputs, prediction.pair_experts[:, None], torch.ones(inputs.shape[0], 1, device="cpu"),
                    target.store.w13, target.store.w2, target.cache.host_slot_table,
                    lane=_precompute_lane(target.layer))
        self.requests.predictions[target.layer] = prediction

    @staticmethod
    def _used_pairs_as_rows(prediction: Prediction | None, match) -> tuple:
        """Where the layer before kept its pairs' inputs (one memory): the pairs this layer's
        routing uses as extra rows of its own job, (inputs [U, H], expert ids [U, K] (-1 past the
        first), routing weights [U, K], their step rows [U]); else ()."""
        if prediction is None or prediction.pair_inputs is None or not match.any_used:
            return ()
        used = match.used_pairs()
        gaps = (0, prediction.ids.shape[1] - 1)
        ids = torch.nn.functional.pad(prediction.pair_experts[used, None], gaps, value=-1)
        weights = torch.nn.functional.pad(match.weights[used, None], gaps)
        return prediction.pair_inputs[used], ids, weights, prediction.pair_rows[used]

    @staticmethod
    def _job_rows(cpu_rows: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(x, ids, weights, the result row of each row of x: None for its own) of a layer's own
        job: its rows, then any used pairs' (_used_pairs_as_rows), which add into their rows."""
        if len(cpu_rows) == 3:
            return (*cpu_rows, None)
        x, ids, weights, pair_x, pair_ids, pair_weights, pair_rows = cpu_rows
        out_rows = torch.cat([torch.arange(x.shape[0], device="cpu"), pair_rows])
        return (torch.cat([x, pair_x]), torch.cat([ids, pair_ids]), torch.cat([weights, pair_weights.to(weights.dtype)]),
                out_rows)

    def _submit_own(self, cpu_rows: tuple, job_table: torch.Tensor):
        """The layer's own CPU job on `cpu_rows` (its result: [T, H], used pairs added in)."""
        x, ids, weights, out_rows = self._job_rows(cpu_rows)
        out = None if out_rows is None else torch.empty_like(cpu_rows[0])
        return self.executor.submit(x, ids, weights, self.store.w13, self.store.w2, job_table, lane=_OWN_LANE, out=out,
                                    out_rows=out_rows)

    def _cpu_result(self, own_job, own_out, cpu_rows: tuple, job_table, prediction, match) -> torch.Tensor | None:
        """This layer's CPU share: its own job's output (or `own_out`, computed in one call) plus
        the used pre-computed pairs (in that job's output where one memory computed them there).
        A job that failed is recomputed here on the fallback path (torch, this thread) - a failed
        pre-computation on this layer's true input - so that the step still completes."""
        out = own_out
        x_host = cpu_rows[0]
        if own_job is not None:
            try:
                out = own_job.result()
            except Exception as exc:  # noqa: BLE001 - recovered: the engine must not die mid-step
                self._recovered(exc)
                x, ids, weights, out_rows = self._job_rows(cpu_rows)
                out = summed_into_rows(routed_experts_forward(x, ids, weights, self.store.w13, self.store.w2,
                                                               job_table), out_rows, x_host)
        if prediction is None or prediction.job is None or not match.any_used:
            if prediction is not None:
                prediction.discard()
            return out
        used = match.used_pairs()
        rows = prediction.pair_rows[used]
        try:
            results = prediction.job.result()[used].float()
        except Exception as exc:  # noqa: BLE001 - as above
            self._recovered(exc)
            inputs = x_host[rows]
            experts = prediction.pair_experts[used][:, None]
            results = routed_experts_forward(inputs, experts, torch.ones(experts.shape, device="cpu"), self.store.w13,
                                             self.store.w2,
                                             self.cache.host_slot_table).float()
        precomputed = torch.zeros(x_host.shape, dtype=torch.float32, device="cpu")
        precomputed.index_add_(0, rows, results * match.weights[used, None])
        return precomputed.to(x_host.dtype) if out is None else (out.float() + precomputed).to(x_host.dtype)

    def _recovered(self, exc: Exception) -> None:
        self.stats.add(self.layer, faults_recovered=1)
        log_fault_once(f"daop: CPU expert job failed in layer {self.layer} ({exc!r}); recomputed on the "
                       "fallback path (counted in faults_recovered; further faults are not logged)")

    def _count_routing(self, executed_ids: torch.Tensor, chosen_ids: torch.Tensor) -> None:
        """The step's counts, on the routing's device; outside engine steps they are folded at
        once (the engine folds a step's at its end)."""
        self.requests.count(self.layer, executed_ids, chosen_ids)
        if self.requests.batch is None:
            executed, _ = self.requests.take_counts()
            add_to_stats(self.stats, [self.layer], executed[self.layer:self.layer + 1],
                         self.computed_on_device()[None].float(), None)
            self.streamed_this_step = None

    def computed_on_device(self) -> torch.Tensor:
        """[E] experts whose pairs this step ran on the device: resident, or streamed."""
        if self.streamed_this_step is None:
            return self.cache.is_resident
        return self.cache.is_resident | self.streamed_this_step

    def _count_resident(self, rows: int, top_k: int) -> None:
        """A device-only layer's counts, from its shape alone (no reading of its routing)."""
        if self.requests.batch is None:
            add_resident_to_stats(self.stats, [(self.layer, rows, top_k)], None)
        else:
            self.requests.counts.add_resident(self.layer, rows, top_k)

    def _count_predictions(self, own_ids, own_weights, prediction, match, degraded) -> None:
        """Kept for the step's end, which counts every layer's at once (add_predictions_to_stats)."""
        counts = self.requests.counts
        if degraded is not None:
            counts.degraded.append((self.layer, degraded))
        if prediction is not None:
            counts.predictions.append(PredictionOutcome(self.layer, prediction.raw_ids, prediction.rows, own_ids,
                                                        match.used, match.rejected))
        if self.requests.recording:  # traces keep what the model's own router chose, row by row
            self.requests.record_routes(self.layer, own_ids, own_weights)

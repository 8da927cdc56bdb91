"""The core engine: every DAOP MoE layer of one model, their placement, the CPU executor and
the counters. No vLLM here; the adapter builds one engine per model."""

from __future__ import annotations

import atexit
import contextlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from daop_vllm.core.batch import StepBatch
from daop_vllm.core.cpu_executor import CpuExpertExecutor
from daop_vllm.core.device_cache import DeviceExpertCache
from daop_vllm.core.device_path import ExpertsForward, pick_device_forward
from daop_vllm.core.expert_store import HostExpertStore
from daop_vllm.core.faults import log_fault_once
from daop_vllm.core.hardware import CPU_ONLY_STAND_IN, FORMAT_READ_SHARE, HARDWARE_PRESETS, Hardware
from daop_vllm.core.moe import DaopMoE, RouterLogits, RoutingFunction
from daop_vllm.core.prediction import Fidelity
from daop_vllm.core.ranks import TensorParallelRank
from daop_vllm.core.realloc import (
    AUTO_INTERVAL_STEPS,
    REALLOC_POLICIES,
    auto_swaps,
    paper_swaps,
)
from daop_vllm.core.requests import RequestTracker
from daop_vllm.core.staging import StagingSlots
from daop_vllm.core.stats import DaopStats, with_hit_rates
from daop_vllm.core.stats_file import StatsFile
from daop_vllm.core.step_counts import add_predictions_to_stats, add_resident_to_stats, add_to_stats
from daop_vllm.core.streaming import STREAM_MODES, expert_costs
from daop_vllm.core.trace_writer import TraceWriter
from daop_vllm.core.transfers import HostTransfers


class DaopEngine:
    """Owns the layers of one model. Layers are added while the model is built (empty
    caches), weights are loaded into their host stores, then `place` fills the device slots."""

    def __init__(
        self,
        device: torch.device,
        cpu_threads: int,
        fidelity: Fidelity | None = None,
        realloc: str = "off",
        swap_threshold: float = 1.05,
        hardware: Hardware | None = None,
        max_swap_bytes_per_step: int | None = None,
        budget_asked: dict[str, Any] | None = None,
        fail_every: int | None = None,
        one_memory: bool | None = None,
        stream: str = "off",
        staging_slots: int = 0,
        tensor_parallel: TensorParallelRank | None = None,
        cpu_cores: Sequence[int] | None = None,
    ) -> None:
        """`budget_asked`: the budget option as the user gave it ({} or None: auto), for the
        report; `fail_every`: tests only, every n-th CPU job fails (see CpuExpertExecutor);
        `one_memory`: whether device and host are one memory (default: the device is the CPU;
        False on the CPU runs the CUDA path's structure there, see DeviceExpertCache);
        `stream` and `staging_slots`: host experts a step runs on the device instead (the options
        of those names; streaming.py, staging.py); `tensor_parallel`: this rank's place (its
        layers hold their shards of the experts; ranks.py); `cpu_cores`: the CPUs the executor's
        threads are pinned to (None: unpinned).
        Every host tensor is made on the CPU explicitly, so the engine may be built under
        `with torch.device(<accelerator>)`, as vLLM builds models."""
        if realloc not in REALLOC_POLICIES:
            raise ValueError(f"realloc must be one of {REALLOC_POLICIES}, got {realloc!r}")
        self.device = device
        self.one_memory = one_memory
        self.fidelity = fidelity or Fidelity()
        self.realloc = realloc
        if stream not in STREAM_MODES:
            raise ValueError(f"stream must be one of {STREAM_MODES}, got {stream!r}")
        self.stream, self.staging_slots = stream, staging_slots
        self.staging: StagingSlots | None = None
        self.swap_threshold = swap_threshold
        self.hardware = hardware or HARDWARE_PRESETS[CPU_ONLY_STAND_IN]
        self.max_swap_bytes_per_step = max_swap_bytes_per_step
        self.swap_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.requests = RequestTracker(0, 0)
        self.device_forward, self.device_path = pick_device_forward(device)
        self.tensor_parallel = tensor_parallel or TensorParallelRank()
        self.executor = CpuExpertExecutor(cpu_threads, pin_memory=device.type == "cuda", fail_every=fail_every,
                                          cores=cpu_cores)
        self.transfers = HostTransfers(device)
        self.stats = DaopStats()
        self.layers: list[DaopMoE] = []
        self.budget_asked = dict(budget_asked or {})
        self.stats_file: StatsFile | None = None
        self.trace_writer: TraceWriter | None = None
        self.trace_model = ""
        self._closed = False

    def add_layer(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype,
        route: RoutingFunction,
        checkpoint_format: str = "bf16",
    ) -> DaopMoE:
        """A layer whose experts load in `dtype` (the activations'), or in `checkpoint_format` fp8
        as an FP8 checkpoint holds them (HostExpertStore)."""
        pin = self.device.type == "cuda"
        store = HostExpertStore(num_experts, hidden_size, intermediate_size, dtype, pin_memory=pin,
                                checkpoint_format=checkpoint_format)
        cache = DeviceExpertCache(store, 0, self.device, self.one_memory)
        layer = DaopMoE(len(self.layers), store, cache, route, self.device_forward, self.executor, self.stats,
                        self.requests, self.transfers)
        self.layers.append(layer)
        self.stats.add_layer()
        self.requests.set_shape(len(self.layers), num_experts)
        return layer

    def set_router(self, layer: int, router_logits: RouterLogits) -> None:
        """Layer `layer`'s gate (MoE input -> router logits), which the layer before uses to
        predict its experts."""
        self.layers[layer].router_logits = router_logits

    @property
    def mode(self) -> str:
        return self.fidelity.mode

    @property
    def first_predicted_layer(self) -> int | None:
        """The first layer whose decode rows use a prediction; None in exact mode."""
        return None if self.mode == "exact" else self.fidelity.first_layer(len(self.layers))

    def set_fidelity(self, fidelity: Fidelity) -> None:
        """Switch mode (and its knobs) between steps."""
        self.fidelity = fidelity
        self._link_layers()

    def _link_layers(self) -> None:
        """Each layer before a predicted one predicts it (once the model's layers are all there);
        with `stream` "auto" and device and host two memories, each layer before one from the
        first predicted layer on (exact mode too, for staging only) with a router stages its
        predicted host experts early."""
        first = self.first_predicted_layer
        for layer in self.layers:
            layer.fidelity = self.fidelity
            layer.predicted = first is not None and layer.layer >= first
        stages = self.stream == "auto" and self.staging is not None and not self.staging.shares_host_memory
        first_staged = self.fidelity.first_layer(len(self.layers))
        for layer, following in zip(self.layers, self.layers[1:]):
            if following.predicted and following.router_logits is None:
                raise ValueError(f"mode {self.mode!r} predicts layer {following.layer}'s experts: set_router it first")
            layer.stages_next = stages and following.layer >= first_staged and following.router_logits is not None
            layer.next_layer = following if following.predicted or layer.stages_next else None

    @property
    def num_experts(self) -> int:
        return self.layers[0].store.num_experts

    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert in a device slot: what the budget counts and a copy moves."""
        return self.layers[0].store.device_expert_bytes

    @property
    def expert_format(self) -> str:
        """The host experts' format (what the CPU computes from)."""
        return self.layers[0].store.format if self.layers else "bf16"

    @property
    def device_expert_format(self) -> str:
        return self.layers[0].store.device_format if self.layers else "bf16"

    def quantize_experts(self, name: str, device_name: str | None = None) -> None:
        """Store every layer's host experts in format `name` and its device experts in
        `device_name` (default: the same; quantized_experts.py), after their weights are loaded
        and before `place`: quantized once, here."""
        if any(layer.cache.num_slots for layer in self.layers):
            raise ValueError("quantize the experts before placing them")
        if device_name not in (None, name) and self.layers and self.layers[0].cache.shares_host_memory:
            raise ValueError("device and host are one memory here: the resident experts are the host's, in one format")
        for layer in self.layers:
            layer.store.quantize(name, device_name)
            layer.cache = DeviceExpertCache(layer.store, 0, self.device, self.one_memory)

    def use_experts_call(self, make_call: Callable[[HostExpertStore], Callable | None], description: str) -> int:
        """Where device and host are one memory: run each layer's experts through
        `make_call(store)` (a faster CPU kernel than the executor's job; None keeps the executor
        for that layer), `description` naming it as the device path. Returns the layers given one."""
        if self.device.type != "cpu":
            return 0
        given = 0
        for layer in self.layers:
            layer.experts_call = make_call(layer.store)
            given += layer.experts_call is not None
        if given:
            self.device_path = description
        return given

    def use_device_forward(self, forward: ExpertsForward, description: str) -> None:
        """Run every layer's resident (and staged) experts through `forward` (the contract of
        `expert_math.routed_experts_forward`), `description` naming it as the device path."""
        self.device_forward, self.device_path = forward, description
        for layer in self.layers:
            layer.device_forward = forward

    def place(self, resident: list[list[int]]) -> None:
        """Make `resident[l]` the device-resident experts of layer l (slots sized to fit)."""
        if len(resident) != len(self.layers):
            raise ValueError(f"placement has {len(resident)} layers, the model {len(self.layers)}")
        for layer, experts in zip(self.layers, resident):
            if layer.cache.num_slots != len(experts):
                layer.cache.finish_swaps(wait=True)  # no copy may still write into slots about to be freed
                layer.cache = DeviceExpertCache(layer.store, len(experts), self.device, self.one_memory)
            layer.cache.fill(experts)
        self._set_up_streaming()
        self._link_layers()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def set_stream(self, mode: str) -> None:
        """The `stream` option for the steps to come (the staging rows are made once)."""
        if mode not in STREAM_MODES:
            raise ValueError(f"stream must be one of {STREAM_MODES}, got {mode!r}")
        self.stream = mode
        self._set_up_streaming()
        self._link_layers()

    def _set_up_streaming(self) -> None:
        """The shared staging rows (once the experts' format is final: at the first `place`)."""
        if self.stream == "off" or self.staging_slots < 1:
            for layer in self.layers:
                layer.stream_mode = "off"
            return
        if self.staging is None:
            layer = self.layers[0]
            self.staging = StagingSlots(layer.store, self.staging_slots, self.device, layer.cache.shares_host_memory)
        for layer in self.layers:
            layer.stream_mode, layer.staging = self.stream, self.staging
            layer.stream_costs = expert_costs(self.hardware, layer.store.expert_bytes, layer.store.flops_per_token,
                                              cpu_read_share=FORMAT_READ_SHARE[layer.store.format],
                                              device_bytes=layer.store.device_expert_bytes)

    def slot_bytes_added(self, resident: list[list[int]]) -> int:
        """Device bytes `place(resident)` would allocate beyond the slots held now (0 where
        device and host share memory)."""
        if self.device.type == "cpu":
            return 0
        grown = sum(max(0, len(experts) - layer.cache.num_slots) for layer, experts in zip(self.layers, resident))
        return grown * self.expert_bytes

    @contextlib.contextmanager
    def dummy_run(self) -> Iterator[None]:
        """vLLM's dummy and profile runs (no engine step): their outputs are thrown away, so
        the layers skip their CPU experts (at 25% resident on Mixtral a profile run of 8k rows
        would give the CPU ~12k pairs per layer) and count nothing; device work still runs,
        so that the profile sees its memory."""
        self.requests.dummy_run = True
        try:
            yield
        finally:
            self.requests.dummy_run = False

    def begin_step(self, batch: StepBatch) -> None:
        """Called before each engine step's forward with the step's rows per request."""
        for layer in self.layers:
            layer.cache.finish_swaps()  # copies that completed join the table between steps
        self.requests.begin_step(batch)

    def end_step(self) -> None:
        """Called after the step's forward: the step's counts folded in, then re-allocation
        (swaps start now, and complete while later steps run)."""
        batch = self.requests.batch
        add_predictions_to_stats(self.stats, *self.requests.counts.take_predictions())
        executed, resident_layers = self.requests.take_counts()
        add_resident_to_stats(self.stats, resident_layers, batch)
        if executed is not None:
            resident = torch.stack([layer.computed_on_device() for layer in self.layers]).float()
            add_to_stats(self.stats, list(range(len(self.layers))), executed, resident,
                         batch.prefill if batch is not None else None)
        if batch is not None and self.realloc != "off":
            budget = [self.max_swap_bytes_per_step]
            if self.realloc == "paper":
                for req_id, completes in zip(batch.req_ids, batch.prefill_completes):
                    if completes:
                        self._reallocate(self.requests.prefill_counts[req_id], budget)
            elif any(batch.prefill_completes) or self.requests.step % AUTO_INTERVAL_STEPS == 0:
                self._reallocate(self.requests.expected_demand(self.layers[0].route.top_k), budget)
        if self.stream != "off":
            for layer in self.layers:
                layer.streamed_this_step = None
        self.requests.end_step()

    def drop_request(self, req_id: str, finished: bool = True) -> None:
        """A request finished or was aborted (`finished`), or was preempted (it will be
        recomputed when it resumes): forget its state; a finished one goes to the trace."""
        routes = self.requests.drop(req_id)
        if routes is not None and finished and self.trace_writer is not None:
            self.trace_writer.append(self._trace_line(req_id, routes))

    def record_traces_to(self, path: str, model: str = "") -> None:
        """Append every finished request's routing to `path` (the format of traces.py)."""
        self.trace_writer = TraceWriter(path)
        self.trace_model = model
        self.requests.recording = True

    def _trace_line(self, req_id: str, routes: dict) -> dict:
        line = {"id": req_id, "model": self.trace_model, "source": "daop-vllm trace_path",
                "num_layers": len(self.layers), "num_experts": self.num_experts,
                "top_k": self.layers[0].route.top_k, "aligned": True}
        for phase in ("prefill", "decode"):
            line[phase] = [ids for ids, _ in routes[phase]]
            line[f"{phase}_probs"] = [[[round(w, 6) for w in row] for row in weights] for _, weights in routes[phase]]
        return line

    def _reallocate(self, counts: torch.Tensor, budget: list[int | None]) -> None:
        """Apply the policy to counts [L, E] (one prompt's for `paper`, the expected demand for
        `auto`), layer by layer from a rotating start so that a byte budget (budget[0], bytes
        left this step; None = no cap) does not always favour the first layers. A layer with a
        copy still in flight waits for a later step."""
        start = self.requests.step % len(self.layers)
        for layer in self.layers[start:] + self.layers[:start]:
            if layer.cache.swaps_in_flight:
                if not self.tensor_parallel.in_lockstep:
                    continue  # decided at a later step, once the copies landed
                layer.cache.finish_swaps(wait=True)  # when a copy lands differs between ranks; the placement may not
            resident = layer.cache.resident_experts
            if self.realloc == "paper":
                swaps = paper_swaps(counts[layer.layer], resident, self.swap_threshold)
            else:
                store = layer.store
                swaps = auto_swaps(counts[layer.layer], resident,
                                   self.hardware.token_seconds_saved(store.expert_bytes, store.device_expert_bytes),
                                   self.hardware.swap_seconds(store.device_expert_bytes))
            copy_bytes = 0 if layer.cache.shares_host_memory else layer.store.device_expert_bytes
            for incoming, retiring in swaps:
                if budget[0] is not None and copy_bytes > budget[0]:
                    return
                try:
                    layer.cache.start_swap(incoming, retiring, self.swap_stream)
                except Exception as exc:  # noqa: BLE001 - a failed swap leaves the placement as it was
                    self.stats.add(layer.layer, faults_recovered=1)
                    log_fault_once(f"daop: swapping expert {incoming} in for {retiring} in layer {layer.layer} "
                                   f"failed ({exc!r}); placement unchanged")
                    break
                self.stats.add(layer.layer, swaps=1, swap_bytes=copy_bytes)
                if budget[0] is not None:
                    budget[0] -= copy_bytes

    def resident_experts(self) -> list[list[int]]:
        return [layer.cache.resident_experts for layer in self.layers]

    def report(self) -> dict[str, Any]:
        """What the engine holds and has done; the `stats_path` schema (see the README)."""
        resident = self.resident_experts()
        return {
            "mode": self.mode,
            "first_predicted_layer": self.first_predicted_layer,
            "degrade": self.fidelity.degrades if self.mode != "exact" else False,
            "staleness_tolerance": self.fidelity.staleness_tolerance,
            "device": str(self.device),
            "device_path": self.device_path,
            "routing": str(self.layers[0].route) if self.layers else None,
            "cpu_threads": self.executor.num_threads,
            "cpu_cores": list(self.executor.cores) if self.executor.cores is not None else None,
            "tensor_parallel": self.tensor_parallel.to_dict(),
            "cpu_jobs": self.executor.jobs_submitted,
            "expert_format": self.expert_format,
            "device_expert_format": self.device_expert_format,
            "stream": self.stream,
            "staging_slots": self.staging_slots if self.stream != "off" else 0,
            "staging_bytes": self.staging.nbytes if self.staging is not None else 0,
            "host_expert_bytes": sum(layer.store.host_bytes for layer in self.layers),
            "host_expert_bytes_pinned": sum(layer.store.host_bytes for layer in self.layers if layer.store.pinned),
            "cpu_busy_seconds": round(self.executor.busy_seconds, 6),
            "budget": {
                "asked": dict(self.budget_asked) or {"auto": True},
                "resident_experts": sum(map(len, resident)),
                "total_experts": len(self.layers) * self.num_experts,
                "slots_per_layer": [layer.cache.num_slots for layer in self.layers],
            },
            "realloc": self.realloc,
            "hardware": self.hardware.to_dict(),
            "max_swap_bytes_per_step": self.max_swap_bytes_per_step,
            "requests_tracked": len(self.requests),
            "layers": [{"resident": r, **with_hit_rates(self.stats.layer(i))} for i, r in enumerate(resident)],
            "totals": with_hit_rates(self.stats.totals()),
        }

    def write_stats_to(self, path: str) -> None:
        """Keep `path` up to date with `report()` (every second, and at `close`)."""
        self.stats_file = StatsFile(path, self.report)
        # A weak reference: the exit hook must not keep a finished engine alive.
        atexit.register(_close_if_alive, weakref.ref(self))

    def close(self) -> None:
        """Final stats write, then stop the CPU threads. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for req_id in list(self.requests.routes):  # finished ones vLLM had not reported yet
            self.drop_request(req_id)
        if self.stats_file is not None:
            self.stats_file.close()
        self.executor.shutdown()


def _close_if_alive(engine_ref: weakref.ref[DaopEngine]) -> None:
    engine = engine_ref()
    if engine is not None:
        engine.close()

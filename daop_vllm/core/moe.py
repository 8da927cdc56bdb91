"""The exact DAOP forward of one MoE layer: resident experts on the device, the others on
the CPU on their true inputs, at the same time, combined with the routing weights."""

from __future__ import annotations

from collections.abc import Callable

import torch

from daop_vllm.core.cpu_executor import CpuExpertExecutor
from daop_vllm.core.device_cache import DeviceExpertCache
from daop_vllm.core.device_path import ExpertsForward
from daop_vllm.core.expert_store import HostExpertStore
from daop_vllm.core.requests import RequestTracker
from daop_vllm.core.stats import DaopStats

RoutingFunction = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class DaopMoE:
    """One MoE layer: its host store, device cache, router function and shared executor."""

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
    ) -> None:
        self.layer = layer
        self.store = store
        self.cache = cache
        self.route = route
        self.device_forward = device_forward
        self.executor = executor
        self.stats = stats
        self.requests = requests

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """x [T, H] and router_logits [T, E] on the device -> [T, H] on the device."""
        topk_weights, topk_ids = self.route(router_logits)
        host_ids = topk_ids.cpu()
        on_cpu = ~self.cache.is_resident[host_ids]  # [T, K]
        cpu_tokens = int(on_cpu.sum())
        device_tokens = host_ids.numel() - cpu_tokens
        # the weights go to the host once, for the CPU experts and for trace recording
        host_weights = topk_weights.cpu() if cpu_tokens or self.requests.recording else None
        cpu_job = None
        if cpu_tokens:
            cpu_job = self.executor.submit(
                x.cpu(), host_ids, host_weights, self.store.w13, self.store.w2, self.cache.host_slot_table
            )
        if device_tokens:
            out = self.device_forward(
                x, topk_ids, topk_weights, self.cache.w13, self.cache.w2, self.cache.slot_of_expert
            )
        else:
            out = torch.zeros_like(x)
        if cpu_job is not None:
            out += cpu_job.result().to(out.device, non_blocking=True)
        self._count(host_ids, host_weights, on_cpu, device_tokens, cpu_tokens)
        return out

    def _count(self, host_ids: torch.Tensor, host_weights: torch.Tensor | None, on_cpu: torch.Tensor,
               device_tokens: int, cpu_tokens: int) -> None:
        self.stats.add(self.layer, device_expert_tokens=device_tokens, cpu_expert_tokens=cpu_tokens)
        phases = self.requests.row_phases(host_ids.shape[0])
        if phases is None:
            return
        row_request, row_prefill = phases
        for phase, rows in (("prefill", row_prefill), ("decode", ~row_prefill & (row_request >= 0))):
            cpu = int(on_cpu[rows].sum())
            self.stats.add(self.layer, **{f"{phase}_device_expert_tokens": int(rows.sum()) * on_cpu.shape[1] - cpu,
                                          f"{phase}_cpu_expert_tokens": cpu})
        self.requests.record(self.layer, host_ids, host_weights if self.requests.recording else None)

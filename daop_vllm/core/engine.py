"""The core engine: every DAOP MoE layer of one model, their placement, the CPU executor and
the counters. No vLLM here; the adapter builds one engine per model."""

from __future__ import annotations

import torch

from daop_vllm.core.cpu_executor import CpuExpertExecutor
from daop_vllm.core.device_cache import DeviceExpertCache
from daop_vllm.core.expert_store import HostExpertStore
from daop_vllm.core.moe import DaopMoE, RoutingFunction
from daop_vllm.core.stats import DaopStats


class DaopEngine:
    """Owns the layers of one model. Layers are added while the model is built (empty
    caches), weights are loaded into their host stores, then `place` fills the device slots."""

    def __init__(self, device: torch.device, cpu_threads: int, mode: str = "exact") -> None:
        self.device = device
        self.mode = mode
        self.executor = CpuExpertExecutor(cpu_threads)
        self.stats = DaopStats()
        self.layers: list[DaopMoE] = []

    def add_layer(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        dtype: torch.dtype,
        route: RoutingFunction,
    ) -> DaopMoE:
        pin = self.device.type == "cuda"
        store = HostExpertStore(num_experts, hidden_size, intermediate_size, dtype, pin_memory=pin)
        cache = DeviceExpertCache(store, 0, self.device)
        layer = DaopMoE(len(self.layers), store, cache, route, self.executor, self.stats)
        self.layers.append(layer)
        self.stats.add_layer()
        return layer

    @property
    def num_experts(self) -> int:
        return self.layers[0].store.num_experts

    @property
    def expert_bytes(self) -> int:
        return self.layers[0].store.expert_bytes

    def place(self, resident: list[list[int]]) -> None:
        """Make `resident[l]` the device-resident experts of layer l (slots sized to fit)."""
        if len(resident) != len(self.layers):
            raise ValueError(f"placement has {len(resident)} layers, the model {len(self.layers)}")
        for layer, experts in zip(self.layers, resident):
            if layer.cache.num_slots != len(experts):
                layer.cache = DeviceExpertCache(layer.store, len(experts), self.device)
            layer.cache.fill(experts)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def resident_experts(self) -> list[list[int]]:
        return [layer.cache.resident_experts for layer in self.layers]

    def close(self) -> None:
        self.executor.shutdown()

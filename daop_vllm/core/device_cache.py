"""The device-resident expert slots of one MoE layer and the table that finds them."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from daop_vllm.core.expert_store import HostExpertStore


class DeviceExpertCache:
    """`num_slots` experts of one layer held on `device`, plus the slot table.

    `slot_of_expert[e]` is the slot holding expert e, or -1 when e lives only in host memory.
    When the device is the CPU, device and host are one memory: the slots are the host store
    itself (slot index == expert index) and filling a slot only changes the table.
    """

    def __init__(self, store: HostExpertStore, num_slots: int, device: torch.device) -> None:
        if not 0 <= num_slots <= store.num_experts:
            raise ValueError(f"num_slots must be in [0, {store.num_experts}], got {num_slots}")
        self.store = store
        self.num_slots = num_slots
        self.device = device
        self.shares_host_memory = device.type == "cpu"
        if self.shares_host_memory:
            self.w13, self.w2 = store.w13, store.w2
        else:
            self.w13 = torch.empty((num_slots, *store.w13.shape[1:]), dtype=store.w13.dtype, device=device)
            self.w2 = torch.empty((num_slots, *store.w2.shape[1:]), dtype=store.w2.dtype, device=device)
        self._expert_in_slot: list[int | None] = [None] * num_slots
        self.slot_of_expert = torch.full((store.num_experts,), -1, dtype=torch.int64, device=device)
        self.is_resident = torch.zeros(store.num_experts, dtype=torch.bool)  # on the host
        self.host_slot_table = torch.arange(store.num_experts)  # host store index, or -1 if resident

    @property
    def resident_experts(self) -> list[int]:
        return sorted(e for e in self._expert_in_slot if e is not None)

    def fill(self, experts: Sequence[int]) -> None:
        """Make exactly `experts` resident; experts already resident keep their slots."""
        wanted = list(dict.fromkeys(experts))
        if len(wanted) != len(experts) or len(wanted) > self.num_slots:
            raise ValueError(f"need at most {self.num_slots} distinct experts, got {list(experts)}")
        if any(not 0 <= e < self.store.num_experts for e in wanted):
            raise ValueError(f"expert ids must be in [0, {self.store.num_experts}), got {wanted}")
        keep = set(wanted)
        slots = [None if e not in keep else e for e in self._expert_in_slot]
        free = [s for s, e in enumerate(slots) if e is None]
        for expert in (e for e in wanted if e not in slots):
            slot = free.pop(0)
            slots[slot] = expert
            if not self.shares_host_memory:
                self.w13[slot].copy_(self.store.w13[expert], non_blocking=True)
                self.w2[slot].copy_(self.store.w2[expert], non_blocking=True)
        self._expert_in_slot = slots
        table = torch.full((self.store.num_experts,), -1, dtype=torch.int64)
        for slot, expert in enumerate(slots):
            if expert is not None:
                table[expert] = expert if self.shares_host_memory else slot
        self.slot_of_expert.copy_(table)
        self.is_resident = table >= 0
        self.host_slot_table = torch.where(self.is_resident, -1, torch.arange(self.store.num_experts))

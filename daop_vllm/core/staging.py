"""Staging slots: device rows into which a step copies host-resident experts to run them there
(streaming, streaming.py), in two banks shared by the MoE layers: layer j stages into bank
j % 2, so that layer j+1's experts can be copied a layer early (from the prediction) while
layer j still runs on its own bank's rows.

On CUDA the copies run on a side stream from pinned memory, after the work already queued (which
may still read the rows) and before the kernel that reads them (`ready`). Where device and host
are one memory nothing is copied: a staged expert is its store's own weights.
"""

from __future__ import annotations

import torch

from daop_vllm.core.device_cache import copy_experts, empty_slots
from daop_vllm.core.expert_math import ExpertWeights
from daop_vllm.core.expert_store import HostExpertStore, tensors_of


BANKS = 2


class StagingSlots:
    def __init__(self, store: HostExpertStore, num_slots: int, device: torch.device, shares_host_memory: bool) -> None:
        """Rows for `num_slots` experts per bank, shaped as `store`'s and in its device format
        (every layer's alike)."""
        if num_slots < 1:
            raise ValueError(f"staging needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.device = device
        self.shares_host_memory = shares_host_memory
        self.w13: ExpertWeights | None = None
        self.w2: ExpertWeights | None = None
        if not shares_host_memory:
            self.w13, self.w2 = (empty_slots(w, BANKS * num_slots, device) for w in (store.device_w13, store.device_w2))
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._copied: list[torch.cuda.Event | None] = [None] * BANKS

    @property
    def nbytes(self) -> int:
        """Device bytes the rows take (0 where device and host are one memory)."""
        if self.shares_host_memory:
            return 0
        return sum(t.numel() * t.element_size() for t in tensors_of(self.w13) + tensors_of(self.w2))

    def stage(self, store: HostExpertStore, experts: list[int],
              bank: int = 0) -> tuple[ExpertWeights, ExpertWeights, torch.Tensor]:
        """Copy `experts` of `store` into the rows of `bank` (at most num_slots: the staging
        budget); returns (w13, w2, slot table [E] on the device: each staged expert's row, -1
        elsewhere)."""
        if len(experts) > self.num_slots:
            raise AssertionError(f"{len(experts)} experts staged at once; the staging budget is {self.num_slots}")
        table = torch.full((store.num_experts,), -1, dtype=torch.int64, device="cpu")
        if self.shares_host_memory:
            table[experts] = torch.tensor(experts, dtype=torch.int64, device="cpu")
            return store.device_w13, store.device_w2, table
        rows = [bank * self.num_slots + i for i in range(len(experts))]
        table[experts] = torch.tensor(rows, dtype=torch.int64, device="cpu")
        if self.stream is None:
            copy_experts(self.w13, self.w2, store, list(zip(rows, experts)))
            return self.w13, self.w2, table.to(self.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # earlier kernels may still read the rows
        with torch.cuda.stream(self.stream):
            copy_experts(self.w13, self.w2, store, list(zip(rows, experts)))
            self._copied[bank] = torch.cuda.Event()
            self._copied[bank].record(self.stream)
        return self.w13, self.w2, table.pin_memory().to(self.device, non_blocking=True)

    def ready(self, bank: int = 0) -> None:
        """Make the current stream wait for `bank`'s last copies (nothing to wait for off CUDA)."""
        if self._copied[bank] is not None:
            torch.cuda.current_stream(self.device).wait_event(self._copied[bank])
            self._copied[bank] = None


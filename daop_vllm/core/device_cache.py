"""The device-resident expert slots of one MoE layer and the table that finds them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from daop_vllm.core.expert_store import HostExpertStore, tensors_of
from daop_vllm.core.quantized_experts import QuantizedWeights


class SlotTablePublisher:
    """Copies the host's slot table to the device without stalling the host: through two pinned
    buffers in turn, each copy queued on the current stream (so after the slot copies queued
    before it) and a buffer rewritten only once its last copy has completed."""

    def __init__(self, num_experts: int, pin_memory: bool = True, new_event: Callable[[], object] | None = None) -> None:
        self._buffers = [torch.empty(num_experts, dtype=torch.int64, device="cpu", pin_memory=pin_memory)
                         for _ in range(2)]
        self._copied: list[object | None] = [None, None]  # the event after each buffer's last copy
        self._new_event = new_event or torch.cuda.Event
        self._next = 0

    def publish(self, table: torch.Tensor, target: torch.Tensor) -> None:
        index, self._next = self._next, 1 - self._next
        if self._copied[index] is not None:
            self._copied[index].synchronize()
        self._buffers[index].copy_(table)
        target.copy_(self._buffers[index], non_blocking=True)
        event = self._new_event()
        event.record()
        self._copied[index] = event


def empty_slots(weights: torch.Tensor | QuantizedWeights, num_slots: int, device: torch.device):
    if isinstance(weights, QuantizedWeights):
        return weights.empty_slots(num_slots, device)
    return torch.empty((num_slots, *weights.shape[1:]), dtype=weights.dtype, device=device)


def copy_experts(w13, w2, store: HostExpertStore, slot_experts: list[tuple[int, int]]) -> None:
    """Queue the copies of each (slot, expert)'s weights from `store` into slot rows w13, w2 (on
    the current stream; at once on the CPU), in the device's format."""
    for slots, stored in ((w13, store.device_w13), (w2, store.device_w2)):
        for slot_tensor, stored_tensor in zip(tensors_of(slots), tensors_of(stored), strict=True):
            for slot, expert in slot_experts:
                slot_tensor[slot].copy_(stored_tensor[expert], non_blocking=True)


class DeviceExpertCache:
    """`num_slots` experts of one layer held on `device`, plus the slot table.

    `slot_of_expert[e]` is the slot holding expert e, or -1 when e lives only in host memory.
    When the device is the CPU, device and host are one memory: the slots are the host store
    itself (slot index == expert index) and filling a slot only changes the table.

    Swaps are asynchronous on CUDA: the retiring expert leaves the table at once (the CPU
    computes it from then on), the incoming one is copied on a side stream from pinned memory
    and enters the table at the first `finish_swaps` after its copy completed. Tables change
    only in `start_swap`, `finish_swaps` and `fill`, which the engine calls between steps.
    Every host-side tensor is created on the CPU explicitly: vLLM builds the model under
    `with torch.device(<accelerator>)`.
    """

    def __init__(self, store: HostExpertStore, num_slots: int, device: torch.device,
                 shares_host_memory: bool | None = None) -> None:
        """`shares_host_memory`: whether the device's experts are the store's own (default: the
        device is the CPU); False on the CPU keeps slot copies in host memory, which runs the
        two-memory (CUDA) path's structure on a CPU-only machine."""
        if not 0 <= num_slots <= store.num_experts:
            raise ValueError(f"num_slots must be in [0, {store.num_experts}], got {num_slots}")
        self.store = store
        self.num_slots = num_slots
        self.device = device
        self.shares_host_memory = device.type == "cpu" if shares_host_memory is None else shares_host_memory
        if self.shares_host_memory:
            self.w13, self.w2 = store.device_w13, store.device_w2
        else:
            self.w13, self.w2 = (empty_slots(w, num_slots, device) for w in (store.device_w13, store.device_w2))
        self._expert_in_slot: list[int | None] = [None] * num_slots
        self.slot_of_expert = torch.full((store.num_experts,), -1, dtype=torch.int64, device=device)
        self.is_resident = torch.zeros(store.num_experts, dtype=torch.bool, device="cpu")
        self.is_host = ~self.is_resident  # the forward's masks, kept with the table
        self.host_slot_table = torch.arange(store.num_experts, device="cpu")  # host store index, or -1 if resident
        self.holds_every_expert = False
        self._publisher = SlotTablePublisher(store.num_experts) if device.type == "cuda" else None
        self._incoming: list[tuple[int, int, torch.cuda.Event]] = []  # (slot, expert, copy done)

    @property
    def resident_experts(self) -> list[int]:
        return sorted(e for e in self._expert_in_slot if e is not None)

    @property
    def swaps_in_flight(self) -> int:
        return len(self._incoming)

    def fill(self, experts: Sequence[int]) -> None:
        """Make exactly `experts` resident; experts already resident keep their slots. Waits
        for swaps in flight first."""
        self.finish_swaps(wait=True)
        wanted = list(dict.fromkeys(experts))
        if len(wanted) != len(experts) or len(wanted) > self.num_slots:
            raise ValueError(f"need at most {self.num_slots} distinct experts, got {list(experts)}")
        if any(not 0 <= e < self.store.num_experts for e in wanted):
            raise ValueError(f"expert ids must be in [0, {self.store.num_experts}), got {wanted}")
        keep = set(wanted)
        slots = [e if e in keep else None for e in self._expert_in_slot]
        free = [s for s, e in enumerate(slots) if e is None]
        for expert in (e for e in wanted if e not in slots):
            slot = free.pop(0)
            slots[slot] = expert
            if not self.shares_host_memory:
                self._copy_to_slot(slot, expert)
        self._expert_in_slot = slots
        self._publish()

    def start_swap(self, incoming: int, retiring: int, stream: torch.cuda.Stream | None = None) -> None:
        """Replace resident `retiring` by host-resident `incoming` in the same slot."""
        slot = self._expert_in_slot.index(retiring)
        if incoming in self._expert_in_slot or any(e == incoming for _, e, _ in self._incoming):
            raise ValueError(f"expert {incoming} is already resident or on its way")
        if self.shares_host_memory or self.device.type == "cpu":  # no copy, or one in host memory: at once
            if not self.shares_host_memory:
                self._copy_to_slot(slot, incoming)
            self._expert_in_slot[slot] = incoming
            self._publish()
            return
        # The retiring expert leaves the tables before the copy overwrites its slot. If queuing
        # the copy fails, the slot stays empty (it may hold part of either expert): the tables
        # never point at it, and the CPU computes both experts.
        self._expert_in_slot[slot] = None
        self._publish()
        # the copy waits for the work queued so far, which may still read the slot
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._copy_to_slot(slot, incoming)
            done = torch.cuda.Event()
            done.record(stream)
        # The slots were allocated on the current stream: if they are freed while the copy runs,
        # the allocator must not hand their memory out before the side stream is done with it.
        for tensor in tensors_of(self.w13) + tensors_of(self.w2):
            tensor.record_stream(stream)
        self._incoming.append((slot, incoming, done))

    def _copy_to_slot(self, slot: int, expert: int) -> None:
        """Queue the copy of `expert`'s weights into `slot` (on the current stream; at once on the
        CPU), in the device's format."""
        copy_experts(self.w13, self.w2, self.store, [(slot, expert)])

    def finish_swaps(self, wait: bool = False) -> int:
        """Put the experts whose copies are complete (all of them with `wait`) into the table;
        returns how many."""
        if not self._incoming:  # every layer asks at every step
            return 0
        done = [item for item in self._incoming if wait or item[2].query()]
        for slot, expert, event in done:
            event.synchronize()
            self._expert_in_slot[slot] = expert
        self._incoming = [item for item in self._incoming if item not in done]
        if done:
            self._publish()
        return len(done)

    def _publish(self) -> None:
        """Rebuild the device and host tables from the slot assignment."""
        table = torch.full((self.store.num_experts,), -1, dtype=torch.int64, device="cpu")
        for slot, expert in enumerate(self._expert_in_slot):
            if expert is not None:
                table[expert] = expert if self.shares_host_memory else slot
        if self._publisher is not None:
            self._publisher.publish(table, self.slot_of_expert)
        else:
            self.slot_of_expert.copy_(table)
        self.is_resident = table >= 0
        self.is_host = ~self.is_resident
        self.holds_every_expert = bool(self.is_resident.all())
        with torch.inference_mode(False):  # a normal tensor under vLLM's too: checked once per version
            self.host_slot_table = torch.where(self.is_resident, -1, torch.arange(self.store.num_experts, device="cpu"))

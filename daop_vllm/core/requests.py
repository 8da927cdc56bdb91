"""Per-request routing state under continuous batching: what each request in flight used."""

from __future__ import annotations

import torch

from daop_vllm.core.batch import StepBatch


class RequestTracker:
    """Per request and layer: expert counts of its prompt (all prefill chunks) and a decayed
    count of its decode. Entries are dropped when a request finishes, is aborted or is
    preempted (a resumed request starts over)."""

    def __init__(self, num_layers: int, num_experts: int, decode_decay: float = 0.9) -> None:
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.decode_decay = decode_decay
        self.prefill_counts: dict[str, torch.Tensor] = {}  # req -> [L, E]
        self.decode_counts: dict[str, torch.Tensor] = {}  # req -> [L, E], decayed per step
        self.batch: StepBatch | None = None
        self._row_request = torch.empty(0, dtype=torch.int64)
        self._row_prefill = torch.empty(0, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.prefill_counts)

    def begin_step(self, batch: StepBatch) -> None:
        self.batch = batch
        for req_id, prefill in zip(batch.req_ids, batch.prefill):
            if req_id not in self.prefill_counts:
                self.prefill_counts[req_id] = torch.zeros(self.num_layers, self.num_experts)
                self.decode_counts[req_id] = torch.zeros(self.num_layers, self.num_experts)
            elif not prefill:
                self.decode_counts[req_id].mul_(self.decode_decay)
        self._row_request = torch.empty(0, dtype=torch.int64)

    def row_phases(self, total_rows: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(request index per row, prefill flag per row) for this step, or None outside vLLM
        steps (e.g. profiling runs, or a batch whose rows do not match)."""
        if self.batch is None or self.batch.num_rows > total_rows:
            return None
        if self._row_request.numel() != total_rows:
            self._row_request = self.batch.row_request(total_rows)
            self._row_prefill = self.batch.row_is_prefill(total_rows)
        return self._row_request, self._row_prefill

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Count layer `layer`'s routing [T, K] (host tensor) into each row's request."""
        phases = self.row_phases(topk_ids.shape[0])
        if phases is None:
            return
        row_request, row_prefill = phases
        for index, req_id in enumerate(self.batch.req_ids):
            rows = row_request == index
            counts = torch.bincount(topk_ids[rows].flatten(), minlength=self.num_experts).float()
            target = self.prefill_counts if self.batch.prefill[index] else self.decode_counts
            target[req_id][layer] += counts

    def end_step(self) -> None:
        self.batch = None

    def drop(self, req_id: str) -> None:
        self.prefill_counts.pop(req_id, None)
        self.decode_counts.pop(req_id, None)

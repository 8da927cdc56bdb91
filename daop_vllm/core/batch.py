"""Which request each token row of an engine step belongs to, and in which phase."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class StepBatch:
    """One engine step: requests in row order, the rows each one has, and whether those rows
    are prompt tokens (a prefill, or a piece of a chunked prefill) or generated ones."""

    req_ids: tuple[str, ...]
    rows: tuple[int, ...]
    prefill: tuple[bool, ...]
    prefill_completes: tuple[bool, ...]  # this step computes the last prompt token
    remaining: tuple[int, ...] = ()  # tokens each may still generate; () = unknown (1 each)

    def __post_init__(self) -> None:
        n = len(self.req_ids)
        if not (len(self.rows) == len(self.prefill) == len(self.prefill_completes) == n):
            raise ValueError("StepBatch fields must have one entry per request")
        if self.remaining and len(self.remaining) != n:
            raise ValueError("StepBatch.remaining must be empty or have one entry per request")

    @cached_property  # every layer's counting asks
    def num_rows(self) -> int:
        return sum(self.rows)

    def row_request(self, total_rows: int) -> torch.Tensor:
        """[total_rows] index into req_ids per row; -1 for padding rows past the requests."""
        index = torch.repeat_interleave(torch.arange(len(self.rows), device="cpu"), self._rows_tensor(),
                                        output_size=self.num_rows)
        return torch.cat([index, torch.full((total_rows - index.numel(),), -1, dtype=torch.int64, device="cpu")])

    def row_is_prefill(self, total_rows: int) -> torch.Tensor:
        """[total_rows] True for prompt rows (padding rows are neither phase)."""
        flags = torch.repeat_interleave(torch.tensor(self.prefill, dtype=torch.bool, device="cpu"), self._rows_tensor(),
                                        output_size=self.num_rows)  # known: no pass over the counts
        return torch.cat([flags, torch.zeros(total_rows - flags.numel(), dtype=torch.bool, device="cpu")])

    def _rows_tensor(self) -> torch.Tensor:
        return torch.tensor(self.rows, dtype=torch.int64, device="cpu")

"""Computes host-resident experts on the CPU, on threads of its own.

The caller submits a job and goes on with the device work; `CpuJob.result()` waits. Experts
are split between the threads by token count, each thread sums its experts into a partial
output, and the partials are added at the end. torch releases the GIL inside its kernels,
so the threads run in parallel with each other and with the caller.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from daop_vllm.core.expert_math import routed_experts_forward


def physical_core_count() -> int:
    """Physical cores usable by this process (logical CPUs when that cannot be told)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except ImportError:
        physical = logical
    return max(1, min(logical, physical))


class CpuJob:
    """The pending result [T, H] of one layer's CPU experts."""

    def __init__(self, parts: list[Future[torch.Tensor]]) -> None:
        self._parts = parts

    def result(self) -> torch.Tensor:
        partials = [part.result() for part in self._parts]
        total = partials[0]
        for partial in partials[1:]:
            total += partial
        return total


class CpuExpertExecutor:
    """A pool of `num_threads` threads that run routed experts held in host memory."""

    def __init__(self, num_threads: int) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.num_threads = num_threads
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="daop-cpu")

    def submit(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        w13: torch.Tensor,
        w2: torch.Tensor,
        slot_of_expert: torch.Tensor,
    ) -> CpuJob:
        """Start computing the experts that `slot_of_expert` maps, for all tokens routed to
        them. All tensors are on the CPU; see `routed_experts_forward` for their layouts."""
        tables = self._split_by_tokens(topk_ids, slot_of_expert)
        parts = [
            self._pool.submit(routed_experts_forward, x, topk_ids, topk_weights, w13, w2, table)
            for table in tables
        ]
        return CpuJob(parts)

    def _split_by_tokens(self, topk_ids: torch.Tensor, slot_of_expert: torch.Tensor) -> list[torch.Tensor]:
        """One slot table per thread, each mapping a share of the mapped experts, balanced by
        the tokens routed to them (largest first onto the least-loaded thread)."""
        tokens_per_expert = torch.bincount(topk_ids.flatten(), minlength=slot_of_expert.numel())
        experts = [e for e in torch.argsort(tokens_per_expert, descending=True, stable=True).tolist()
                   if slot_of_expert[e] >= 0 and tokens_per_expert[e] > 0]
        num_parts = min(self.num_threads, len(experts))
        if num_parts <= 1:
            return [slot_of_expert]
        loads = [0] * num_parts
        tables = [torch.full_like(slot_of_expert, -1) for _ in range(num_parts)]
        for expert in experts:
            part = loads.index(min(loads))
            loads[part] += int(tokens_per_expert[expert])
            tables[part][expert] = slot_of_expert[expert]
        return tables

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)

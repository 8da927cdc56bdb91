"""DAOP under vLLM's tensor parallelism: this worker's rank, its share of the machine's cores,
and the few start-up values every rank must agree on (the placement follows from them)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from vllm.config import VllmConfig

from daop_vllm.core.cpu_executor import rank_cores
from daop_vllm.core.hardware import Hardware
from daop_vllm.core.ranks import TensorParallelRank


def this_rank(vllm_config: VllmConfig) -> TensorParallelRank:
    """This worker's tensor-parallel rank (vLLM's process groups exist when the model is built)."""
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size == 1:
        return TensorParallelRank()
    from vllm.distributed.parallel_state import get_tp_group

    group = get_tp_group()
    return TensorParallelRank(group.rank_in_group, group.world_size, group.world_size // parallel.nnodes)


def rank_cpu_cores(device_type: str, rank: TensorParallelRank) -> tuple[int, ...] | None:
    """The CPUs this rank's executor runs on: on vLLM's CPU backend each rank's process is bound
    already (VLLM_CPU_OMP_THREADS_BIND), so its own; with a GPU per rank every rank sees the
    whole machine, so a disjoint slice of it. None with one rank: unpinned, as ever."""
    if rank.size == 1:
        return None
    available = sorted(os.sched_getaffinity(0))
    if device_type == "cpu":
        return tuple(available)
    return rank_cores(available, rank.rank % rank.local_ranks, rank.local_ranks)


def agreed_hardware(measure: Callable[[], Hardware], rank: TensorParallelRank) -> Hardware:
    """The machine as rank 0 measures it, on every rank: re-allocation and streaming decide from
    it. The other ranks do not measure (their copies would run beside rank 0's and skew them)."""
    if rank.size == 1:
        return measure()
    from vllm.distributed.parallel_state import get_tp_group

    return get_tp_group().broadcast_object(measure() if rank.rank == 0 else None, src=0)


def agreed_minimum(value: int, rank: TensorParallelRank) -> int:
    """The smallest of every rank's `value` (device memory left for experts differs by rank)."""
    if rank.size == 1:
        return value
    from vllm.distributed.parallel_state import get_tp_group

    smallest = torch.tensor([value], dtype=torch.int64)
    torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN, group=get_tp_group().cpu_group)
    return int(smallest.item())

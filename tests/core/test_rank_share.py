"""A tensor-parallel rank's share of the machine: disjoint CPU slices, executor threads pinned to
them, thread counts from the share."""

import os

import pytest

from daop_vllm.core.cpu_executor import CpuExpertExecutor, default_cpu_threads, rank_cores
from daop_vllm.core.ranks import TensorParallelRank


def test_ranks_get_disjoint_equal_slices():
    cpus = [7, 1, 2, 3, 4, 5, 6, 0]
    slices = [rank_cores(cpus, r, 2) for r in range(2)]
    assert slices == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert [rank_cores(cpus, r, 3) for r in range(3)] == [(0, 1), (2, 3), (4, 5)]
    with pytest.raises(ValueError, match="cannot share"):
        rank_cores([0], 0, 2)
    with pytest.raises(ValueError, match="not one of"):
        rank_cores(cpus, 2, 2)


def test_rank_validates_its_place():
    assert not TensorParallelRank().in_lockstep and TensorParallelRank(1, 2, 2).in_lockstep
    with pytest.raises(ValueError):
        TensorParallelRank(2, 2)


def _threads() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def test_executor_threads_are_pinned_to_the_rank_cores():
    cpu = min(os.sched_getaffinity(0))
    caller = os.sched_getaffinity(0)
    before = _threads()
    executor = CpuExpertExecutor(2, cores=[cpu])
    executor._torch_thread.submit(lambda: None).result()  # its thread starts with its first job
    started = _threads() - before
    try:
        assert len(started) >= 2, "the native pool's threads and the torch thread"
        assert all(os.sched_getaffinity(tid) == {cpu} for tid in started)
        assert os.sched_getaffinity(0) == caller, "the creating thread keeps its own CPUs"
        assert executor.cores == (cpu,)
    finally:
        executor.shutdown()


def test_default_threads_follow_the_rank_share():
    everything = sorted(os.sched_getaffinity(0))
    assert default_cpu_threads("cpu", everything) == default_cpu_threads("cpu")
    assert default_cpu_threads("cpu", everything[:1]) == max(1, default_cpu_threads("cpu") // len(everything))

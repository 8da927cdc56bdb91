"""The simulator under tensor parallelism: one GPU's clocks, with 1/N of every expert, 1/N of the
host's CPU and memory bandwidth, its own device and PCIe link, and two all-reduces per layer."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from daop_vllm.core.hardware import Hardware
from daop_vllm.offline.model_shapes import MoEShape, model_shape
from daop_vllm.offline.simulator import ALLREDUCE_LATENCY_S, POLICIES, Simulator, simulate
from daop_vllm.offline.traces import TraceSequence, read_traces

SHAPE = MoEShape("toy", num_layers=2, num_experts=4, top_k=1, hidden_size=1024, intermediate_size=2048)
HW = Hardware("toy", pcie_gbps=10.0, device_gbps=1000.0, cpu_gbps=50.0, device_tflops=100.0, cpu_tflops=1.0,
              interconnect_gbps=20.0)
EXPERT_BYTES = 3 * 1024 * 2048 * 2
ATTENTION_S = 2.5 * 1024**2 * 2 / 1000e9  # one GPU's attention projections per layer, memory-bound
TINY_TRACE = Path(__file__).resolve().parents[1] / "data" / "tiny-mixtral.jsonl.gz"


def toy_sequence(decode_experts: list[int], tokens: int) -> TraceSequence:
    decode = [[[e]] * tokens for e in decode_experts]
    return TraceSequence("toy", 2, 4, 1, True, [[] for _ in decode_experts], decode)


def allreduce_s(gpus: int, rows: int) -> float:
    """A ring all-reduce of `rows` bf16 hidden states over HW's interconnect."""
    return ALLREDUCE_LATENCY_S + 2 * (gpus - 1) / gpus * rows * 1024 * 2 / 20e9


def run(policy: str, gpus: int, **kwargs) -> dict:
    """`policy` without re-allocation (its misses stay misses) on two layers that both miss."""
    sim = Simulator(replace(POLICIES[policy], realloc="off"), SHAPE, HW, [[0], [0]], tensor_parallel=gpus, **kwargs)
    return sim.run([toy_sequence([1, 2], tokens=5)])


def test_one_gpu_is_the_model_without_tensor_parallelism():
    static = run("static", 1)
    cpu_expert = EXPERT_BYTES / (50e9 * POLICIES["static"].cpu_efficiency)
    assert static["tokens_per_s"] == pytest.approx(1 / (2 * (ATTENTION_S + cpu_expert) + ATTENTION_S), rel=1e-12)
    assert static["allreduce_s_per_token"] == 0
    ondemand = run("ondemand", 1)
    assert ondemand["pcie_bytes_per_token"] == 2 * EXPERT_BYTES


def test_two_gpus_the_cpu_bound_policy_reads_half_an_expert_at_half_the_hosts_rate_and_waits_for_all_reduces():
    static = run("static", 2)
    # half the bytes at half the CPU's rate: the same CPU time per host expert as one GPU's
    cpu_expert = (EXPERT_BYTES / 2) / (50e9 / 2 * POLICIES["static"].cpu_efficiency)
    layer = ATTENTION_S / 2 + allreduce_s(2, 1) + cpu_expert + allreduce_s(2, 1)  # attention's, then the MoE's
    assert static["tokens_per_s"] == pytest.approx(1 / (2 * layer + ATTENTION_S / 2), rel=1e-12)
    assert static["allreduce_s_per_token"] == pytest.approx(4 * allreduce_s(2, 1), rel=1e-12)
    assert static["cpu_expert_tokens_per_token"] == run("static", 1)["cpu_expert_tokens_per_token"] == 2


def test_two_gpus_each_read_and_copy_half_of_every_expert_at_their_own_full_rates():
    ondemand = run("ondemand", 2)
    assert ondemand["pcie_bytes_per_token"] == 2 * EXPERT_BYTES / 2
    gpu = run("gpu", 2)
    device_expert = (EXPERT_BYTES / 2) / 1000e9
    copy = (EXPERT_BYTES / 2) / 10e9  # each GPU its own PCIe link
    assert 1 / ondemand["tokens_per_s"] - 1 / gpu["tokens_per_s"] == pytest.approx(2 * copy, rel=1e-9)
    layer = ATTENTION_S / 2 + 2 * allreduce_s(2, 1) + device_expert
    assert gpu["tokens_per_s"] == pytest.approx(1 / (2 * layer + ATTENTION_S / 2), rel=1e-12)


def test_the_all_reduce_grows_with_the_rows_of_a_step():
    sim = Simulator(POLICIES["static"], SHAPE, HW, [[0], [0]], tensor_parallel=4)
    assert sim._allreduce_s(16) == pytest.approx(allreduce_s(4, 16), rel=1e-12)
    assert sim._allreduce_s(16) > sim._allreduce_s(1) > ALLREDUCE_LATENCY_S
    assert Simulator(POLICIES["static"], SHAPE, HW, [[0], [0]])._allreduce_s(16) == 0


def test_each_gpu_engine_weighs_its_share_of_the_cpu_and_its_own_device():
    sim = Simulator(POLICIES["auto-exact"], SHAPE, HW, [[0], [0]], tensor_parallel=2)
    assert sim.engine.hardware.cpu_gbps == 25.0 and sim.engine.hardware.cpu_tflops == 0.5
    assert (sim.engine.hardware.pcie_gbps, sim.engine.hardware.device_gbps) == (10.0, 1000.0)
    shared = replace(SHAPE, shared_intermediate_size=4096).tensor_parallel_rank(2)
    assert (shared.intermediate_size, shared.shared_intermediate_size) == (1024, 2048)


def test_the_same_memory_per_gpu_holds_twice_the_fraction_on_two_gpus():
    seqs = list(read_traces(TINY_TRACE))
    runs = {(gpus, fraction): simulate(seqs, ["static"], model_shape("tiny-mixtral"), HW, fraction, calibrate_on=0.34,
                                       tensor_parallel=gpus)["settings"]
            for gpus, fraction in ((1, 0.25), (2, 0.5), (2, 0.25))}
    assert runs[(2, 0.5)]["tensor_parallel_size"] == 2 and runs[(1, 0.25)]["tensor_parallel_size"] == 1
    assert runs[(2, 0.5)]["expert_bytes_per_gpu"] == runs[(2, 0.5)]["expert_bytes"] // 2
    assert runs[(2, 0.5)]["resident_expert_bytes_per_gpu"] == runs[(1, 0.25)]["resident_expert_bytes_per_gpu"] > 0
    assert runs[(2, 0.25)]["resident_experts"] == runs[(1, 0.25)]["resident_experts"]


@pytest.mark.parametrize("gpus, message", [(0, "must be >= 1, got 0"), (3, "size 3 does not divide toy's expert")])
def test_a_size_that_does_not_split_the_experts_is_refused(gpus, message):
    with pytest.raises(ValueError, match=message):
        Simulator(POLICIES["static"], SHAPE, HW, [[0], [0]], tensor_parallel=gpus)
    with pytest.raises(ValueError, match="shared experts' intermediate size 1000"):
        replace(SHAPE, shared_intermediate_size=1000).tensor_parallel_rank(16)


def test_simulate_command_reports_the_size_and_refuses_a_bad_one_in_one_line():
    command = [sys.executable, "-m", "daop_vllm.cli", "simulate", "--trace", str(TINY_TRACE), "--calibrate-on", "0.34",
               "--policies", "static", "auto-daop"]
    ok = subprocess.run([*command, "--tensor-parallel", "2", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert result["settings"]["tensor_parallel_size"] == 2
    assert all(r["allreduce_s_per_token"] > 0 for r in result["policies"].values())
    text = subprocess.run([*command, "--tensor-parallel", "2"], capture_output=True, text=True)
    assert text.returncode == 0 and "tensor parallel 2" in text.stdout
    for bad, message in (("0", "--tensor-parallel must be >= 1, got 0"), ("3", "size 3 does not divide")):
        refused = subprocess.run([*command, "--tensor-parallel", bad], capture_output=True, text=True)
        assert refused.returncode == 2 and refused.stderr.strip().count("\n") == 0, refused.stderr
        assert message in refused.stderr


def test_the_sweep_runs_one_gpu_at_each_fraction_over_n_and_cuts_distinct_sequences_for_a_batch():
    from daop_vllm.bench.simulation import TP_FRACTIONS, batch_sequences, tensor_parallel_points

    points = tensor_parallel_points([2])
    assert {(2, f) for f in TP_FRACTIONS} | {(1, f) for f in TP_FRACTIONS} <= set(points)
    assert {(1, f / 2) for f in TP_FRACTIONS} <= set(points) and len(points) == len(set(points))
    seqs = list(read_traces(TINY_TRACE))
    batch = batch_sequences(seqs, 4, 10)
    assert len(batch) == 4 and all(len(layer) == 10 for s in batch for layer in s.decode)
    assert len({tuple(map(tuple, s.decode[0])) for s in batch}) == 4, "every sequence starts elsewhere"
    assert not any(s.prefill[0] for s in batch)

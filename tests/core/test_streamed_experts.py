"""Streaming in the engine: host experts copied into the shared staging rows and run by the
device path, on a CPU-only machine with host and device as two memories (the CUDA path's
structure: real copies, the device function on the rows) and as one."""

import pytest
import torch

from daop_vllm.core.batch import StepBatch
from daop_vllm.core.engine import DaopEngine
from daop_vllm.core.hardware import Hardware
from daop_vllm.core.staging import StagingSlots

from .test_moe import E, H, K, L, dense_moe
from .test_moe import make_engine as make_moe_engine

# PCIe as fast as the device's memory: streaming misses pays; and so slow that it never does
FAST_PCIE = Hardware("fast-pcie", pcie_gbps=1000.0, device_gbps=1000.0, cpu_gbps=10.0)
SLOW_PCIE = Hardware("slow-pcie", pcie_gbps=0.001, device_gbps=1000.0, cpu_gbps=10.0)


def make_engine(stream: str, staging_slots: int, one_memory: bool, hardware: Hardware | None = None) -> DaopEngine:
    return make_moe_engine(one_memory=one_memory, stream=stream, staging_slots=staging_slots, hardware=hardware)


def run_layers(engine, tokens: int, seed: int = 1):
    """Every layer once on its own input inside one engine step of two prompts; returns the
    outputs and the dense reference's, and the ids."""
    gen = torch.Generator().manual_seed(seed)
    engine.begin_step(StepBatch(("a", "b"), (tokens - 1, 1), (True, False), (True, False)))
    results = []
    for layer in engine.layers:
        x, logits = torch.randn(tokens, H, generator=gen), torch.randn(tokens, E, generator=gen)
        expected, ids = dense_moe(x, logits, layer.store.w13, layer.store.w2)
        results.append((layer.forward(x, logits), expected, ids))
    engine.end_step()
    return results


@pytest.mark.parametrize("one_memory", [False, True], ids=["two-memories", "one-memory"])
@pytest.mark.parametrize("staging_slots", [1, 3, 8])
@pytest.mark.parametrize("resident", [[], [0, 5], [1, 2, 4, 6, 7]], ids=["none", "two", "five"])
def test_streaming_every_miss_is_exact_and_counted(one_memory, staging_slots, resident):
    engine = make_engine("all", staging_slots, one_memory)
    engine.place([resident] * L)
    for out, expected, ids in run_layers(engine, tokens=9):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    totals, host = engine.stats.totals(), E - len(resident)
    assert totals["cpu_expert_tokens"] == 0, "every miss ran on the device"
    assert totals["device_expert_tokens"] == L * 9 * K
    assert 0 < totals["streamed_experts"] <= L * host
    assert totals["prefill_streamed_experts"] > 0 and totals["decode_streamed_experts"] > 0
    assert totals["stream_bytes"] == (0 if one_memory else totals["streamed_experts"] * engine.expert_bytes)
    engine.close()


def test_auto_streams_where_pcie_is_cheaper_and_off_streams_nothing():
    streamed = {}
    for stream, hardware in (("auto", FAST_PCIE), ("auto", SLOW_PCIE), ("off", FAST_PCIE)):
        engine = make_engine(stream, 2, one_memory=False, hardware=hardware)
        engine.place([[0, 5]] * L)
        for out, expected, _ in run_layers(engine, tokens=32):
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        streamed[(stream, hardware.name)] = engine.stats.totals()["streamed_experts"]
        engine.close()
    assert streamed[("auto", "fast-pcie")] > 0
    assert streamed[("auto", "slow-pcie")] == 0
    assert streamed[("off", "fast-pcie")] == 0


def test_the_staging_budget_is_never_exceeded():
    engine = make_engine("all", 2, one_memory=False)
    engine.place([[0]] * L)
    with pytest.raises(AssertionError, match="3 experts staged at once; the staging budget is 2"):
        engine.staging.stage(engine.layers[0].store, [1, 2, 3])
    staged = []
    original = StagingSlots.stage

    def watch(self, store, experts):
        staged.append(len(experts))
        return original(self, store, experts)

    StagingSlots.stage = watch
    try:
        run_layers(engine, tokens=24)
    finally:
        StagingSlots.stage = original
    assert staged and max(staged) <= 2 and sum(staged) == engine.stats.totals()["streamed_experts"]
    assert engine.report()["staging_bytes"] == 2 * engine.expert_bytes
    engine.close()

"""Streaming in the engine: host experts copied into the shared staging rows and run by the
device path, on a CPU-only machine with host and device as two memories (the CUDA path's
structure: real copies, the device function on the rows) and as one."""

import pytest
import torch

from daop_vllm.core.batch import StepBatch
from daop_vllm.core.engine import DaopEngine
from daop_vllm.core.hardware import Hardware
from daop_vllm.core.prediction import Fidelity
from daop_vllm.core.staging import BANKS, StagingSlots

from .test_moe import E, H, K, L, dense_moe
from .test_moe import make_engine as make_moe_engine

# PCIe as fast as the device's memory: streaming misses pays; and so slow that it never does
FAST_PCIE = Hardware("fast-pcie", pcie_gbps=1000.0, device_gbps=1000.0, cpu_gbps=10.0)
SLOW_PCIE = Hardware("slow-pcie", pcie_gbps=0.001, device_gbps=1000.0, cpu_gbps=10.0)


def make_engine(stream: str, staging_slots: int, one_memory: bool, hardware: Hardware | None = None,
                fidelity: Fidelity | None = None) -> DaopEngine:
    return make_moe_engine(one_memory=one_memory, stream=stream, staging_slots=staging_slots, hardware=hardware,
                           fidelity=fidelity)


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

    def watch(self, store, experts, bank=0):
        staged.append(len(experts))
        return original(self, store, experts, bank)

    StagingSlots.stage = watch
    try:
        run_layers(engine, tokens=24)
    finally:
        StagingSlots.stage = original
    assert staged and max(staged) <= 2 and sum(staged) == engine.stats.totals()["streamed_experts"]
    assert engine.report()["staging_bytes"] == BANKS * 2 * engine.expert_bytes
    engine.close()


DECODE_ONLY = StepBatch(tuple("abcdef"), (1,) * 6, (False,) * 6, (False,) * 6)


def make_routed_engine(mode: str, stream: str, resident: list[int]) -> tuple[DaopEngine, list[torch.Tensor]]:
    """Two memories, fast PCIe, every layer's gate set (the layer before predicts from it)."""
    engine = make_engine(stream, 2, one_memory=False, hardware=FAST_PCIE, fidelity=Fidelity(mode, first_predicted_layer=1))
    gen = torch.Generator().manual_seed(5)
    gates = [torch.randn(E, H, generator=gen) for _ in range(L)]
    for index, gate in enumerate(gates):
        engine.set_router(index, lambda x, gate=gate: x @ gate.t())
    engine.place([resident] * L)
    return engine, gates


def decode_step(engine, gates, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One decode step through every layer, consecutive inputs close (a residual stream, so
    predictions are mostly right); (output, dense reference) per layer."""
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(DECODE_ONLY.num_rows, H, generator=gen)
    engine.begin_step(DECODE_ONLY)
    results = []
    for i, (layer, gate) in enumerate(zip(engine.layers, gates)):
        x = x0 + 0.2 * i * torch.randn(x0.shape, generator=gen)
        logits = x @ gate.t()
        results.append((layer.forward(x, logits), dense_moe(x, logits, layer.store.w13, layer.store.w2)[0]))
    engine.end_step()
    return results


def test_exact_mode_stages_predicted_decode_experts_a_layer_early_and_stays_exact():
    engine, gates = make_routed_engine("exact", "auto", [0, 5])
    assert [layer.stages_next for layer in engine.layers] == [True, True, False]
    staged_banks = []
    original = StagingSlots.stage

    def watch(self, store, experts, bank=0):
        staged_banks.append((store, len(experts), bank))
        return original(self, store, experts, bank)

    StagingSlots.stage = watch
    try:
        for seed in range(4):
            for out, expected in decode_step(engine, gates, seed):
                torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    finally:
        StagingSlots.stage = original
    totals = engine.stats.totals()
    assert 0 < totals["staged_early_used"] <= totals["staged_early"]
    assert engine.stats.layer(0)["staged_early"] == 0  # nothing predicts the first layer
    assert totals["streamed_experts"] >= totals["staged_early_used"]
    assert totals["stream_bytes"] == (totals["streamed_experts"] - totals["staged_early_used"]
                                      + totals["staged_early"]) * engine.expert_bytes
    assert totals["precomputed_used"] == 0, "exact mode pre-computes nothing: the prediction only stages"
    assert totals["device_expert_tokens"] + totals["cpu_expert_tokens"] == 4 * L * DECODE_ONLY.num_rows * K
    stores = [layer.store for layer in engine.layers]
    assert all(n <= 2 and bank == stores.index(store) % BANKS for store, n, bank in staged_banks), \
        "each layer's experts go to its own bank, at most the staging budget at once"
    engine.close()


def test_without_staging_exact_mode_predicts_nothing():
    for stream in ("off", "all"):
        engine, gates = make_routed_engine("exact", stream, [0, 5])
        assert not any(layer.stages_next or layer.next_layer for layer in engine.layers)
        decode_step(engine, gates, 0)
        assert engine.stats.totals()["staged_early"] == engine.stats.totals()["predictions"] == 0
        engine.close()


@pytest.mark.parametrize("mode", ["verified", "daop"])
def test_staged_experts_leave_the_precomputation_and_the_counters_add_up(mode):
    engine, gates = make_routed_engine(mode, "auto", [0, 5])
    for seed in range(4):
        decode_step(engine, gates, seed)
    totals = engine.stats.totals()
    assert totals["staged_early"] > 0
    predicted_host_pairs = totals["precomputed_used"] + totals["precomputed_rejected"] + totals["precomputed_wasted"]
    assert predicted_host_pairs > 0 and totals["staged_early_used"] > 0
    engine.close()


@pytest.mark.parametrize("device_s, stages", [(0.01, True), (2.0, False)], ids=["device-idle", "device-bound"])
def test_staging_early_weighs_the_next_layers_resident_work(device_s, stages):
    """The simulator's plan, in the engine: a next layer whose predicted resident pairs keep the
    device busier than its CPU experts keep the CPU gains nothing from copies that add device
    work; a device with time to spare takes them (copies cheap; an expert takes 0.6 s on the CPU,
    2 s or 0.01 s on the device). With no device work in the plan, both would stage."""
    from daop_vllm.core.streaming import MissCosts

    engine, gates = make_routed_engine("verified", "auto", [0, 5])
    for layer in engine.layers:
        layer.stream_costs = MissCosts(cpu_s=lambda n: 0.6, device_s=lambda n: device_s, copy_s=0.1)
    for seed in range(4):
        decode_step(engine, gates, seed)
    assert (engine.stats.totals()["staged_early"] > 0) == stages
    engine.close()

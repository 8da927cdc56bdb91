"""The exact forward of the core engine against a dense reference, on any torch device."""

import pytest
import torch
import torch.nn.functional as F

from daop_vllm.core.engine import DaopEngine
from daop_vllm.core.routing import SoftmaxTopK

E, K, H, I, L = 8, 2, 48, 40, 3


def dense_moe(x, logits, w13, w2):
    """Every token through its top-k experts, written as plainly as possible."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, K, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(K):
            e = int(ids[t, k])
            gate, up = (x[t] @ w13[e].t()).chunk(2)
            out[t] += weights[t, k].to(x.dtype) * ((F.silu(gate) * up) @ w2[e].t())
    return out, ids


def make_engine(cpu_threads=2, **engine_options):
    engine = DaopEngine(torch.device("cpu"), cpu_threads=cpu_threads, **engine_options)
    gen = torch.Generator().manual_seed(0)
    for _ in range(L):
        layer = engine.add_layer(E, H, I, torch.float32, SoftmaxTopK(K))
        layer.store.w13.copy_(torch.randn(layer.store.w13.shape, generator=gen) * 0.2)
        layer.store.w2.copy_(torch.randn(layer.store.w2.shape, generator=gen) * 0.2)
    return engine


@pytest.mark.parametrize("tokens", [1, 3, 17])
@pytest.mark.parametrize(
    "resident",
    [[], [0, 1, 2, 3, 4, 5, 6, 7], [0, 5], [3], [1, 2, 4, 6, 7]],
    ids=["none", "all", "two", "one", "five"],
)
@pytest.mark.parametrize("cpu_threads", [1, 3])
def test_exact_forward_matches_dense_and_counts_routing(tokens, resident, cpu_threads):
    engine = make_engine(cpu_threads)
    engine.place([resident] * L)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, H, generator=gen)
    logits = torch.randn(tokens, E, generator=gen)
    for layer in engine.layers:
        out = layer.forward(x, logits)
        expected, ids = dense_moe(x, logits, layer.store.w13, layer.store.w2)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        on_device = sum(int(e) in resident for e in ids.flatten())
        counts = engine.stats.layer(layer.layer)
        assert counts["device_expert_tokens"] == on_device
        assert counts["cpu_expert_tokens"] == tokens * K - on_device
    engine.close()


def test_one_expert_gets_all_tokens():
    engine = make_engine()
    engine.place([[2]] * L)
    x = torch.randn(9, H)
    logits = torch.full((9, E), -5.0)
    logits[:, 2] = 5.0  # everyone's first choice
    layer = engine.layers[0]
    torch.testing.assert_close(layer.forward(x, logits), dense_moe(x, logits, layer.store.w13, layer.store.w2)[0])
    assert engine.stats.layer(0)["device_expert_tokens"] == 9 and engine.stats.layer(0)["cpu_expert_tokens"] == 9
    engine.close()


def test_replacing_keeps_slots_of_experts_that_stay():
    engine = make_engine()
    engine.place([[0, 1, 2]] * L)
    cache = engine.layers[0].cache
    before = dict(zip(cache.resident_experts, cache.slot_of_expert[cache.resident_experts].tolist()))
    engine.place([[1, 2, 5]] * L)
    assert engine.layers[0].cache is cache
    after = dict(zip(cache.resident_experts, cache.slot_of_expert[cache.resident_experts].tolist()))
    assert after[1] == before[1] and after[2] == before[2]
    assert cache.is_resident.tolist() == [e in (1, 2, 5) for e in range(E)]
    assert cache.host_slot_table.tolist() == [-1 if e in (1, 2, 5) else e for e in range(E)]
    engine.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: checks host->device slot copies")
def test_device_slots_hold_copies_on_cuda():
    engine = DaopEngine(torch.device("cuda"), cpu_threads=2)
    layer = engine.add_layer(E, H, I, torch.float32, SoftmaxTopK(K))
    layer.store.w13.normal_()
    layer.store.w2.normal_()
    assert layer.store.w13.is_pinned()
    engine.place([[4, 6]])
    x, logits = torch.randn(5, H, device="cuda"), torch.randn(5, E, device="cuda")
    expected, _ = dense_moe(x.cpu(), logits.cpu(), layer.store.w13, layer.store.w2)
    torch.testing.assert_close(layer.forward(x, logits).cpu(), expected, rtol=1e-4, atol=1e-4)
    engine.close()


@pytest.mark.parametrize("resident", [[0, 5], list(range(E))], ids=["two", "all: routed in the job"])
@pytest.mark.parametrize("fail_every", [1, 2])
def test_a_failing_cpu_job_is_recomputed_and_counted(fail_every, resident):
    """Injected executor faults (the test-only option): the layer recomputes the experts on
    its fallback path, the output stays exact, and each fault is counted."""
    engine = make_engine(cpu_threads=2)
    engine.executor.fail_every = fail_every
    engine.place([resident] * L)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, H, generator=gen)
    logits = torch.randn(6, E, generator=gen)
    for _ in range(2):
        for layer in engine.layers:
            expected, _ = dense_moe(x, logits, layer.store.w13, layer.store.w2)
            torch.testing.assert_close(layer.forward(x, logits), expected, rtol=1e-5, atol=1e-5)
    jobs = 2 * L
    assert engine.stats.totals()["faults_recovered"] == jobs // fail_every
    assert engine.report()["cpu_busy_seconds"] > 0
    engine.close()


@pytest.mark.parametrize("resident", [[0, 1, 2, 3, 4, 5, 6, 7], [2, 5], []], ids=["all", "two", "none"])
def test_on_the_cpu_every_expert_runs_in_one_executor_job(resident):
    """Device and host are one memory: resident experts go to the executor's native kernels with
    the others, one job per layer, never the torch reference; counters still split by residency."""
    engine = make_engine(cpu_threads=2)
    engine.place([resident] * L)
    gen = torch.Generator().manual_seed(11)
    x, logits = torch.randn(5, H, generator=gen), torch.randn(5, E, generator=gen)
    for layer in engine.layers:
        expected, ids = dense_moe(x, logits, layer.store.w13, layer.store.w2)
        torch.testing.assert_close(layer.forward(x, logits), expected, rtol=1e-5, atol=1e-5)
        on_device = sum(int(e) in resident for e in ids.flatten())
        assert engine.stats.layer(layer.layer)["device_expert_tokens"] == on_device
    assert engine.executor.jobs_submitted == L
    engine.close()


@pytest.mark.parametrize("resident, routed_by_torch", [(list(range(E)), 0), ([2, 5], L)], ids=["all", "two"])
def test_a_layer_in_one_job_routes_there_unless_its_ids_are_counted(resident, routed_by_torch, monkeypatch):
    """One memory, every expert resident: the executor's job routes the layer (the extension's
    softmax top-k, torch.topk's choice), no torch op routes it, and the counters follow from the
    shape. With host experts the layer routes in torch: its ids are counted."""
    engine = make_engine(cpu_threads=2)
    if engine.executor.kernels is None:
        pytest.skip("needs the C extension (not built here): without it the layer routes in torch")
    engine.place([resident] * L)
    calls = []
    torch_router = SoftmaxTopK.__call__
    monkeypatch.setattr(SoftmaxTopK, "__call__", lambda router, logits: calls.append(1) or torch_router(router, logits))
    gen = torch.Generator().manual_seed(3)
    x, logits = torch.randn(4, H, generator=gen), torch.randint(-1, 2, (4, E), generator=gen).float()  # ties
    for layer in engine.layers:
        expected, ids = dense_moe(x, logits, layer.store.w13, layer.store.w2)
        torch.testing.assert_close(layer.forward(x, logits), expected, rtol=1e-5, atol=1e-5)
        on_device = sum(int(e) in resident for e in ids.flatten())
        assert engine.stats.layer(layer.layer)["device_expert_tokens"] == on_device
    assert len(calls) == routed_by_torch
    engine.close()


@pytest.mark.parametrize("resident", [[0, 1, 2, 3, 4, 5, 6, 7], [2, 5], []], ids=["all", "two", "none"])
def test_an_experts_call_replaces_the_executor_where_memory_is_one(resident):
    """DaopEngine.use_experts_call (the adapter gives vLLM's CPU fused-MoE op): each layer's
    experts in that one call, ids < 0 skipped as the call's contract says; no executor job."""
    from daop_vllm.core.expert_math import routed_experts_forward

    engine = make_engine(cpu_threads=2)
    calls = []

    def make_call(store):
        def call(x, topk_ids, topk_weights):
            calls.append(topk_ids.shape)
            return routed_experts_forward(x, topk_ids, topk_weights, store.w13, store.w2,
                                          torch.arange(store.num_experts))
        return call

    assert engine.use_experts_call(make_call, "a test call") == L
    assert engine.device_path == "a test call"
    engine.place([resident] * L)
    gen = torch.Generator().manual_seed(12)
    x, logits = torch.randn(4, H, generator=gen), torch.randn(4, E, generator=gen)
    for layer in engine.layers:
        expected, _ = dense_moe(x, logits, layer.store.w13, layer.store.w2)
        torch.testing.assert_close(layer.forward(x, logits), expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == L and engine.executor.jobs_submitted == 0
    engine.close()

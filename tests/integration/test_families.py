"""MoE families beyond Mixtral under `load_format="daop"`: a small local checkpoint of each,
exact mode equal to the stock engine's greedy output at every fraction, predicting modes run."""

import pytest

from daop_vllm.model_builder import TinyMixtralShape, build_tiny_mixtral

from .engines import close_llm, greedy_ids, make_llm, run_counted, runs_at_fractions

# Each family's own traits in small: OLMoE top-4 of 16 without renormalisation; Qwen2-MoE top-2 of
# 8 without renormalisation, plus a gated shared expert that stays on the device; Phi-3.5-MoE
FAMILIES = {
    "olmoe": (TinyMixtralShape(num_layers=3, num_experts=16, top_k=4, hidden_size=64, intermediate_size=64,
                               num_heads=2, num_kv_heads=2), "softmax top-4, not renormalised"),
    "qwen2_moe": (TinyMixtralShape(num_layers=3, num_experts=8, top_k=2, hidden_size=64, intermediate_size=64,
                                   num_heads=2, num_kv_heads=2), "softmax top-2, not renormalised"),
    # Qwen3-MoE: top-4 of 16, renormalised, no shared expert; its MoE layer gets the gate, not logits
    "qwen3_moe": (TinyMixtralShape(num_layers=3, num_experts=16, top_k=4, hidden_size=64, intermediate_size=64,
                                   num_heads=2, num_kv_heads=2), "softmax top-4, renormalised"),
    # Phi-3.5-MoE, the paper's second model: sparsemixer top-2 (vLLM's custom routing function)
    "phimoe": (TinyMixtralShape(num_layers=3, num_experts=8, top_k=2, hidden_size=64, intermediate_size=64,
                                num_heads=2, num_kv_heads=2), "phimoe_routing_function top-2"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory) -> tuple[str, TinyMixtralShape, str]:
    shape, routing = FAMILIES[request.param]
    path = build_tiny_mixtral(tmp_path_factory.mktemp(request.param), shape, family=request.param, init_std=0.2)
    return str(path), shape, routing


def test_exact_matches_stock_at_every_fraction(family_model):
    model, shape, routing = family_model
    stock = make_llm(model, enforce_eager=True)
    expected = greedy_ids(stock)
    close_llm(stock)
    assert len({tuple(ids) for ids in expected}) > 1
    llm = make_llm(model, enforce_eager=True, load_format="daop",
                   model_loader_extra_config={"resident_fraction": 1, "realloc": "off"})
    try:
        for fraction, ids, report in runs_at_fractions(llm, [1, 0.5, 0.25, 0]):
            assert ids == expected, f"fraction {fraction}"
            assert report["routing"] == routing
            resident = [len(layer["resident"]) for layer in report["layers"]]
            assert sum(resident) == int(fraction * shape.num_layers * shape.num_experts), "routed experts only"
            totals = report["totals"]
            assert (totals["cpu_expert_tokens"] == 0) == (fraction == 1)
            assert (totals["device_expert_tokens"] == 0) == (fraction == 0)
    finally:
        close_llm(llm)


def test_predicting_modes_run(family_model):
    model, _, _ = family_model
    llm = make_llm(model, enforce_eager=True, load_format="daop",
                   model_loader_extra_config={"resident_fraction": 0.25, "mode": "daop", "first_predicted_layer": 1})
    try:
        ids, report = run_counted(llm)
        assert all(len(i) > 0 for i in ids)
        totals = report["totals"]
        assert 0 < totals["predictions_correct"] <= totals["predictions"] and totals["precomputed_used"] > 0
        assert totals["degraded"] > 0
    finally:
        close_llm(llm)

"""MoE families beyond Mixtral under `load_format="daop"`: a small local checkpoint of each,
exact mode equal to the stock engine's greedy output at every fraction."""

import pytest

from daop_vllm.model_builder import TinyMixtralShape, build_tiny_mixtral

from .engines import close_llm, greedy_ids, make_llm, run_counted, runs_at_fractions

# OLMoE's own shape in small: many experts, top-4 of 16, softmax without renormalisation
OLMOE_SHAPE = TinyMixtralShape(num_layers=3, num_experts=16, top_k=4, hidden_size=64, intermediate_size=64,
                               num_heads=2, num_kv_heads=2)


@pytest.fixture(scope="module")
def tiny_olmoe(tmp_path_factory) -> str:
    return str(build_tiny_mixtral(tmp_path_factory.mktemp("tiny-olmoe"), OLMOE_SHAPE, family="olmoe", init_std=0.2))


def test_olmoe_exact_matches_stock_at_every_fraction(tiny_olmoe):
    stock = make_llm(tiny_olmoe, enforce_eager=True)
    expected = greedy_ids(stock)
    close_llm(stock)
    assert len({tuple(ids) for ids in expected}) > 1
    llm = make_llm(tiny_olmoe, enforce_eager=True, load_format="daop",
                   model_loader_extra_config={"resident_fraction": 1, "realloc": "off"})
    try:
        for fraction, ids, report in runs_at_fractions(llm, [1, 0.5, 0.25, 0]):
            assert ids == expected, f"fraction {fraction}"
            assert report["routing"] == "softmax top-4, not renormalised"
            resident = [len(layer["resident"]) for layer in report["layers"]]
            assert sum(resident) == int(fraction * 3 * 16)
            totals = report["totals"]
            assert (totals["cpu_expert_tokens"] == 0) == (fraction == 1)
            assert (totals["device_expert_tokens"] == 0) == (fraction == 0)
    finally:
        close_llm(llm)


def test_olmoe_predicting_modes_run(tiny_olmoe):
    llm = make_llm(tiny_olmoe, enforce_eager=True, load_format="daop",
                   model_loader_extra_config={"resident_fraction": 0.25, "mode": "daop", "first_predicted_layer": 1})
    try:
        ids, report = run_counted(llm)
        assert all(len(i) > 0 for i in ids)
        totals = report["totals"]
        assert 0 < totals["predictions_correct"] <= totals["predictions"] and totals["precomputed_used"] > 0
        assert totals["degraded"] > 0
    finally:
        close_llm(llm)

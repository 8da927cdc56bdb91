"""The matches-stock matrix: every supported MoE family under `load_format="daop"`, a small local
checkpoint of each, `exact` mode equal to the stock engine's greedy output at fractions 0.25 (the
option at start), 1, 0.5 and 0 (re-placed at run time); the predicting modes run on each. Compiled
mode, re-allocation and the serving path are checked on Mixtral (test_generate, test_serve)."""

from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

from daop_vllm.cli.model_builder import TinyMixtralShape, build_tiny_mixtral
from daop_vllm.vllm_adapter.families import SUPPORTED_FAMILIES

from .engines import close_llm, greedy_ids, make_llm, run_counted, running_llm, runs_at_fractions


@dataclass(frozen=True)
class Family:
    shape: TinyMixtralShape
    routing: str  # as the engine reports it
    dense_layers: int = 0  # leading layers with a dense MLP instead of experts
    engine_args: dict = field(default_factory=dict)

    @property
    def moe_layers(self) -> int:
        return self.shape.num_layers - self.dense_layers


def small(num_experts: int, top_k: int) -> TinyMixtralShape:
    return TinyMixtralShape(num_layers=3, num_experts=num_experts, top_k=top_k, hidden_size=64, intermediate_size=64,
                            num_heads=2, num_kv_heads=2)


# Each family's own traits in small
FAMILIES = {
    # Mixtral: top-2 of 8, softmax over the chosen logits
    "mixtral": Family(small(8, 2), "softmax top-2, renormalised"),
    # OLMoE: top-4 of 16 without renormalisation
    "olmoe": Family(small(16, 4), "softmax top-4, not renormalised"),
    # Qwen2-MoE: top-2 of 8 without renormalisation, plus a gated shared expert kept on the device
    "qwen2_moe": Family(small(8, 2), "softmax top-2, not renormalised"),
    # Qwen3-MoE: top-4 of 16, renormalised, no shared expert; its MoE layer gets the gate, not logits
    "qwen3_moe": Family(small(16, 4), "softmax top-4, renormalised"),
    # Phi-3.5-MoE, the paper's second model: sparsemixer top-2 (vLLM's custom routing function)
    "phimoe": Family(small(8, 2), "phimoe_routing_function top-2"),
    # DeepSeek-V2: top-4 of 16 within the best 2 of 4 groups, two shared experts, a dense first
    # layer, MLA attention; fp32 needs vLLM's reference CPU MLA kernels (the AMX ones are bf16-only)
    "deepseek_v2": Family(small(16, 4), "grouped softmax (2 of 4 groups) top-4", dense_layers=1,
                          engine_args={"attention_config": {"backend": "CPU_MLA"}}),
    # DeepSeek-V3: sigmoid scores plus a per-expert bias for the choice (random here, so that it
    # changes which experts are chosen), 2 of 4 groups, renormalised and scaled by 2.5
    "deepseek_v3": Family(small(16, 4), "grouped sigmoid (2 of 4 groups) top-4", dense_layers=1,
                          engine_args={"attention_config": {"backend": "CPU_MLA"}}),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_model(request, tmp_path_factory) -> tuple[str, Family]:
    family = FAMILIES[request.param]
    path = build_tiny_mixtral(tmp_path_factory.mktemp(request.param), family.shape, family=request.param, init_std=0.2)
    return str(path), family


def test_exact_matches_stock_at_every_fraction(family_model):
    model, family = family_model
    stock = make_llm(model, enforce_eager=True, **family.engine_args)
    expected = greedy_ids(stock)
    close_llm(stock)
    assert len({tuple(ids) for ids in expected}) > 1
    with running_llm(model, enforce_eager=True, load_format="daop", **family.engine_args,
                     model_loader_extra_config={"resident_fraction": 0.25, "realloc": "off"}) as llm:
        for fraction, ids, report in runs_at_fractions(llm, [0.25, 1, 0.5, 0]):
            assert ids == expected, f"fraction {fraction}"
            assert report["routing"] == family.routing
            resident = [len(layer["resident"]) for layer in report["layers"]]
            assert len(resident) == family.moe_layers
            assert sum(resident) == int(fraction * family.moe_layers * family.shape.num_experts), "routed experts only"
            totals = report["totals"]
            assert (totals["cpu_expert_tokens"] == 0) == (fraction == 1)
            assert (totals["device_expert_tokens"] == 0) == (fraction == 0)


def test_predicting_modes_run(family_model):
    model, family = family_model
    options = {"resident_fraction": 0.25, "mode": "daop", "first_predicted_layer": 1}
    with running_llm(model, enforce_eager=True, load_format="daop", **family.engine_args,
                     model_loader_extra_config=options) as llm:
        ids, report = run_counted(llm)
        assert all(len(i) > 0 for i in ids)
        totals = report["totals"]
        assert 0 < totals["predictions_correct"] <= totals["predictions"] and totals["precomputed_used"] > 0
        assert totals["degraded"] > 0


@pytest.mark.parametrize("architecture", ["DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"])
def test_deepseek_moe_layers_after_the_dense_ones_every_moe_layer_freq(architecture):
    """vLLM builds experts in layer i when i >= first_k_dense_replace and i % moe_layer_freq == 0."""
    family = SUPPORTED_FAMILIES[architecture]
    config = SimpleNamespace(num_hidden_layers=8, first_k_dense_replace=1, n_routed_experts=16, num_experts_per_tok=4)
    assert family.shape(config) == (7, 16, 4)
    config.moe_layer_freq = 3  # layers 3 and 6
    assert family.shape(config) == (2, 16, 4)

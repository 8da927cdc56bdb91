import pytest
import torch

from daop_vllm.core.cpu_executor import CpuExpertExecutor
from daop_vllm.core.routing import CustomRouting, SoftmaxTopK


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softmax_top_k_is_the_top_k_of_the_softmax(renormalize, dtype):
    """The router takes the top-k of the logits and a softmax of those k alone: the same experts
    and weights as the top-k of the full softmax (renormalised or not), to fp32 rounding."""
    logits = (torch.randn(64, 8, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    weights, ids = SoftmaxTopK(2, renormalize)(logits)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    want_weights, want_ids = torch.topk(probs, 2, dim=-1)
    if renormalize:
        want_weights = want_weights / want_weights.sum(dim=-1, keepdim=True)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, rtol=1e-6, atol=1e-7)
    assert bool((weights[:, 0] >= weights[:, 1]).all())  # descending, as the predictor expects


@pytest.mark.parametrize("experts, top_k", [(8, 2), (8, 1), (3, 3), (60, 4), (64, 6), (64, 1), (128, 8), (256, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("renormalize", [True, False])
def test_the_extensions_router_picks_torch_topks_experts_ties_included(experts, top_k, dtype, renormalize):
    """The executor's job routes for itself (cpu_router.cpp) with torch.topk's choice, which of
    equal logits included: exact mode must pick what stock vLLM's torch.topk picks. Logits of a
    few integers tie on most rows; NaN counts above everything, as in torch. The weights are
    torch's to fp32 rounding. k * 64 <= experts takes aten's heap path, the rest nth_element."""
    executor = CpuExpertExecutor(1)
    if executor.kernels is None:
        pytest.skip("needs the C extension (not built here): the torch router is used without it")
    gen = torch.Generator().manual_seed(experts * top_k)
    logits = torch.randint(-2, 3, (400, experts), generator=gen).float()
    logits[::5] = torch.randn(logits[::5].shape, generator=gen)
    logits[3, 1] = logits[7, 0] = float("nan")
    logits[11, : experts // 2] = float("-inf")
    router = SoftmaxTopK(top_k, renormalize)
    logits = logits.to(dtype)
    assert executor.routes_in_job(router, logits)
    (ids, weights), shape = executor._routed(router, logits)
    want_weights, want_ids = router(logits)
    assert shape == (400, top_k)
    assert torch.equal(torch.tensor(ids).view(shape), want_ids)
    torch.testing.assert_close(torch.tensor(weights).view(shape), want_weights, rtol=1e-6, atol=1e-7, equal_nan=True)
    executor.shutdown()


def test_only_softmax_top_k_on_fp32_or_bf16_logits_is_routed_in_the_job():
    executor = CpuExpertExecutor(1)
    logits = torch.randn(3, 8)
    custom = CustomRouting(lambda h, g, k, r: torch.topk(g, k), 2)
    assert not executor.routes_in_job(custom, logits)
    assert not executor.routes_in_job(SoftmaxTopK(2), logits.half())
    assert executor.routes_in_job(SoftmaxTopK(2), logits) == (executor.kernels is not None)
    executor.shutdown()

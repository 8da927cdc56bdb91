import pytest
import torch

from daop_vllm.core.routing import SoftmaxTopK


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

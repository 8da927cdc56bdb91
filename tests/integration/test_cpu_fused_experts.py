"""vLLM's CPU fused-MoE op as the experts call of a CPU-only machine: the same results as the
torch reference on the store's weights, pairs with ids < 0 skipped (no engine starts)."""

import pytest
import torch

from daop_vllm.core.expert_math import routed_experts_forward
from daop_vllm.core.expert_store import HostExpertStore
from daop_vllm.vllm_adapter.cpu_fused_experts import cpu_fused_experts


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_matches_the_reference_and_skips_negative_ids(dtype, tolerance):
    torch.manual_seed(0)
    store = HostExpertStore(8, 64, 96, dtype, pin_memory=False)
    store.w13.copy_(torch.randn(store.w13.shape) * 0.1)
    store.w2.copy_(torch.randn(store.w2.shape) * 0.1)
    call = cpu_fused_experts(store)
    x = torch.randn(6, 64).to(dtype)
    weights, ids = torch.softmax(torch.randn(6, 8), -1).topk(2, -1)
    ids[1, 0] = ids[4, 1] = -1  # pre-computed pairs: the call must leave them out
    ids[3] = -1  # a row with nothing left to compute
    every = torch.arange(8)
    expected = routed_experts_forward(x, ids, weights, store.w13, store.w2, every).float()
    torch.testing.assert_close(call(x, ids, weights).float(), expected, rtol=tolerance, atol=tolerance)
    # rows that add into others' (a layer's used pre-computed pairs): rows 4 and 5 into rows 0 and 2
    out_rows = torch.tensor([0, 1, 2, 3, 0, 2])
    for skipped in (ids, ids.clamp_min(0)):  # with gaps, and without
        want = routed_experts_forward(x, skipped, weights, store.w13, store.w2, every).float()
        want = want[:4].index_add(0, torch.tensor([0, 2]), want[4:])
        got = call(x, skipped, weights, out_rows, x[:4])
        assert got.shape == (4, 64) and got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=tolerance, atol=tolerance)


def test_layers_the_op_does_not_take_keep_the_executor():
    assert cpu_fused_experts(HostExpertStore(8, 48, 40, torch.float32, pin_memory=False)) is None  # not 32-aligned
    assert cpu_fused_experts(HostExpertStore(8, 64, 64, torch.float16, pin_memory=False)) is None


def test_only_the_kept_pairs_reach_the_op(monkeypatch):
    """A gap padded with one of its row's experts would cost the op as much as a real pair."""
    from vllm import _custom_ops as ops

    given = []
    real_op = ops.cpu_fused_moe

    def spy(out, x, w13, w2, b13, b2, weights, ids, *rest):
        given.append(ids.clone())
        return real_op(out, x, w13, w2, b13, b2, weights, ids, *rest)

    monkeypatch.setattr(ops, "cpu_fused_moe", spy)
    store = HostExpertStore(8, 64, 96, torch.float32, pin_memory=False)
    store.w13.copy_(torch.randn(store.w13.shape) * 0.1)
    store.w2.copy_(torch.randn(store.w2.shape) * 0.1)
    call = cpu_fused_experts(store)
    ids = torch.tensor([[0, 1], [-1, 2], [3, -1], [-1, -1]])
    call(torch.randn(4, 64), ids, torch.full((4, 2), 0.5))
    call(torch.randn(1, 64), ids[:1], torch.full((1, 2), 0.5))  # nothing skipped: the rows as they are
    assert [g.tolist() for g in given] == [[[0], [1], [2], [3]], [[0, 1]]]

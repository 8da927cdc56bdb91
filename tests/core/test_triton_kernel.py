"""The fused Triton kernel against the torch reference, in Triton's interpreter on the CPU.

fp32 only: the interpreter's bf16 dot is unreliable. The GPU check in bf16/fp16 is
benchmarks/gpu/check_kernel.py.
"""

import os
import sys

import pytest
import torch

# Without CUDA the kernel runs in Triton's interpreter. Triton decides when its own and our
# kernels are defined (so before Triton is first imported) and checks again at launch, so the
# variable stays set while this module runs, and no longer: other tests and their
# subprocesses don't see it.
_saved = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "Triton was imported before its interpreter could be chosen"
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="Triton is not installed")

from daop_vllm.core.expert_math import routed_experts_forward  # noqa: E402
from daop_vllm.core.triton_configs import LaunchConfig  # noqa: E402
from daop_vllm.core.triton_moe import group_pairs_by_slot, resident_experts_forward_triton  # noqa: E402

# Each launch shape forced: the GEMV-shaped one for any number of pairs, and the grouped one
LAUNCHES = {"gemv": LaunchConfig(few_pairs_max=1 << 20), "grouped": LaunchConfig(few_pairs_max=0)}


@pytest.fixture(scope="module", autouse=True)
def _restore_interpret_variable():
    yield
    if _saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(tokens, experts, top_k, hidden, intermediate, resident, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    scores = torch.rand(tokens, experts, generator=gen)
    topk_weights, topk_ids = torch.topk(torch.softmax(scores, -1), top_k, dim=-1)
    slot_of_expert = torch.full((experts,), -1, dtype=torch.int64)
    for slot, expert in enumerate(resident):
        slot_of_expert[expert] = slot
    num_slots = max(1, len(resident))
    w13 = torch.randn(num_slots, 2 * intermediate, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_slots, hidden, intermediate, generator=gen) / intermediate**0.5
    tensors = (x.to(dtype), topk_ids, topk_weights, w13.to(dtype), w2.to(dtype), slot_of_expert)
    return [t.to(DEVICE) for t in tensors]


@pytest.mark.parametrize(
    "tokens, experts, top_k, hidden, intermediate, resident",
    [
        (1, 8, 2, 64, 64, [0, 1, 2, 3, 4, 5, 6, 7]),  # one token, all resident
        (1, 8, 2, 64, 64, [3]),
        (7, 8, 2, 48, 40, [1, 4, 6]),  # T, H and I not block multiples
        (33, 8, 2, 100, 72, list(range(8))),  # all resident, more rows than a block
        (20, 8, 2, 64, 32, []),  # none resident
        (19, 16, 4, 80, 96, [15, 0, 7, 9, 2]),  # slots in another order than experts
        (16, 64, 6, 64, 48, list(range(0, 64, 2))),  # DeepSeek-V2-Lite's many small experts, one launch
        (8, 128, 8, 64, 32, list(range(127, 27, -1))),  # Qwen3-MoE's 128, most resident
    ],
)
@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_kernel_matches_reference(tokens, experts, top_k, hidden, intermediate, resident, launch):
    args = make_case(tokens, experts, top_k, hidden, intermediate, resident)
    got = resident_experts_forward_triton(*args, config=LAUNCHES[launch])
    want = routed_experts_forward(*args)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if not resident:
        assert torch.count_nonzero(got) == 0


@pytest.mark.parametrize("fmt, tokens, hidden, intermediate", [
    ("int8", 3, 48, 40),  # sizes that are not block multiples
    ("int8", 20, 64, 96),
    ("int4", 3, 128, 256),  # three groups along the down projection's input, two of the gate/up's
    ("int4", 20, 256, 128),
    ("fp8", 3, 128, 256),  # blocks of 128 x 128: two along the gate/up rows' input, two along the down's
    ("fp8", 20, 256, 128),
])
@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_kernel_dequantises_quantized_slots(fmt, tokens, hidden, intermediate, launch):
    """Quantized slots: the kernel's weights are `dequantize`'s, so it matches the reference on
    the same QuantizedWeights (which the reference dequantises first)."""
    from daop_vllm.core.quantized_experts import QuantizedWeights, quantize

    x, topk_ids, topk_weights, w13, w2, slot_of_expert = make_case(tokens, 8, 2, hidden, intermediate, [6, 0, 3, 5])
    q13, q2 = quantize(w13.cpu(), fmt), quantize(w2.cpu(), fmt)
    q13, q2 = (QuantizedWeights(q.format, q.data.to(DEVICE), q.scales.to(DEVICE), q.shape) for q in (q13, q2))
    args = (x, topk_ids, topk_weights, q13, q2, slot_of_expert)
    got = resident_experts_forward_triton(*args, config=LAUNCHES[launch])
    torch.testing.assert_close(got, routed_experts_forward(*args), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, routed_experts_forward(x, topk_ids, topk_weights, w13, w2, slot_of_expert),
                              rtol=1e-4, atol=1e-5), "quantization changes the result: the test can fail"


@pytest.mark.parametrize("launch", list(LAUNCHES))
def test_one_expert_with_all_tokens(launch):
    x, topk_ids, topk_weights, w13, w2, slot_of_expert = make_case(40, 8, 2, 64, 48, [5])
    topk_ids[:, 0] = 5  # every token's first choice is the one resident expert
    topk_ids[:, 1] = torch.where(topk_ids[:, 1] == 5, 6, topk_ids[:, 1])
    args = (x, topk_ids, topk_weights, w13, w2, slot_of_expert)
    torch.testing.assert_close(resident_experts_forward_triton(*args, config=LAUNCHES[launch]),
                               routed_experts_forward(*args), rtol=1e-4, atol=1e-5)


def test_the_default_config_takes_the_gemv_launch_for_decode_and_grouped_for_prefill():
    from daop_vllm.core import triton_moe

    launched = []
    for name in ("_few_pairs_moe_kernel", "_grouped_moe_kernel"):
        kernel = getattr(triton_moe, name)

        class Recorder:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                launched.append(self.name)
                return self.kernel[grid]

        setattr(triton_moe, name, Recorder(kernel, name))
    try:
        for tokens in (1, 4, 64):
            resident_experts_forward_triton(*make_case(tokens, 8, 2, 32, 32, list(range(8))))
    finally:
        for name in ("_few_pairs_moe_kernel", "_grouped_moe_kernel"):
            setattr(triton_moe, name, getattr(triton_moe, name).kernel)
    assert launched == ["_few_pairs_moe_kernel", "_few_pairs_moe_kernel", "_grouped_moe_kernel"]


def test_grouping_pads_each_slot_to_whole_blocks():
    topk_ids = torch.tensor([[0, 1], [1, 2], [3, 1], [2, 0]])
    slot_of_expert = torch.tensor([-1, 0, 1, -1])  # experts 1 and 2 resident, in slots 0 and 1
    pair_of_row, slot_of_block = group_pairs_by_slot(topk_ids, slot_of_expert, num_slots=2, block_m=4)
    pairs = topk_ids.numel()
    assert pair_of_row.numel() == 8 + 2 * 4
    assert pair_of_row[:4].tolist() == [1, 2, 5, pairs]  # expert 1: pairs (0,1), (1,0), (2,1)
    assert pair_of_row[4:8].tolist() == [3, 6, pairs, pairs]  # expert 2: pairs (1,1), (3,0)
    assert slot_of_block.tolist() == [0, 1, -1, -1]
    assert (pair_of_row[8:] == pairs).all()


def test_grouping_reads_nothing_back_from_the_device():
    """The launcher's grouping never syncs: on meta tensors (shapes without data) any op that
    reads a value back - bincount's min/max, boolean-mask indexing's nonzero, .item() - raises."""
    topk_ids = torch.empty(5, 2, dtype=torch.int64, device="meta")
    slot_of_expert = torch.empty(8, dtype=torch.int64, device="meta")
    pair_of_row, slot_of_block = group_pairs_by_slot(topk_ids, slot_of_expert, num_slots=3, block_m=4)
    assert pair_of_row.shape == (12 + 3 * 4,) and slot_of_block.shape == (6,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device: checks the launch for host syncs")
def test_launch_does_not_sync_on_cuda():
    args = make_case(9, 8, 2, 64, 48, [1, 4, 6])
    resident_experts_forward_triton(*args)  # compile outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        resident_experts_forward_triton(*args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_slot_offsets_past_two_to_the_31_elements():
    """Slots 2^31 elements apart or more (DeepSeek-V3's w13 slots are 29.4M elements: slot 74 on):
    the kernel's slot offsets are int64. The slots are a view, with that stride, over a buffer
    of which only the used slots' pages are ever touched (the rest is never committed)."""
    tokens, experts, hidden, intermediate = 3, 4, 32, 32
    x, topk_ids, topk_weights, w13_small, w2, _ = make_case(tokens, experts, 2, hidden, intermediate, [0, 1, 2, 3])
    stride = 2**30 + 2**20  # fits int32; slot 2 starts past 2^31
    buffer = torch.empty(2 * stride + w13_small[0].numel(), dtype=w13_small.dtype, device=DEVICE)
    w13 = buffer.as_strided((3, 2 * intermediate, hidden), (stride, hidden, 1))
    w13[2].copy_(w13_small[2])
    slot_of_expert = torch.tensor([-1, -1, 2, -1], device=DEVICE)  # only expert 2 resident, in slot 2
    w2_slots = torch.zeros(3, hidden, intermediate, dtype=w2.dtype, device=DEVICE)
    w2_slots[2] = w2[2]
    topk_ids[:, 0] = 2
    got = resident_experts_forward_triton(x, topk_ids, topk_weights, w13, w2_slots, slot_of_expert)
    want = routed_experts_forward(x, topk_ids, topk_weights, w13, w2_slots, slot_of_expert)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

"""Quantized experts: the formats' round trip and layout, one-line refusals, and the executor's
native kernels for int8/int4/fp8 against a float64 reference on the dequantised weights."""

import pytest
import torch

from daop_vllm.core.cpu_executor import QUANTIZED_NATIVE_MAX_TOKENS, CpuExpertExecutor
from daop_vllm.core.cpu_kernels import native_kernels
from daop_vllm.core.expert_math import expert_mlp
from daop_vllm.core.errors import DaopConfigError
from daop_vllm.core.quantized_experts import (
    FP8_BLOCK,
    INT4_GROUP,
    bytes_per_weight,
    check_format,
    dequantize,
    from_checkpoint_fp8,
    quantize,
)
from tests.core.test_cpu_executor import reference


def test_int8_round_trip_is_within_half_a_step_per_row():
    w = torch.randn(3, 40, 100) * torch.rand(3, 40, 1)  # rows of different scales
    q = quantize(w, "int8")
    assert q.data.dtype == torch.int8 and q.data.shape == w.shape and q.scales.shape == (3, 40)
    assert q.data.abs().max() <= 127
    error = (dequantize(q) - w).abs()
    assert (error <= q.scales[..., None] / 2 + 1e-7).all()
    assert torch.allclose(q.scales, w.abs().amax(-1) / 127)


def test_int4_round_trip_layout_and_size():
    w = torch.randn(2, 8, 3 * INT4_GROUP)
    q = quantize(w, "int4")
    assert q.data.dtype == torch.uint8 and q.data.shape == (2, 8, 3 * INT4_GROUP // 2)
    assert q.scales.dtype == torch.bfloat16 and q.scales.shape == (2, 8, 3)
    step = q.scales.float().repeat_interleave(INT4_GROUP, -1)
    assert ((dequantize(q) - w).abs() <= step / 2 + 1e-6).all()
    # byte j of each 64 columns holds column j (low nibble) and column j + 32 (high nibble), as q + 8
    values = torch.round(w / step).clamp(-8, 7) + 8
    byte = q.data[1, 5, 32 + 7]  # the second block of 64 columns
    assert int(byte) & 15 == int(values[1, 5, 64 + 7]) and int(byte) >> 4 == int(values[1, 5, 64 + 32 + 7])
    assert q.nbytes / w.numel() == pytest.approx(bytes_per_weight("int4")) == pytest.approx(0.515625)
    assert quantize(w, "int8").nbytes / w.numel() == pytest.approx(1 + 4 / w.shape[-1])


def test_fp8_round_trip_blocks_and_size():
    w = torch.randn(2, 2 * FP8_BLOCK, 3 * FP8_BLOCK)
    w[1, FP8_BLOCK:, :FP8_BLOCK] *= 50  # one block of another scale
    q = quantize(w, "fp8")
    assert q.data.dtype == torch.uint8 and q.data.shape == w.shape and q.scales.shape == (2, 2, 3)
    blocks = w.unflatten(-1, (3, FP8_BLOCK)).unflatten(1, (2, FP8_BLOCK))  # [E, 2, B, 3, B]
    largest = blocks.abs().amax(dim=(2, 4))  # each block's scale: the power of two that brings it within 448
    assert (q.scales.log2() == q.scales.log2().round()).all() and (largest / q.scales <= 448).all()
    assert (largest / q.scales > 224).all()
    assert torch.equal(dequantize(q, torch.bfloat16).float(), dequantize(q))  # exact in bf16 too
    block = w[1, FP8_BLOCK:, :FP8_BLOCK]  # each value is e4m3(w / scale) * scale, the block's scale
    scale = q.scales[1, 1, 0]
    assert torch.equal(dequantize(q)[1, FP8_BLOCK:, :FP8_BLOCK], (block / scale).to(torch.float8_e4m3fn).float() * scale)
    assert ((dequantize(q) - w).abs() <= w.abs() / 16 + q.scales.max() * 2**-9).all()  # 3 mantissa bits
    assert q.nbytes / w.numel() == pytest.approx(bytes_per_weight("fp8")) == pytest.approx(1 + 4 / FP8_BLOCK**2)
    # as a checkpoint holds them: float8 values and the block scales they are multiplied by
    loaded = from_checkpoint_fp8(q.data.view(torch.float8_e4m3fn), q.scales)
    assert torch.equal(dequantize(loaded), dequantize(q))
    with pytest.raises(DaopConfigError, match=r"need block scales of \(2, 3\), got \(2, 2, 1\)"):
        from_checkpoint_fp8(q.data.view(torch.float8_e4m3fn), q.scales[..., :1])


def test_all_zero_group_stays_zero():
    w = torch.zeros(1, FP8_BLOCK, 2 * INT4_GROUP)
    w[0, 1, :INT4_GROUP] = torch.randn(INT4_GROUP)
    for name in ("int8", "int4", "fp8"):
        back = dequantize(quantize(w, name))
        assert torch.isfinite(back).all() and (back[0, 0] == 0).all() and (back[0, 1, INT4_GROUP:] == 0).all()


def test_wrong_formats_are_refused_in_one_line():
    with pytest.raises(ValueError, match="'int3' is not one of bf16, int8, int4, fp8"):
        check_format("int3")
    with pytest.raises(ValueError, match=r"fp8 experts need sizes that are multiples of 128 \(blocks of 128 x 128\); "
                                         r"got 64 x 256"):
        quantize(torch.randn(2, 64, 256), "fp8")
    with pytest.raises(ValueError, match="multiples of 128; got 100"):
        quantize(torch.randn(2, 4, 100), "int4")
    with pytest.raises(ValueError, match="kept as loaded"):
        quantize(torch.randn(2, 4, 128), "bf16")


def _case(fmt, tokens, experts, top_k, hidden, inter, dtype, seed=0, outlier=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    if outlier:  # a channel 100x the others, as LLM hidden states have
        x[:, hidden // 3] *= 100
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    topk_weights, topk_ids = torch.topk(torch.rand(tokens, experts, generator=gen), top_k, dim=-1)
    table = torch.where(torch.arange(experts) % 3 == 0, -1, torch.arange(experts))
    q13, q2 = quantize(w13, fmt), quantize(w2, fmt)
    return (x.to(dtype), topk_ids, topk_weights, q13, q2, table), (dequantize(q13), dequantize(q2))


# Of the output's largest magnitude. fp32: the kernels use the dequantised weights themselves;
# bf16: activations rounded to bf16 between the halves and, on CPUs with AVX512-VNNI, met in groups
# of 128 as int8 (1.6% of the output's norm here for int4 weights, against int4's own ~12% per
# weight; an outlier channel coarsens its group: 3.8% of the largest output with int4 weights,
# 3.6% with int8 ones)
# fp8: the dequantised weights themselves for both (a bf16 token widened to fp32 is exact)
TOLERANCE = {("int8", torch.float32): 2e-5, ("int4", torch.float32): 2e-5, ("fp8", torch.float32): 2e-5,
             ("int8", torch.bfloat16): 2e-2, ("int4", torch.bfloat16): 4e-2, ("fp8", torch.bfloat16): 1e-2}
OUTLIER_TOLERANCE = {"int8": 5e-2, "int4": 6e-2, "fp8": 1e-2}
SHAPES = {  # (tokens, experts, top_k, hidden, inter)
    "int8": [(1, 8, 2, 64, 128), (3, 4, 2, 160, 96), (5, 4, 2, 100, 70), (40, 16, 4, 96, 64)],
    "int4": [(1, 8, 2, 128, 256), (2, 4, 2, 384, 128), (9, 4, 2, 256, 128), (40, 16, 4, 128, 128)],
    "fp8": [(1, 8, 2, 128, 256), (2, 4, 2, 384, 128), (7, 4, 2, 256, 128), (40, 16, 4, 128, 128)],
}


@pytest.mark.parametrize("vector_isa", [True, False], ids=["vector", "portable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads, whole_experts_from", [(1, 0), (2, 0), (2, 10**6)], ids=["1", "2-whole", "2-sliced"])
@pytest.mark.parametrize("fmt, shape", [(f, s) for f, shapes in SHAPES.items() for s in shapes])
def test_native_kernels_match_the_dequantised_reference(fmt, shape, threads, whole_experts_from, dtype, vector_isa):
    kernels = native_kernels()
    if kernels is None:
        pytest.skip("the C extension is not built here")
    args, dequantised = _case(fmt, *shape, dtype)
    previous = kernels.use_vector_isa(vector_isa)
    executor = CpuExpertExecutor(threads, whole_experts_from=whole_experts_from)
    try:
        got = executor.submit(*args).result()
    finally:
        executor.shutdown()
        kernels.use_vector_isa(previous)
    want = reference(args[0], args[1], args[2], *dequantised, args[5])
    assert got.dtype == dtype and got.shape == want.shape
    assert (got.double() - want).abs().max().item() <= TOLERANCE[fmt, dtype] * want.abs().max().item()


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_bf16_tokens_with_an_outlier_channel_stay_within_tolerance(fmt):
    args, dequantised = _case(fmt, 4, 4, 2, 256, 128, torch.bfloat16, outlier=True)
    executor = CpuExpertExecutor(2)
    try:
        got = executor.submit(*args).result()
    finally:
        executor.shutdown()
    want = reference(args[0], args[1], args[2], *dequantised, args[5])
    assert (got.double() - want).abs().max().item() <= OUTLIER_TOLERANCE[fmt] * want.abs().max().item()


def test_int8_weights_meet_int8_tokens_or_finer_int16_ones():
    """int8 weights meet bf16 tokens as int8 (vpdpbusd, the default) or, switched, as int16
    (vpdpwssd): both within tolerance of the reference, int16 the closer, on an outlier channel."""
    kernels = native_kernels()
    if kernels is None or not kernels.isa()["avx512_bf16"]:
        pytest.skip("the integer kernels need the C extension and a CPU with AVX512-BF16")
    args, dequantised = _case("int8", 4, 4, 2, 256, 128, torch.bfloat16, outlier=True)
    want = reference(args[0], args[1], args[2], *dequantised, args[5])
    errors = {}
    for tokens_from in (0, 1):  # 0: never int8 tokens
        previous = kernels.set_q8_int8_tokens_from(tokens_from)
        executor = CpuExpertExecutor(1)
        try:
            errors[tokens_from] = (executor.submit(*args).result().double() - want).abs().max().item()
        finally:
            executor.shutdown()
            kernels.set_q8_int8_tokens_from(previous)
    assert errors[0] <= 2e-2 * want.abs().max().item() and errors[1] <= OUTLIER_TOLERANCE["int8"] * want.abs().max().item()
    assert errors[0] < errors[1]


def test_many_tokens_go_to_torch_through_the_dequantised_weights():
    """Past QUANTIZED_NATIVE_MAX_TOKENS an expert runs in torch on its dequantised weights."""
    tokens = QUANTIZED_NATIVE_MAX_TOKENS + 6
    args, dequantised = _case("int8", tokens, 2, 1, 64, 128, torch.float32)
    args = (args[0], torch.zeros(tokens, 1, dtype=torch.int64), torch.ones(tokens, 1), args[3], args[4],
            torch.arange(2))
    executor = CpuExpertExecutor(1)
    try:
        got = executor.submit(*args).result()
    finally:
        executor.shutdown()
    want = expert_mlp(args[0], args[3][0], args[4][0])
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def _engine(fmt, one_memory=None, hidden=128, inter=128, experts=8, layers=2):
    from daop_vllm.core.engine import DaopEngine
    from daop_vllm.core.routing import SoftmaxTopK

    engine = DaopEngine(torch.device("cpu"), cpu_threads=2, one_memory=one_memory)
    gen = torch.Generator().manual_seed(3)
    for _ in range(layers):
        layer = engine.add_layer(experts, hidden, inter, torch.float32, SoftmaxTopK(2))
        layer.store.w13.copy_(torch.randn(layer.store.w13.shape, generator=gen) / hidden**0.5)
        layer.store.w2.copy_(torch.randn(layer.store.w2.shape, generator=gen) / inter**0.5)
    return engine


@pytest.mark.parametrize("one_memory", [True, False], ids=["one-memory", "two-memories"])
@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8"])
def test_engine_with_quantized_experts_computes_their_dequantised_weights(fmt, one_memory):
    """At every fraction the engine's output is that of an engine whose experts are the
    dequantised weights (fp32), on one memory and with device slots of their own (which hold
    the quantized experts too); the budget counts the bytes of the format."""
    quantized, plain = _engine(fmt, one_memory), _engine("bf16", one_memory)
    quantized.quantize_experts(fmt)
    for q_layer, p_layer in zip(quantized.layers, plain.layers):
        p_layer.store.w13.copy_(dequantize(q_layer.store.w13))
        p_layer.store.w2.copy_(dequantize(q_layer.store.w2))
        assert q_layer.store.format == fmt and q_layer.store.expert_bytes < p_layer.store.expert_bytes / 3
    assert quantized.expert_bytes == quantized.layers[0].store.expert_bytes
    assert quantized.report()["expert_format"] == fmt
    x, logits = torch.randn(5, 128), torch.randn(5, 8)
    for resident in ([], [0, 3, 5, 6], list(range(8))):
        for engine in (quantized, plain):
            engine.place([resident] * 2)
        for q_layer, p_layer in zip(quantized.layers, plain.layers):
            torch.testing.assert_close(q_layer.forward(x, logits), p_layer.forward(x, logits), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="before placing"):
        quantized.quantize_experts(fmt)
    quantized.close()
    plain.close()


def test_a_layer_holds_fp8_experts_as_the_checkpoint_does():
    """An FP8 checkpoint's experts load into the store in fp8 (no copy in the activations' dtype)."""
    engine = _engine("bf16", layers=0)
    from daop_vllm.core.routing import SoftmaxTopK

    layer = engine.add_layer(4, 128, 256, torch.bfloat16, SoftmaxTopK(2), checkpoint_format="fp8")
    assert layer.store.format == engine.expert_format == "fp8" and layer.store.dtype == torch.bfloat16
    assert layer.store.w13.data.shape == (4, 512, 128) and layer.store.w13.scales.shape == (4, 4, 1)
    assert layer.store.w2.data.shape == (4, 128, 256) and layer.store.w2.scales.shape == (4, 1, 2)
    assert layer.store.expert_bytes == 3 * 128 * 256 + 4 * (4 + 2)
    with pytest.raises(DaopConfigError, match="multiples of 128"):
        engine.add_layer(4, 64, 256, torch.bfloat16, SoftmaxTopK(2), checkpoint_format="fp8")
    engine.close()


@pytest.mark.parametrize("host_fmt, device_fmt", [("int4", "int8"), ("int8", "bf16"), ("bf16", "fp8")])
def test_device_experts_in_a_format_of_their_own(host_fmt, device_fmt):
    """`device_expert_format`: with device slots of their own, resident experts compute from
    their device format's weights and host experts from the host's, at every placement (slots
    re-filled from the store's device-format copy); the budget and copies count device bytes,
    host memory holds both formats."""
    engine, plain = _engine(host_fmt, one_memory=False), _engine("bf16", one_memory=False)
    loaded = [(layer.store.w13.clone(), layer.store.w2.clone()) for layer in engine.layers]
    engine.quantize_experts(host_fmt, device_fmt)
    store = engine.layers[0].store
    assert (store.format, store.device_format, engine.device_expert_format) == (host_fmt, device_fmt, device_fmt)
    assert engine.expert_bytes == store.device_expert_bytes != store.expert_bytes
    assert store.host_bytes == 8 * (store.expert_bytes + store.device_expert_bytes)
    x, logits = torch.randn(5, 128), torch.randn(5, 8)
    for resident in ([0, 3, 5, 6], [1, 3, 7], list(range(8)), []):
        engine.place([resident] * 2)
        for layer, p_layer, (w13, w2) in zip(engine.layers, plain.layers, loaded):
            for fmt, experts in ((device_fmt, resident), (host_fmt, [e for e in range(8) if e not in resident])):
                for tensor, weights in ((p_layer.store.w13, w13), (p_layer.store.w2, w2)) if experts else ():
                    tensor[experts] = weights[experts] if fmt == "bf16" else dequantize(quantize(weights[experts], fmt))
        for layer, p_layer in zip(engine.layers, plain.layers):
            torch.testing.assert_close(layer.forward(x, logits), p_layer.forward(x, logits), rtol=1e-4, atol=1e-5)
    engine.close()
    plain.close()


def test_one_memory_has_one_format():
    """Where device and host are one memory the resident experts are the host's: a device format
    of their own is refused."""
    engine = _engine("bf16", one_memory=True)
    with pytest.raises(ValueError, match="one memory"):
        engine.quantize_experts("int8", "bf16")
    engine.close()

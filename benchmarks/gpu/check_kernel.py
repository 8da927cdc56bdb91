"""Check the Triton resident-expert kernel on a CUDA machine (torch and Triton only).

    PYTHONPATH=. python benchmarks/gpu/check_kernel.py --out $OUT/gpu_check_kernel.json [--sweep $OUT/triton_configs]

For Mixtral-8x7B and Phi-3.5-MoE experts (bf16, fp16) and the many small experts of
DeepSeek-V2-Lite and Qwen3-30B-A3B (bf16), every expert resident and each given 1-256 tokens
(routing spread evenly): correctness against the torch reference (`expert_math.routed_experts_forward`),
then, in the same run, the kernel alone (CUDA events around its launch, nothing prepared inside)
and the whole call, against the machine's read rate (a device-to-device copy of the same bytes)
and against torch's per-expert matmuls on routing prepared beforehand. GB/s count the expert
weights a call must read; TFLOP/s its 6*H*I per pair. With --sweep, launch configurations are
timed per shape and the fastest written as the kernel's JSON configs (daop_vllm/core/triton_configs/).
With --formats int8 int4 fp8, the same for quantized slots (dequantised in the kernel): GB/s count the
bytes the format stores, the torch baseline stays the bf16 matmuls.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from daop_vllm.core.expert_math import expert_mlp, routed_experts_forward  # noqa: E402
from daop_vllm.core.quantized_experts import FORMATS, quantize  # noqa: E402
from daop_vllm.core.triton_configs import (  # noqa: E402
    LaunchConfig,
    config_file_name,
    device_name,
    launch_config,
)
from daop_vllm.core.triton_moe import prepare_launch, resident_experts_forward_triton  # noqa: E402
from daop_vllm.offline.model_shapes import model_shape  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = {"mixtral-8x7b": ("bf16", "fp16"), "phi-3.5-moe": ("bf16",),
          "deepseek-v2-lite": ("bf16",), "qwen3-30b-a3b": ("bf16",)}
TOKENS_PER_EXPERT = (1, 2, 4, 16, 64, 256)
# 12 configurations per launch shape: each compiles once (about a second), so a sweep of the
# four bf16 shapes fits one device call
GEMV_SWEEP = [dict(gemv_block_i=i, gemv_block_h=h, gemv_warps=w) for i in (32, 64) for h in (64, 128, 256)
              for w in (4, 8)]
GROUPED_SWEEP = [dict(block_m=m, block_i=i, block_h=64, warps=w) for m in (16, 32, 64) for i in (64, 128)
                 for w in (4, 8)]


def time_ms(fn, warmup: int = 3, iters: int = 20) -> float:
    """Median milliseconds per call, with CUDA events around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def make_layer(shape, dtype, tokens_per_expert: int, seed: int = 0):
    """Every expert resident in its own slot; token t's k-th choice is expert (t*K + k) mod E, so
    each expert gets about `tokens_per_expert` tokens."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden, inter, experts, top_k = shape.hidden_size, shape.intermediate_size, shape.num_experts, shape.top_k
    tokens = math.ceil(tokens_per_expert * experts / top_k)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", dtype=dtype, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, device="cuda", dtype=dtype, generator=gen) / inter**0.5
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype, generator=gen)
    topk_ids = (torch.arange(tokens, device="cuda")[:, None] * top_k + torch.arange(top_k, device="cuda")) % experts
    topk_weights = torch.softmax(torch.randn(tokens, top_k, device="cuda", generator=gen), -1)
    slot_of_expert = torch.arange(experts, device="cuda")
    return x, topk_ids, topk_weights, w13, w2, slot_of_expert


def torch_per_expert(x, topk_ids, topk_weights, w13, w2, slot_of_expert):
    """torch's matmuls per expert on routing grouped beforehand (the baseline the kernel must beat)."""
    groups = []
    for slot in range(w13.shape[0]):
        token, k = (slot_of_expert[topk_ids] == slot).nonzero(as_tuple=True)
        if token.numel():
            groups.append((slot, token, topk_weights[token, k].to(x.dtype)[:, None]))

    def run():
        out = torch.zeros_like(x)
        for slot, token, weight in groups:
            out.index_add_(0, token, expert_mlp(x[token], w13[slot], w2[slot]) * weight)
        return out
    return run


def copy_read_gbps(nbytes: int) -> float:
    """The device's read rate as a copy of `nbytes` sees it: bytes read per second (the copy writes
    as many)."""
    source = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    target = torch.empty_like(source)
    return nbytes / time_ms(lambda: target.copy_(source)) / 1e6


def kernel_alone_ms(args, config: LaunchConfig) -> float:
    launch = prepare_launch(*args, config=config)
    out = torch.zeros(args[0].shape, dtype=torch.float32, device="cuda")
    return time_ms(lambda: launch(out))


def sweep_config(args, base: LaunchConfig, gemv: bool) -> tuple[LaunchConfig, dict]:
    """The fastest configuration of one launch shape (the other's fields stay as in `base`)."""
    times = {}
    for change in GEMV_SWEEP if gemv else GROUPED_SWEEP:
        config = replace(base, **change, few_pairs_max=1 << 20 if gemv else 0)
        try:
            times[json.dumps(change)] = kernel_alone_ms(args, config)
        except Exception as exc:  # a configuration out of the device's resources: skipped, named
            times[json.dumps(change)] = f"failed: {type(exc).__name__}"
    timed = {k: v for k, v in times.items() if isinstance(v, float)}
    best = json.loads(min(timed, key=timed.get))
    return replace(base, **best), times


def run_case(shape, dtype_name: str, tokens_per_expert: int, copy_gbps: float, config: LaunchConfig,
             fmt: str = "bf16") -> dict:
    dtype = DTYPES[dtype_name]
    plain = make_layer(shape, dtype, tokens_per_expert)
    args = plain if fmt == "bf16" else (*plain[:3], quantize(plain[3], fmt), quantize(plain[4], fmt), plain[5])
    x, topk_ids = args[0], args[1]
    got = resident_experts_forward_triton(*args, config=config)
    want = routed_experts_forward(*args)
    scale = want.float().abs().max().item() or 1.0
    max_err = (got.float() - want.float()).abs().max().item() / scale
    pairs = topk_ids.numel()
    used_slots = int(torch.unique(topk_ids).numel())
    flops = 6 * shape.hidden_size * shape.intermediate_size * pairs
    weight_bytes = used_slots * (shape.expert_bytes(x.element_size()) if fmt == "bf16"
                                 else (args[3].nbytes + args[4].nbytes) // shape.num_experts)
    alone_ms = kernel_alone_ms(args, config)
    call_ms = time_ms(lambda: resident_experts_forward_triton(*args, config=config))
    torch_ms = time_ms(torch_per_expert(*plain))
    reference_ms = time_ms(lambda: routed_experts_forward(*args))
    return {
        "shape": shape.name, "dtype": dtype_name, "format": fmt, "tokens_per_expert": tokens_per_expert,
        "tokens": x.shape[0],
        "pairs": pairs, "launch": "gemv" if pairs <= config.few_pairs_max else "grouped",
        "max_rel_error": max_err, "ok": max_err < 2e-2,
        "kernel_alone_ms": alone_ms, "call_ms": call_ms, "torch_per_expert_ms": torch_ms,
        "torch_reference_ms": reference_ms,
        "kernel_weight_gbps": weight_bytes / alone_ms / 1e6, "call_weight_gbps": weight_bytes / call_ms / 1e6,
        "kernel_share_of_copy_read": weight_bytes / alone_ms / 1e6 / copy_gbps,
        "kernel_tflops": flops / alone_ms / 1e9,
        "call_over_torch_per_expert": torch_ms / call_ms,
    }


def acceptance(rows: list[dict]) -> dict:
    """The targets: the kernel at 70% of the read rate at 1-4 tokens per expert, the call at 0.95x
    torch's per-expert matmuls or better at 64-256."""
    rows = [r for r in rows if r["format"] == "bf16"]
    few = [r["kernel_share_of_copy_read"] for r in rows if r["tokens_per_expert"] <= 4]
    many = [r["call_over_torch_per_expert"] for r in rows if r["tokens_per_expert"] >= 64]
    return {"min_share_of_read_1_4_tokens": min(few, default=None),
            "min_over_torch_64_256_tokens": min(many, default=None),
            "met": bool(few and many and min(few) >= 0.70 and min(many) >= 0.95)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check_kernel.json"))
    parser.add_argument("--tokens-per-expert", type=int, nargs="+", default=list(TOKENS_PER_EXPERT))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--sweep", type=Path, help="sweep launch configs per shape, write the fastest here as JSON")
    parser.add_argument("--formats", nargs="+", default=["bf16"], choices=FORMATS,
                        help="the slots' storage (int8/int4: dequantised in the kernel)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("check_kernel.py needs a CUDA device")
    import triton

    rows: list[dict] = []
    copy_gbps = copy_read_gbps(2 << 30)
    result = {
        "command": "PYTHONPATH=. python benchmarks/gpu/check_kernel.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "copy_read_gbps": copy_gbps, "rows": rows, "sweeps": {},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s read")
    print(f"{'shape':16s} {'dtype':5s} {'n/exp':>5s} {'launch':>7s} {'err':>8s} {'kernel ms':>9s} {'call ms':>8s} "
          f"{'torch ms':>8s} {'GB/s':>6s} {'of copy':>7s} {'TFLOP/s':>7s} {'x torch':>7s}")
    for name in args.shapes:
        shape = model_shape(name)
        for dtype_name in SHAPES[name]:
            dtype = DTYPES[dtype_name]
            config = launch_config(torch.device("cuda"), dtype, shape.num_experts, shape.hidden_size,
                                   shape.intermediate_size)
            if args.sweep:
                config, gemv_times = sweep_config(make_layer(shape, dtype, 1), config, gemv=True)
                config, grouped_times = sweep_config(make_layer(shape, dtype, 64), config, gemv=False)
                file = config_file_name(device_name(torch.device("cuda")), dtype, shape.num_experts,
                                        shape.hidden_size, shape.intermediate_size)
                args.sweep.mkdir(parents=True, exist_ok=True)
                (args.sweep / file).write_text(json.dumps(config.to_json(), indent=1))
                result["sweeps"][file] = {"gemv_ms": gemv_times, "grouped_ms": grouped_times,
                                          "chosen": config.to_json()}
            for fmt, tokens_per_expert in ((f, n) for f in args.formats for n in args.tokens_per_expert):
                r = run_case(shape, dtype_name, tokens_per_expert, copy_gbps, config, fmt)
                rows.append(r)
                print(f"{r['shape']:16s} {r['dtype'] if fmt == 'bf16' else fmt:5s} {tokens_per_expert:5d} "
                      f"{r['launch']:>7s} "
                      f"{r['max_rel_error']:8.1e} {r['kernel_alone_ms']:9.4f} {r['call_ms']:8.4f} "
                      f"{r['torch_per_expert_ms']:8.4f} {r['kernel_weight_gbps']:6.0f} "
                      f"{r['kernel_share_of_copy_read']:7.2f} {r['kernel_tflops']:7.1f} "
                      f"{r['call_over_torch_per_expert']:7.2f}", flush=True)
                result["all_ok"] = all(r["ok"] for r in rows)
                result["acceptance"] = acceptance(rows)
                args.out.write_text(json.dumps(result, indent=1))  # row by row: a timeout keeps what ran
    print(f"all correct: {result['all_ok']}; acceptance: {result['acceptance']}; wrote {args.out}")


if __name__ == "__main__":
    main()

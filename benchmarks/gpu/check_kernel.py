"""Check the fused Triton resident-expert kernel on a CUDA machine (torch and Triton only).

    PYTHONPATH=. python benchmarks/gpu/check_kernel.py --out benchmarks/results/gpu_check_kernel.json

For Mixtral-8x7B and Phi-3.5-MoE expert shapes in bf16 and fp16, and (bf16) the many small experts
of DeepSeek-V2-Lite (64) and Qwen3-30B-A3B (128), half of them resident: correctness against the torch
reference (`expert_math.routed_experts_forward`), and time per call against that reference and
against a dense matmul of the same FLOPs, all in one run. Also the weight bytes the call must
read, as GB/s (decode is memory-bound), and a small sweep of launch configurations.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from daop_vllm.core.expert_math import routed_experts_forward  # noqa: E402
from daop_vllm.core.triton_moe import resident_experts_forward_triton  # noqa: E402
from daop_vllm.offline.model_shapes import model_shape  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = {"mixtral-8x7b": ("bf16", "fp16"), "phi-3.5-moe": ("bf16", "fp16"),
          "deepseek-v2-lite": ("bf16",), "qwen3-30b-a3b": ("bf16",)}
TOKENS = (1, 4, 16, 64, 256)
CONFIGS = [(16, 64, 64), (16, 128, 64), (16, 64, 128), (32, 64, 64), (64, 64, 64), (64, 128, 64)]


def time_ms(fn, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds per call, with CUDA events."""
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


def make_layer(shape, dtype, num_slots: int, tokens: int, seed: int = 0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden, inter, experts = shape.hidden_size, shape.intermediate_size, shape.num_experts
    w13 = torch.randn(num_slots, 2 * inter, hidden, device="cuda", dtype=dtype, generator=gen) / hidden**0.5
    w2 = torch.randn(num_slots, hidden, inter, device="cuda", dtype=dtype, generator=gen) / inter**0.5
    x = torch.randn(tokens, hidden, device="cuda", dtype=dtype, generator=gen)
    logits = torch.randn(tokens, experts, device="cuda", generator=gen)
    topk_weights, topk_ids = torch.topk(torch.softmax(logits, -1), shape.top_k, dim=-1)
    slot_of_expert = torch.full((experts,), -1, dtype=torch.int64, device="cuda")
    slot_of_expert[:num_slots] = torch.arange(num_slots, device="cuda")  # experts 0..S-1 resident
    return x, topk_ids, topk_weights, w13, w2, slot_of_expert


def run_case(shape, dtype_name: str, tokens: int) -> dict:
    dtype = DTYPES[dtype_name]
    num_slots = shape.num_experts // 2
    args = make_layer(shape, dtype, num_slots, tokens)
    x, topk_ids, _, _, _, slot_of_expert = args
    got = resident_experts_forward_triton(*args)
    want = routed_experts_forward(*args)
    scale = want.float().abs().max().item() or 1.0
    max_err = (got.float() - want.float()).abs().max().item() / scale
    pairs = int((slot_of_expert[topk_ids] >= 0).sum())
    used_slots = int(torch.unique(slot_of_expert[topk_ids][slot_of_expert[topk_ids] >= 0]).numel())
    flops = 6 * shape.hidden_size * shape.intermediate_size * pairs
    weight_bytes = used_slots * shape.expert_bytes(x.element_size())
    kernel_ms = time_ms(lambda: resident_experts_forward_triton(*args))
    reference_ms = time_ms(lambda: routed_experts_forward(*args))
    # A dense matmul with the same FLOPs: [pairs, H] @ [H, 3I].
    a = torch.randn(max(pairs, 1), shape.hidden_size, device="cuda", dtype=dtype)
    b = torch.randn(shape.hidden_size, 3 * shape.intermediate_size, device="cuda", dtype=dtype)
    dense_ms = time_ms(lambda: a @ b)
    sweep = {}
    for block_m, block_i, block_h in CONFIGS:
        ms = time_ms(lambda: resident_experts_forward_triton(*args, block_m=block_m, block_i=block_i, block_h=block_h))
        sweep[f"{block_m}x{block_i}x{block_h}"] = round(ms, 4)
    return {
        "shape": shape.name, "dtype": dtype_name, "tokens": tokens, "resident_slots": num_slots,
        "pairs_on_device": pairs, "max_rel_error": max_err, "ok": max_err < 2e-2,
        "kernel_ms": kernel_ms, "torch_reference_ms": reference_ms, "dense_same_flops_ms": dense_ms,
        "speedup_vs_reference": reference_ms / kernel_ms, "ratio_vs_dense": dense_ms / kernel_ms,
        "kernel_tflops": flops / kernel_ms / 1e9, "kernel_weight_gbps": weight_bytes / kernel_ms / 1e6,
        "launch_config_ms": sweep,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check_kernel.json"))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("check_kernel.py needs a CUDA device")
    import triton

    rows = []
    result = {
        "command": "PYTHONPATH=. python benchmarks/gpu/check_kernel.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    header = f"{'shape':14s} {'dtype':5s} {'T':>4s} {'err':>8s} {'kernel ms':>10s} {'torch ms':>9s} " \
             f"{'x torch':>8s} {'dense ms':>9s} {'x dense':>8s} {'TFLOP/s':>8s} {'GB/s':>7s}"
    print(header)
    for name, dtype_names in SHAPES.items():
        for dtype_name in dtype_names:
            for tokens in args.tokens:
                r = run_case(model_shape(name), dtype_name, tokens)
                rows.append(r)
                print(f"{r['shape']:14s} {r['dtype']:5s} {tokens:4d} {r['max_rel_error']:8.1e} "
                      f"{r['kernel_ms']:10.4f} {r['torch_reference_ms']:9.4f} {r['speedup_vs_reference']:8.2f} "
                      f"{r['dense_same_flops_ms']:9.4f} {r['ratio_vs_dense']:8.2f} {r['kernel_tflops']:8.1f} "
                      f"{r['kernel_weight_gbps']:7.0f}", flush=True)
                result["all_ok"] = all(r["ok"] for r in rows)
                args.out.write_text(json.dumps(result, indent=1))  # row by row: a timeout keeps what ran
    print(f"all correct: {result['all_ok']}; wrote {args.out}")


if __name__ == "__main__":
    main()

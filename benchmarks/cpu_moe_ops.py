"""One MoE layer on this CPU: vLLM's CPU fused-MoE op (on its prepacked weights) against our
executor's one job (every expert, as on a CPU-only machine), same routing, interleaved passes.

    python benchmarks/cpu_moe_ops.py --out benchmarks/results/cpu_moe_ops.json

The layer is the one of `daop-vllm bench vllm-serve` (8 experts top-2, hidden 512, intermediate
1792): 88 MB in fp32, 44 MB in bf16, so it stays in a large L3 between calls, as it partly does in
that benchmark's 8-layer model. Needs vLLM's CPU build.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daop_vllm.core.cpu_executor import CpuExpertExecutor, default_cpu_threads  # noqa: E402
from daop_vllm.core.expert_store import HostExpertStore  # noqa: E402
from daop_vllm.vllm_adapter.cpu_fused_experts import cpu_fused_experts, kernel_isa  # noqa: E402


def per_call_us(fn, calls: int = 20) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 8, 16, 64])
    parser.add_argument("--passes", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    experts, hidden, inter, top_k = 8, 512, 1792, 2
    threads = default_cpu_threads("cpu")
    executor = CpuExpertExecutor(threads)
    result = {"command": "python benchmarks/cpu_moe_ops.py " + " ".join(sys.argv[1:]), "experts": experts,
              "hidden": hidden, "intermediate": inter, "top_k": top_k,
              "threads": threads, "torch_threads": torch.get_num_threads(), "executor": executor.kernel_name,
              "passes": args.passes, "rows": []}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        store = HostExpertStore(experts, hidden, inter, dtype, pin_memory=False)
        store.w13.copy_(torch.randn(store.w13.shape) * 0.02)
        store.w2.copy_(torch.randn(store.w2.shape) * 0.02)
        fused = cpu_fused_experts(store)
        every = torch.arange(experts)
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, dtype=dtype)
            weights, ids = torch.softmax(torch.randn(tokens, experts), -1).topk(top_k, -1)
            weights = weights / weights.sum(-1, keepdim=True)
            ours = lambda: executor.submit(x, ids, weights, store.w13, store.w2, every).result()  # noqa: E731
            vllm_op = lambda: fused(x, ids, weights)  # noqa: E731
            error = ((ours().float() - vllm_op().float()).abs().max() / ours().float().abs().max()).item()
            times = {"ours": [], "vllm": []}
            for _ in range(args.passes):
                for name, fn in (("ours", ours), ("vllm", vllm_op)):
                    times[name].append(per_call_us(fn))
            row = {"dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "isa": kernel_isa(dtype),
                   "executor_us": statistics.median(times["ours"]), "vllm_op_us": statistics.median(times["vllm"]),
                   "max_rel_difference": error}
            row["vllm_over_executor_time"] = row["vllm_op_us"] / row["executor_us"]
            result["rows"].append(row)
            print(f"{row['dtype']:8s} T={tokens:3d}  executor {row['executor_us']:8.1f} us  vLLM op "
                  f"{row['vllm_op_us']:8.1f} us  ({row['vllm_over_executor_time']:.2f}x the time)  "
                  f"difference {error:.1e}", flush=True)
    executor.shutdown()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""`daop-vllm demo`: offline batch generation with `load_format="daop"` on a small local Mixtral."""

from __future__ import annotations

import os
import time
from pathlib import Path

DEMO_PROMPTS = [
    "Mixture-of-Experts models route every token",
    "The quick brown fox",
    "Once upon a time there was a small model",
    "What is the capital of France?",
    "Write a short poem about the sea",
    "One, two, three, four, five",
    "During decode the next layer's experts",
    "After a prefill the device slots",
]


def run_demo(model_dir: Path, resident_fraction: float, num_prompts: int, max_tokens: int, eager: bool) -> dict:
    # A small KV cache is plenty for this model; on CPU vLLM would otherwise reserve GiBs.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from daop_vllm.model_builder import build_tiny_mixtral

    if not (model_dir / "config.json").exists():
        print(f"building a small random-weight Mixtral in {model_dir} (no downloads)")
        build_tiny_mixtral(model_dir)
    llm = LLM(
        model=str(model_dir),
        load_format="daop",
        model_loader_extra_config={"resident_fraction": resident_fraction},
        dtype="float32",
        max_model_len=512,
        max_num_seqs=16,
        enforce_eager=eager,
        seed=0,
        gpu_memory_utilization=0.5,  # on CPU: the share of host memory vLLM may reserve
    )
    prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.collective_rpc("daop_reset_counters")
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    report = llm.collective_rpc("daop_report")[0]
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    totals = report["totals"]
    cpu_share = totals["cpu_expert_tokens"] / max(1, totals["cpu_expert_tokens"] + totals["device_expert_tokens"])

    print(f"\n{outputs[0].prompt!r} -> {outputs[0].outputs[0].text!r}  (random weights: text is noise)")
    budget = report["budget"]
    print(f"\nresident experts per layer: {budget['resident_experts']} of {budget['total_experts']} "
          f"(resident_fraction={resident_fraction}); realloc {report['realloc']} made {totals['swaps']} swaps, "
          "so at the end:")
    for index, layer in enumerate(report["layers"]):
        print(f"  layer {index:2d}: {layer['resident']}  expert-tokens device {layer['device_expert_tokens']}, "
              f"cpu {layer['cpu_expert_tokens']}")
    print(f"\n{len(prompts)} prompts, {generated} tokens in {elapsed:.2f} s: {generated / elapsed:.1f} tokens/s")
    print(f"expert work on the CPU: {100 * cpu_share:.1f}% of expert-token assignments")
    return {"tokens_per_s": generated / elapsed, **report}

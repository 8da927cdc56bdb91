"""`daop-vllm demo`: offline batch generation with `load_format="daop"` on the trained MoE of
`daop-vllm build-model` (Shakespeare, trained here from scratch): real text, real routing."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from daop_vllm.cli.common import fraction
from daop_vllm.cli.trained_model import RECIPES

DEMO_PROMPTS = [
    "ROMEO.\n",
    "To be, or not to be",
    "KING.\nMy lords,",
    "Enter a Messenger.\n\nMESSENGER.\n",
    "JULIET.\nO Romeo, Romeo,",
    "First Citizen.\nWe are",
    "HAMLET.\nWhat a piece of work",
    "QUEEN.\nGood night,",
]


def run_demo(model: str, model_dir: Path | None, resident_fraction: float, num_prompts: int, max_tokens: int,
             eager: bool) -> dict:
    # A small KV cache is plenty for this model; on CPU vLLM would otherwise reserve GiBs.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from daop_vllm.cli.trained_model import build_trained_model

    model_dir = build_trained_model(model, model_dir)  # cached: trains only the first time
    print(f"model: {model_dir} ({model}, a Mixtral-format MoE trained on Shakespeare)")
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
    # Sampled (seeded per prompt, so runs repeat): greedy decoding of a model this small loops.
    params = [SamplingParams(temperature=0.8, top_p=0.95, seed=index, max_tokens=max_tokens, ignore_eos=True)
              for index in range(len(prompts))]
    llm.collective_rpc("daop_reset_counters")
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    report = llm.collective_rpc("daop_report")[0]
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    totals = report["totals"]
    cpu_share = totals["cpu_expert_tokens"] / max(1, totals["cpu_expert_tokens"] + totals["device_expert_tokens"])

    for output in outputs[: min(3, len(outputs))]:
        print(f"\n{output.prompt!r} -> {output.outputs[0].text!r}")
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


def add_parser(commands) -> None:
    demo = commands.add_parser("demo", help="offline batch generation with load_format='daop' on a small local Mixtral")
    demo.add_argument("--model", default="shakespeare-moe", choices=list(RECIPES),
                      help="the trained model to serve, built (about 20 minutes for the default) when missing")
    demo.add_argument("--model-dir", type=Path, default=None,
                      help="where that model is, or is built (default: the cache, see `build-model`)")
    demo.add_argument("--resident-fraction", type=fraction, default=0.5, help="share of experts on the device")
    demo.add_argument("--num-prompts", type=int, default=16)
    demo.add_argument("--max-tokens", type=int, default=64)
    demo.add_argument("--compile", action="store_true", help="let vLLM compile the model (slower start)")
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    run_demo(args.model, args.model_dir, args.resident_fraction, args.num_prompts, args.max_tokens,
             eager=not args.compile)

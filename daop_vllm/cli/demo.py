"""`daop-vllm demo`: offline batch generation with `load_format="daop"` on a trained MoE of
`daop-vllm build-model` (Shakespeare, trained from scratch by the project's recipe; the default one
ships with the package): real text, real routing."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
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


@contextlib.contextmanager
def vllm_output_to(log_path: Path | None):
    """Everything written to stdout and stderr in the block - vLLM's logs and progress bars, its
    engine processes' (which inherit the descriptors), warnings of the libraries - goes to
    `log_path` (None: left alone). Yields a `say` that still reaches the terminal."""
    if log_path is None:
        yield lambda text: print(text, flush=True)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield lambda text: os.write(saved[0], (text + "\n").encode())
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def run_demo(model: str, model_dir: Path | None, resident_fraction: float, num_prompts: int, max_tokens: int,
             eager: bool, verbose: bool = False) -> dict:
    # A small KV cache is plenty for this model; on CPU vLLM would otherwise reserve GiBs.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if not verbose:  # before vLLM is imported: it reads the level once (engine processes inherit it)
        os.environ["VLLM_LOGGING_LEVEL"] = "ERROR"
    from daop_vllm.cli.trained_model import build_trained_model

    model_dir = build_trained_model(model, model_dir)  # the shipped or cached build: trains only when missing
    print(f"model: {model_dir} ({model}, a Mixtral-format MoE trained on Shakespeare)")
    log_path = None if verbose else Path(tempfile.gettempdir()) / f"daop-vllm-demo-{os.getpid()}.log"
    prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(num_prompts)]
    started = time.perf_counter()
    try:
        with vllm_output_to(log_path) as say:
            say(f"starting vLLM with load_format='daop', resident_fraction={resident_fraction} "
                f"(about a minute{'' if log_path is None else f'; its log: {log_path}'}) ...")
            outputs, report, elapsed = _generate(model_dir, resident_fraction, prompts, max_tokens, eager, say,
                                                 started)
    except Exception:
        if log_path is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-20:]
            print("vLLM failed; the end of its log:\n" + "\n".join(tail), file=sys.stderr)
        raise
    if log_path is not None:
        log_path.unlink()
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


def _generate(model_dir: Path, resident_fraction: float, prompts: list[str], max_tokens: int, eager: bool, say,
              started: float):
    """(outputs, the DAOP report, seconds of generation): one engine, shut down before returning."""
    from vllm import LLM, SamplingParams

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
    try:
        say(f"vLLM ready in {time.perf_counter() - started:.0f} s; generating {len(prompts)} prompts x "
            f"{max_tokens} tokens ...")
        # Sampled (seeded per prompt, so runs repeat): greedy decoding of a model this small loops.
        params = [SamplingParams(temperature=0.8, top_p=0.95, seed=index, max_tokens=max_tokens, ignore_eos=True)
                  for index in range(len(prompts))]
        llm.collective_rpc("daop_reset_counters")
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        report = llm.collective_rpc("daop_report")[0]
    finally:
        llm.llm_engine.engine_core.shutdown()  # now, not at exit: its shutdown logs stay out of the output
    return outputs, report, elapsed


def add_parser(commands) -> None:
    demo = commands.add_parser("demo", help="offline batch generation with load_format='daop' on a small local Mixtral")
    demo.add_argument("--model", default="shakespeare-moe-small", choices=list(RECIPES),
                      help="the trained model to serve (the default ships with the package; others are trained "
                           "when missing: shakespeare-moe about 25 minutes on 2 cores)")
    demo.add_argument("--model-dir", type=Path, default=None,
                      help="where that model is, or is built (default: the cache, see `build-model`)")
    demo.add_argument("--resident-fraction", type=fraction, default=0.5, help="share of experts on the device")
    demo.add_argument("--num-prompts", type=int, default=16)
    demo.add_argument("--max-tokens", type=int, default=64)
    demo.add_argument("--compile", action="store_true", help="let vLLM compile the model (slower start)")
    demo.add_argument("--verbose", action="store_true",
                      help="vLLM's own output as it comes, logging at INFO (default: logging at ERROR, and vLLM's "
                           "output in a log file named at start)")
    demo.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    run_demo(args.model, args.model_dir, args.resident_fraction, args.num_prompts, args.max_tokens,
             eager=not args.compile, verbose=args.verbose)

"""`daop-vllm eval quality`: what each mode costs in accuracy (daop_vllm/bench/quality.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from daop_vllm.cli.common import emit_json, fraction, layer_index, percent
from daop_vllm.core.errors import DaopConfigError
from daop_vllm.core.quantized_experts import FORMATS


def add_parser(commands) -> None:
    evaluate = commands.add_parser("eval", help="accuracy measurements")
    eval_commands = evaluate.add_subparsers(dest="eval", required=True)
    quality = eval_commands.add_parser("quality", help="perplexity, greedy agreement and prediction accuracy "
                                                       "of each mode through vLLM, on a trained model")
    quality.add_argument("--model", type=Path, default=None,
                         help="a checkpoint of `build-model shakespeare-moe*` (default: the cached shakespeare-moe, "
                              "built when missing)")
    quality.add_argument("--fractions", type=fraction, nargs="+", default=[1, 0.5, 0.25])
    quality.add_argument("--passages", type=int, default=32, help="held-out passages scored for perplexity")
    quality.add_argument("--prompt-tokens", type=int, default=32, help="prompt tokens of each passage")
    quality.add_argument("--scored-tokens", type=int, default=192, help="forced decode tokens scored per passage")
    quality.add_argument("--prompts", type=int, default=16, help="held-out prompts for greedy agreement")
    quality.add_argument("--max-tokens", type=int, default=128, help="greedy tokens per agreement prompt")
    quality.add_argument("--first-predicted-layer", type=layer_index, default=1,
                         help="(verified, daop) default 1: 5 of the model's 6 layers predicted, near the "
                              "paper's 28 of 32")
    quality.add_argument("--format", nargs="+", choices=FORMATS, dest="formats", default=None,
                         help="instead of the modes: exact mode with the experts stored in each of these formats, "
                              "against the model as loaded")
    quality.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                         help="the engines' dtype (vLLM's --dtype)")
    quality.add_argument("--json", action="store_true", help="print one JSON object")
    quality.add_argument("--out", type=Path, help="also write the JSON here")
    quality.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    quality.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    from daop_vllm.bench.quality import plot, run
    from daop_vllm.cli.trained_model import build_trained_model

    model = args.model or build_trained_model("shakespeare-moe")
    if not (Path(model) / "config.json").exists():
        raise DaopConfigError(f"--model {model}: no checkpoint there (config.json missing)")
    result = run(Path(model), args.fractions, args.passages, args.prompt_tokens, args.scored_tokens, args.prompts,
                 args.max_tokens, args.first_predicted_layer, args.formats, args.dtype)
    if emit_json(result, args, plot):
        return
    print(f"held-out perplexity of the model (stock vLLM): {result['moe_perplexity']:.3f}")
    if args.formats:
        print(f"{'format':>6} {'perplexity':>10} {'vs loaded':>9} {'agree':>6} {'host GiB':>8}")
        for r in result["runs"]:
            print(f"{r['format']:>6} {r['perplexity']:10.3f} {r['perplexity_over_bf16']:9.4f} "
                  f"{percent(r['agreement']):>6} {r['host_expert_bytes'] / 2**30:8.3f}")
        return
    print(f"{'mode':>9} {'degrade':>7} {'fraction':>8} {'perplexity':>10} {'vs exact':>8} {'agree':>6} "
          f"{'pred acc':>8} {'precomp':>8}")

    for r in result["runs"]:
        print(f"{r['mode']:>9} {r['degrade']!s:>7} {r['resident_fraction']:8.2f} {r['perplexity']:10.3f} "
              f"{r['perplexity_over_exact']:8.4f} {percent(r['agreement']):>6} {percent(r['prediction_accuracy']):>8} "
              f"{percent(r['precomputed_share']):>8}")

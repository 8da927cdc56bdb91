"""`daop-vllm eval quality`: what each mode costs in accuracy (daop_vllm/bench/quality.py)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from daop_vllm.cli.common import emit_json, fraction, layer_index, percent
from daop_vllm.core.errors import DaopConfigError
from daop_vllm.core.quantized_experts import FORMATS


def add_parser(commands) -> None:
    evaluate = commands.add_parser("eval", help="accuracy measurements")
    eval_commands = evaluate.add_subparsers(dest="eval", required=True)
    quality = eval_commands.add_parser("quality", help="perplexity, greedy agreement and prediction accuracy "
                                                       "of each mode through vLLM, on a trained model")
    quality.add_argument("--model", nargs="+", default=["shakespeare-moe"],
                         help="a recipe of `build-model` (built when missing) or a checkpoint folder of one "
                              "(default: shakespeare-moe); several with --tolerance")
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
    quality.add_argument("--tolerance", type=tolerance, nargs="+", dest="tolerances", default=None,
                         help="instead of the modes: the curve of staleness_tolerance over these values ('off': no "
                              "gate) for verified and daop at each fraction, perplexity against the share of decode "
                              "CPU work pre-computed (no greedy agreement); result rows in `points`")
    quality.add_argument("--simulate-trace", type=Path, default=None,
                         help="(with --tolerance) a Mixtral routing trace: each point also gets the simulator's "
                              "tokens/s at the share of pre-computed results its gate kept")
    quality.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                         help="the engines' dtype (vLLM's --dtype)")
    quality.add_argument("--json", action="store_true", help="print one JSON object")
    quality.add_argument("--out", type=Path, help="also write the JSON here")
    quality.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    quality.set_defaults(run=run)


def tolerance(text: str) -> float | None:
    if text == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"a tolerance is a number >= 0 or 'off', got {text!r}")
    return value


def run(args: argparse.Namespace) -> None:
    from daop_vllm.bench.quality import plot, run
    from daop_vllm.cli.trained_model import RECIPES, build_trained_model

    if args.tolerances and args.formats:
        raise DaopConfigError("--tolerance and --format are different evaluations; give one of them")
    if args.simulate_trace is not None and not args.tolerances:
        raise DaopConfigError("--simulate-trace applies to --tolerance only")
    if args.simulate_trace is not None and not args.simulate_trace.is_file():
        raise DaopConfigError(f"--simulate-trace {args.simulate_trace}: no such file")
    if len(args.model) > 1 and not args.tolerances:
        raise DaopConfigError("several --model apply to --tolerance only; give one model")
    models = []
    for model in args.model:
        path = build_trained_model(model) if model in RECIPES else Path(model)
        if not (path / "config.json").exists():
            raise DaopConfigError(f"--model {model}: not a recipe ({', '.join(RECIPES)}) nor a checkpoint folder "
                                  "(config.json missing)")
        models.append(path)
    if args.tolerances:
        _tolerance_sweep(args, models)
        return
    model = models[0]
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


def _tolerance_sweep(args: argparse.Namespace, models: list[Path]) -> None:
    from daop_vllm.bench import quality_tolerance

    result = quality_tolerance.run(models, args.fractions, args.tolerances, args.passages, args.prompt_tokens,
                                   args.scored_tokens, args.first_predicted_layer, args.dtype, args.simulate_trace)
    if emit_json(result, args, quality_tolerance.plot):
        return
    print(f"{'model':>20} {'mode':>9} {'degrade':>7} {'fraction':>8} {'tolerance':>9} {'vs exact':>8} "
          f"{'precomp':>8} {'kept':>6}"
          + (f" {'sim tok/s':>9}" if "simulated" in result else ""))
    for p in result["points"]:
        tol = "off" if p["tolerance"] is None else f"{p['tolerance']:g}"
        print(f"{p['model']:>20} {p['mode']:>9} {p['degrade']!s:>7} {p['resident_fraction']:8.2f} {tol:>9} "
              f"{p['perplexity_over_exact']:8.4f} {percent(p['precomputed_share']):>8} {percent(p['kept_share']):>6}"
              + (f" {p['simulated_tokens_per_s']:9.2f}" if "simulated" in result else ""))

"""The `daop-vllm` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from daop_vllm.core.errors import DaopConfigError
from daop_vllm.offline.model_shapes import MODEL_SHAPES, model_shape
from daop_vllm.core.prediction import MODES
from daop_vllm.model_builder import FAMILIES
from daop_vllm.trained_model import RECIPES


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def _layer_index(text: str) -> int:
    """A predicted layer: 1 or more (layer 0 has no layer before it to predict from)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="daop-vllm", description="DAOP expert offloading for MoE models in vLLM")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="offline batch generation with load_format='daop' on a small local Mixtral")
    demo.add_argument("--model", default="shakespeare-moe", choices=list(RECIPES),
                      help="the trained model to serve, built (about 20 minutes for the default) when missing")
    demo.add_argument("--model-dir", type=Path, default=None,
                      help="where that model is, or is built (default: the cache, see `build-model`)")
    demo.add_argument("--resident-fraction", type=_fraction, default=0.5, help="share of experts on the device")
    demo.add_argument("--num-prompts", type=int, default=16)
    demo.add_argument("--max-tokens", type=int, default=64)
    demo.add_argument("--compile", action="store_true", help="let vLLM compile the model (slower start)")

    build = commands.add_parser("build-model", help="write a small MoE checkpoint and tokenizer: trained or random")
    build.add_argument("name", choices=[*RECIPES, "random"],
                       help="a trained model (Shakespeare, from scratch on this CPU; cached) or 'random' weights")
    build.add_argument("-o", "--out-dir", type=Path,
                       help="where to write it (default: $DAOP_VLLM_CACHE/models/NAME, ~/.cache/daop-vllm/...)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    # random weights only:
    build.add_argument("--layers", type=int, default=4)
    build.add_argument("--experts", type=int, default=8)
    build.add_argument("--top-k", type=int, default=2)
    build.add_argument("--hidden-size", type=int, default=64)
    build.add_argument("--intermediate-size", type=int, default=128)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--family", default="mixtral", choices=list(FAMILIES), help="the MoE architecture")
    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench", required=True)
    cpu = bench_commands.add_parser("cpu-experts", help="CPU expert executor vs streaming read and PyTorch")
    cpu.add_argument("--model-shape", default="mixtral-8x7b", choices=sorted(MODEL_SHAPES))
    cpu.add_argument("--threads", type=int, default=None, help="executor threads (default: physical cores)")
    cpu.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="tokens per expert")
    cpu.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    cpu.add_argument("--repeats", type=int, default=3, help="passes per figure; medians are reported")
    cpu.add_argument("--scaling", action="store_true", help="also GB/s for 1, 2, 4, 8, 16 threads")
    cpu.add_argument("--decode-steps", type=int, nargs="+", metavar="BATCH",
                     help="also whole decode steps of these batch sizes (top-k of all experts, random routing): "
                          "threads taking whole experts against slicing every expert")
    cpu.add_argument("--json", action="store_true", help="print one JSON object")
    cpu.add_argument("--out", type=Path, help="also write the JSON here")
    cpu.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")

    modes = bench_commands.add_parser("modes", help="exact / verified / daop through vLLM, per resident fraction")
    modes.add_argument("--model", type=Path, default=Path("models/bench-mixtral"),
                       help="a Mixtral checkpoint (built here, random weights, when the folder is empty)")
    modes.add_argument("--modes", nargs="+", default=["exact", "verified", "daop"], choices=list(MODES))
    modes.add_argument("--fractions", type=_fraction, nargs="+", default=[1, 0.5, 0.25, 0])
    modes.add_argument("--num-prompts", type=int, default=8)
    modes.add_argument("--max-tokens", type=int, default=48)
    modes.add_argument("--repeats", type=int, default=3, help="timed runs per figure; medians are reported")
    modes.add_argument("--first-predicted-layer", type=_layer_index, default=1)
    modes.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    modes.add_argument("--json", action="store_true", help="print one JSON object")
    modes.add_argument("--out", type=Path, help="also write the JSON here")
    modes.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")

    evaluate = commands.add_parser("eval", help="accuracy measurements")
    eval_commands = evaluate.add_subparsers(dest="eval", required=True)
    quality = eval_commands.add_parser("quality", help="perplexity, greedy agreement and prediction accuracy "
                                                       "of each mode through vLLM, on a trained model")
    quality.add_argument("--model", type=Path, default=None,
                         help="a checkpoint of `build-model shakespeare-moe*` (default: the cached shakespeare-moe, "
                              "built when missing)")
    quality.add_argument("--fractions", type=_fraction, nargs="+", default=[1, 0.5, 0.25])
    quality.add_argument("--passages", type=int, default=32, help="held-out passages scored for perplexity")
    quality.add_argument("--prompt-tokens", type=int, default=32, help="prompt tokens of each passage")
    quality.add_argument("--scored-tokens", type=int, default=192, help="forced decode tokens scored per passage")
    quality.add_argument("--prompts", type=int, default=16, help="held-out prompts for greedy agreement")
    quality.add_argument("--max-tokens", type=int, default=128, help="greedy tokens per agreement prompt")
    quality.add_argument("--first-predicted-layer", type=_layer_index, default=1,
                         help="(verified, daop) default 1: 5 of the model's 6 layers predicted, near the "
                              "paper's 28 of 32")
    quality.add_argument("--json", action="store_true", help="print one JSON object")
    quality.add_argument("--out", type=Path, help="also write the JSON here")
    quality.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")

    sim = commands.add_parser("simulate", help="replay a routing trace through every policy on a machine model")
    sim.add_argument("--trace", type=Path, required=True)
    sim.add_argument("--resident-fraction", type=_fraction, default=0.25)
    sim.add_argument("--split", type=_fraction, default=None,
                     help="sequences with one phase only: the first S of their rows become the prompt")
    sim.add_argument("--calibrate-on", type=_fraction, default=0.2,
                     help="share of the sequences (from the start) that build the static profile, not scored")
    sim.add_argument("--hardware", default="a6000", help="a preset (a6000, h200, local) or a JSON file")
    sim.add_argument("--model-shape", default=None, choices=sorted(MODEL_SHAPES),
                     help="expert sizes (default: the shape matching the trace)")
    sim.add_argument("--prediction-accuracy", type=_fraction, default=None,
                     help="share of predicted experts that are right (default: as measured for the model "
                          "shape where known, else the paper's 0.8411)")
    sim.add_argument("--batch", type=int, default=1, help="sequences in flight (continuous batching)")
    sim.add_argument("--first-predicted-layer", type=int, default=4)
    sim.add_argument("--policies", nargs="+", default=None, help="default: all")
    sim.add_argument("--limit", type=int, default=None, help="use the first N sequences of the trace")
    sim.add_argument("--json", action="store_true", help="print one JSON object")

    serve_load = bench_commands.add_parser("serve", help="concurrent streaming clients: stock vs daop vllm serve")
    serve_load.add_argument("--model", type=Path, default=Path("models/demo-mixtral"),
                            help="a Mixtral checkpoint (the demo's small model is built here when missing)")
    serve_load.add_argument("--requests", type=int, default=1000)
    serve_load.add_argument("--concurrency", type=int, default=64)
    serve_load.add_argument("--repeats", type=int, default=3, help="runs per server; medians are reported")
    serve_load.add_argument("--options", default='{"resident_fraction": 0.25}',
                            help="--model-loader-extra-config of the daop server")
    serve_load.add_argument("--json", action="store_true", help="print one JSON object")
    serve_load.add_argument("--out", type=Path, help="also write the JSON here")

    layer = bench_commands.add_parser("layer", help="the DAOP op per MoE layer against its expert kernels called directly")
    layer.add_argument("--rounds", type=int, default=7, help="rounds over every setting; medians are reported")
    layer.add_argument("--steps", type=int, default=50, help="engine steps per setting and round")
    layer.add_argument("--threads", type=int, default=1, help="CPU executor threads")
    layer.add_argument("--json", action="store_true", help="print one JSON object")
    layer.add_argument("--out", type=Path, help="also write the JSON here")

    vllm_serve = bench_commands.add_parser("vllm-serve", help="vLLM's `vllm bench serve` against stock and daop "
                                           "servers, each started and measured in turn")
    vllm_serve.add_argument("--model", type=Path, default=Path("models/bench-mixtral-8x512"),
                            help="a Mixtral checkpoint (8 layers, hidden 512, intermediate 1792, random weights: "
                                 "built here when missing)")
    vllm_serve.add_argument("--rounds", type=int, default=3, help="rounds over the settings; medians are reported")
    vllm_serve.add_argument("--settings", nargs="+", default=None,
                            help="default: all (stock, exact-1.0, exact-0.5, exact-0.25, daop-0.25)")
    vllm_serve.add_argument("--json", action="store_true", help="print one JSON object")
    vllm_serve.add_argument("--out", type=Path, help="also write the JSON here")

    bench_sim = bench_commands.add_parser("simulate", help="the simulator's evidence: paper check, fraction and batch sweeps")
    bench_sim.add_argument("--mixtral-trace", type=Path, default=Path("../shared/traces/mixtral-8x7b-vllm.jsonl.gz"))
    bench_sim.add_argument("--deepseek-trace", type=Path,
                           default=Path("../shared/traces/deepseek-v2-lite-puffin.dev.jsonl.gz"))
    bench_sim.add_argument("--deepseek-limit", type=int, default=64, help="sequences of the DeepSeek trace used")
    bench_sim.add_argument("--json", action="store_true", help="print one JSON object")
    bench_sim.add_argument("--out", type=Path, help="also write the JSON here")
    bench_sim.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")

    calibrate = commands.add_parser("calibrate", help="write a placement profile from routing traces or prompts")
    source = calibrate.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, action="append", help="trace file (repeatable)")
    source.add_argument("--model", type=Path, help="model to run the prompts through (with --prompts)")
    calibrate.add_argument("--prompts", type=Path, help="text file, one prompt per line (with --model)")
    calibrate.add_argument("-o", "--out", type=Path, required=True, help="profile JSON to write")

    stats = commands.add_parser("trace-stats", help="what a routing trace says")
    stats.add_argument("trace", type=Path)
    stats.add_argument("--split", type=_fraction, default=None,
                       help="treat the first S of each prefill-only sequence as prefill, the rest as decode")
    stats.add_argument("--json", action="store_true", help="print one JSON object")

    stats_cmd = commands.add_parser("stats", help="a stats_path file as a table (and a plot)")
    stats_cmd.add_argument("file", type=Path)
    stats_cmd.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")

    commands.add_parser("patch-vllm", help="apply patches/ to the installed vLLM (idempotent; `make` does it)")
    return parser


def _emit_json(result: dict, args: argparse.Namespace, plot) -> bool:
    """Record the command in a benchmark's result, write --out and --plot; with --json print it
    and return True (the caller then prints nothing else)."""
    import json

    result["command"] = "daop-vllm " + " ".join(sys.argv[1:])
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if getattr(args, "plot", None):
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result))
    return args.json


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _build_model(args: argparse.Namespace) -> None:
    if args.name == "random":
        out_dir = args.out_dir or Path("models/random")
        from daop_vllm.model_builder import TinyMixtralShape, build_tiny_mixtral

        shape = TinyMixtralShape(num_layers=args.layers, num_experts=args.experts, top_k=args.top_k,
                                 hidden_size=args.hidden_size, intermediate_size=args.intermediate_size)
        print(build_tiny_mixtral(out_dir, shape, seed=args.seed, family=args.family))
        return
    from daop_vllm.trained_model import build_trained_model, model_card_summary

    print(model_card_summary(build_trained_model(args.name, args.out_dir, progress=not args.quiet)))


def _bench_cpu_experts(args: argparse.Namespace) -> None:

    import torch

    from daop_vllm.bench.cpu_experts import decode_steps, measure, plot, thread_scaling
    from daop_vllm.core.cpu_executor import physical_core_count

    shape = model_shape(args.model_shape)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    result = measure(shape, args.threads or physical_core_count(), args.tokens, args.repeats, dtype)
    if args.scaling:
        result["thread_scaling"] = thread_scaling(shape, args.repeats, dtype)
    if args.decode_steps:
        result["decode_steps"] = decode_steps(shape, result["threads"], args.decode_steps, args.repeats, dtype)
    if _emit_json(result, args, plot):
        return
    print(f"{shape.name} {result['dtype']}, {result['threads']} threads, kernel: {result['cpu_kernel']}")
    print(f"streaming read: {result['stream_read_gbps']:.1f} GB/s; decode efficiency "
          f"{100 * result['decode_efficiency']:.0f}%")
    avx512 = "executor_avx512_gbps" in result["per_tokens"][str(result["tokens"][0])]
    print(f"{'tokens':>6} {'stream GB/s':>12} {'executor GB/s':>14} {'of stream':>10} {'torch GB/s':>11} "
          f"{'executor GFLOP/s':>17} {'torch GFLOP/s':>14}" + (f" {'without AMX GB/s':>17}" if avx512 else ""))
    for n in result["tokens"]:
        r = result["per_tokens"][str(n)]
        print(f"{n:6d} {r['stream_gbps']:12.1f} {r['executor_gbps']:14.1f} {100 * r['executor_over_stream']:9.0f}% "
              f"{r['torch_gbps']:11.1f} {r['executor_gflops']:17.1f} {r['torch_gflops']:14.1f}"
              + (f" {r['executor_avx512_gbps']:17.1f}" if avx512 else ""))
    if args.decode_steps:
        steps = result["decode_steps"]
        print(f"decode steps (top-{shape.top_k} of {shape.num_experts} experts, all on the CPU):")
        print(f"{'batch':>6} {'experts':>8} {'whole ms':>9} {'sliced ms':>10} {'executor takes':>15} {'of stream':>10}")
        for batch in steps["batches"]:
            r = steps["per_batch"][str(batch)]
            print(f"{batch:6d} {r['distinct_experts']:8.1f} {r['whole_ms']:9.2f} {r['sliced_ms']:10.2f} "
                  f"{r['executor_takes']:>15} {100 * r['executor_over_stream']:9.0f}%")


def _bench_modes(args: argparse.Namespace) -> None:

    from daop_vllm.bench.modes import ensure_bench_model, plot, run

    result = run(ensure_bench_model(args.model), args.modes, args.fractions, args.num_prompts, args.max_tokens,
                 args.repeats, args.first_predicted_layer, args.dtype)
    if _emit_json(result, args, plot):
        return
    print(f"{'mode':>9} {'fraction':>8} {'tok/s':>8} {'vs exact':>8} {'pred acc':>8} {'precomp':>8} {'wasted':>7} "
          f"{'agree':>6}")

    for r in result["runs"]:
        print(f"{r['mode']:>9} {r['resident_fraction']:8.2f} {r['tokens_per_s']:8.1f} "
              f"{r.get('tokens_per_s_over_exact', 0):8.2f} {_percent(r['prediction_accuracy']):>8} "
              f"{_percent(r['precomputed_share']):>8} {_percent(r['wasted_share']):>7} "
              f"{_percent(r['agreement_with_exact']):>6}")


def _eval_quality(args: argparse.Namespace) -> None:
    from daop_vllm.bench.quality import plot, run
    from daop_vllm.trained_model import build_trained_model

    model = args.model or build_trained_model("shakespeare-moe")
    if not (Path(model) / "config.json").exists():
        raise DaopConfigError(f"--model {model}: no checkpoint there (config.json missing)")
    result = run(Path(model), args.fractions, args.passages, args.prompt_tokens, args.scored_tokens, args.prompts,
                 args.max_tokens, args.first_predicted_layer)
    if _emit_json(result, args, plot):
        return
    print(f"held-out perplexity of the model (stock vLLM): {result['moe_perplexity']:.3f}")
    print(f"{'mode':>9} {'degrade':>7} {'fraction':>8} {'perplexity':>10} {'vs exact':>8} {'agree':>6} "
          f"{'pred acc':>8} {'precomp':>8}")

    for r in result["runs"]:
        print(f"{r['mode']:>9} {r['degrade']!s:>7} {r['resident_fraction']:8.2f} {r['perplexity']:10.3f} "
              f"{r['perplexity_over_exact']:8.4f} {_percent(r['agreement']):>6} {_percent(r['prediction_accuracy']):>8} "
              f"{_percent(r['precomputed_share']):>8}")


def _bench_serve(args: argparse.Namespace) -> None:
    import tempfile

    from daop_vllm.bench.serve_load import compare
    from daop_vllm.core.options import DaopOptions
    from daop_vllm.model_builder import build_tiny_mixtral

    DaopOptions.parse(args.options)
    if not (args.model / "config.json").exists():
        build_tiny_mixtral(args.model)
    result = compare(str(args.model), args.requests, args.concurrency, args.options, Path(tempfile.mkdtemp()),
                     args.repeats)
    if _emit_json(result, args, None):
        return
    print(f"{args.requests} requests, {args.concurrency} streaming clients, medians of {args.repeats} runs; "
          f"answered in full: {result['answered']}; "
          f"daop outputs equal to stock: {result['outputs_equal_stock']}")
    for name in ("stock", "daop"):
        r = result[name]
        print(f"{name:>6}: {r['requests_per_s']:.1f} req/s, {r['output_tokens_per_s']:.0f} tok/s, time per output "
              f"token p50 {r['tpot_p50_ms']:.1f} ms p99 {r['tpot_p99_ms']:.1f} ms, memory {r['rss_half_mib']:.0f} "
              f"-> {r['rss_end_mib']:.0f} MiB")


def _bench_layer(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from daop_vllm.bench.layer import BATCHES, FRACTIONS, MODES, run

    with tqdm(total=args.rounds * len(BATCHES) * len(FRACTIONS) * len(MODES), desc="bench layer", unit="setting",
              disable=args.json) as progress:
        result = run(args.rounds, args.steps, args.threads, progress)
    if _emit_json(result, args, None):
        return
    for row in result["rows"]:
        print(f"batch {row['batch']:3d}, fraction {row['fraction']:.2f}, {row['mode']:>5}: DAOP op {row['daop_us']:8.1f} us, "
              f"kernels direct {row['direct_us']:8.1f} us ({row['daop_over_direct']:.2f}x, machinery "
              f"{100 * row['machinery_share']:.0f}%)")


def _bench_vllm_serve(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from daop_vllm.bench.vllm_bench_serve import SETTINGS, run
    from daop_vllm.model_builder import TinyMixtralShape, build_tiny_mixtral

    settings = args.settings or list(SETTINGS)
    unknown = [name for name in settings if name not in SETTINGS]
    if unknown or "stock" not in settings:
        raise DaopConfigError(f"--settings takes {', '.join(SETTINGS)} and must include stock; got {settings}")
    if not (args.model / "config.json").exists():
        build_tiny_mixtral(args.model, TinyMixtralShape(num_layers=8, hidden_size=512, intermediate_size=1792))
    with tqdm(total=args.rounds * len(settings), desc="bench vllm-serve", unit="server", disable=args.json) as progress:
        result = run(str(args.model), args.rounds, settings, progress)
    if _emit_json(result, args, None):
        return
    for name, row in result["settings"].items():
        print(f"{name:>10}: {row['output_tokens_per_s_median']:.1f} output tok/s ({row['over_stock_median']:.2f}x stock; "
              f"rounds {row['over_stock_per_round']}), TPOT {row['median_tpot_ms_median']:.1f} ms, answered "
              f"{row['answered']}")


def _bench_simulate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from daop_vllm.bench.simulation import BATCHES, FRACTIONS, PRESETS, plot, run

    for trace in (args.mixtral_trace, args.deepseek_trace):
        if not trace.is_file():
            raise DaopConfigError(f"trace {trace} not found (the shared traces live in ../shared/traces)")
    runs = len(PRESETS) * len(FRACTIONS) + len(BATCHES)
    with tqdm(total=runs * 9, desc="bench simulate", unit="policy", disable=args.json) as progress:
        result = run(args.mixtral_trace, args.deepseek_trace, args.deepseek_limit, progress)
    if _emit_json(result, args, plot):
        return
    for fraction, check in result["paper_check"].items():
        print(f"a6000, Mixtral, {100 * float(fraction):.1f}% resident: daop {check['daop_tokens_per_s']:.2f} tok/s "
              f"(paper {check['paper_daop_tokens_per_s']}), static {check['static_tokens_per_s']:.2f}, "
              f"daop/static {check['daop_over_static']:.2f}")
    print(f"daop/static averaged over fractions: {result['daop_over_static_average_a6000']:.2f} (paper 1.35)")


def _simulate(args: argparse.Namespace) -> None:
    import json

    from tqdm import tqdm

    from daop_vllm.core.hardware import load_hardware
    from daop_vllm.offline.simulator import PAPER_PREDICTION_ACCURACY, POLICIES, simulate
    from daop_vllm.offline.traces import read_traces

    policies = args.policies or list(POLICIES)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise DaopConfigError(f"unknown policy {unknown[0]!r}; known: {', '.join(POLICIES)}")
    if args.batch < 1:
        raise DaopConfigError(f"--batch must be >= 1, got {args.batch}")
    seqs = list(read_traces(args.trace))[: args.limit]
    if not seqs:
        raise DaopConfigError(f"{args.trace} holds no sequences")
    shape = model_shape(args.model_shape) if args.model_shape else _shape_of_trace(seqs[0])
    accuracy = next(a for a in (args.prediction_accuracy, shape.prediction_accuracy, PAPER_PREDICTION_ACCURACY)
                    if a is not None)
    with tqdm(total=len(policies), desc="simulate", unit="policy", disable=args.json) as progress:
        try:
            result = simulate(seqs, policies, shape, load_hardware(args.hardware), args.resident_fraction,
                              args.calibrate_on, args.split, accuracy, args.batch, args.first_predicted_layer,
                              progress)
        except ValueError as exc:
            raise DaopConfigError(str(exc)) from None
    result["settings"]["trace"] = args.trace.name
    result["command"] = "daop-vllm " + " ".join(sys.argv[1:])
    if args.json:
        print(json.dumps(result))
        return
    settings = result["settings"]
    print(f"{args.trace.name} on {settings['hardware']['name']}, {shape.name}, "
          f"{100 * args.resident_fraction:.1f}% resident, batch {args.batch}, "
          f"{settings['scored_sequences']} sequences scored")
    static = result["policies"].get("static", {}).get("tokens_per_s")
    print(f"{'policy':>14} {'tok/s':>8} {'vs static':>9} {'decode hit':>10} {'CPU/token':>9} {'PCIe MB/token':>13}")
    for name, r in result["policies"].items():
        ratio = f"{r['tokens_per_s'] / static:9.2f}" if static else f"{'-':>9}"
        print(f"{name:>14} {r['tokens_per_s']:8.2f} {ratio} {100 * r['decode_hit_rate']:9.1f}% "
              f"{r['cpu_expert_tokens_per_token']:9.2f} {r['pcie_bytes_per_token'] / 1e6:13.1f}")


def _shape_of_trace(seq):
    for shape in MODEL_SHAPES.values():
        if (shape.num_layers, shape.num_experts, shape.top_k) == (seq.num_layers, seq.num_experts, seq.top_k):
            return shape
    raise DaopConfigError(f"no known model shape has {seq.num_layers} layers, top-{seq.top_k} of "
                          f"{seq.num_experts} experts; pass --model-shape")


def _calibrate(args: argparse.Namespace) -> None:
    import json

    from daop_vllm.offline.trace_analysis import calibrate_profile
    from daop_vllm.offline.traces import read_traces

    if args.model is not None:
        if args.prompts is None:
            raise DaopConfigError("calibrate --model needs --prompts FILE (one prompt per line)")
        from daop_vllm.calibration import record_prompt_traces

        seqs = record_prompt_traces(args.model, args.prompts)
    else:
        seqs = [seq for path in args.trace for seq in read_traces(path)]
    shapes = {(s.num_layers, s.num_experts) for s in seqs}
    if len(shapes) != 1:
        raise DaopConfigError(f"the traces mix model shapes {sorted(shapes)}; calibrate one model at a time")
    profile = calibrate_profile(seqs)
    args.out.write_text(json.dumps([list(pair) for pair in profile]))
    print(f"{len(seqs)} sequences -> {len(profile)} [layer, expert] pairs, most popular first: {args.out}")


def _trace_stats(args: argparse.Namespace) -> None:
    import json

    from daop_vllm.offline.trace_analysis import split_sequence, trace_stats
    from daop_vllm.offline.traces import read_traces

    seqs = [split_sequence(seq, args.split) for seq in read_traces(args.trace)]
    stats = trace_stats(seqs)
    if args.json:
        print(json.dumps(stats))
        return
    similarity = stats["prefill_decode_similarity"]["mean"]
    print(f"{stats['model'] or args.trace.name}: {stats['sequences']} sequences, {stats['num_layers']} layers, "
          f"top-{stats['top_k']} of {stats['num_experts']}, aligned: {stats['aligned']}")
    print(f"tokens (layer 0): prefill {stats['prefill_tokens']}, decode {stats['decode_tokens']}")
    print(f"experts used per layer: {stats['experts_used_per_layer']}")
    print("prefill-to-decode similarity (cosine of tokens per expert): "
          + (f"{100 * similarity:.2f}% (paper, Mixtral: 90.72%)" if similarity is not None
             else "no sequence has both phases (try --split 0.5)"))
    for budget, rate in stats["static_profile_hit_rate"].items():
        print(f"static profile at {100 * float(budget):.0f}% of experts resident: hit rate {100 * rate:.1f}%")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from daop_vllm.demo import run_demo

            run_demo(args.model, args.model_dir, args.resident_fraction, args.num_prompts, args.max_tokens,
                     eager=not args.compile)
        elif args.command == "build-model":
            _build_model(args)
        elif args.command == "bench" and args.bench == "modes":
            _bench_modes(args)
        elif args.command == "bench" and args.bench == "serve":
            _bench_serve(args)
        elif args.command == "bench" and args.bench == "simulate":
            _bench_simulate(args)
        elif args.command == "bench" and args.bench == "layer":
            _bench_layer(args)
        elif args.command == "bench" and args.bench == "vllm-serve":
            _bench_vllm_serve(args)
        elif args.command == "bench":
            _bench_cpu_experts(args)
        elif args.command == "eval":
            _eval_quality(args)
        elif args.command == "simulate":
            _simulate(args)
        elif args.command == "calibrate":
            _calibrate(args)
        elif args.command == "trace-stats":
            _trace_stats(args)
        elif args.command == "stats":
            from daop_vllm.stats_view import load_report, plot, render

            report = load_report(args.file)
            print(render(report))
            if args.plot:
                plot(report, args.plot)
        elif args.command == "patch-vllm":
            from daop_vllm.patch_vllm import apply_patches

            for name, status in apply_patches():
                print(f"{name}: {status}")
    except DaopConfigError as exc:
        print(f"daop-vllm: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`daop-vllm bench ...`: the benchmarks (their code in daop_vllm/bench/), each writing one JSON result."""

from __future__ import annotations

import argparse
from pathlib import Path

from daop_vllm.cli.common import emit_json, fraction, layer_index, percent
from daop_vllm.core.errors import DaopConfigError
from daop_vllm.core.prediction import MODES
from daop_vllm.core.quantized_experts import FORMATS, check_format
from daop_vllm.offline.model_shapes import MODEL_SHAPES, model_shape


def add_parser(commands) -> None:
    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench", required=True)
    cpu = bench_commands.add_parser("cpu-experts", help="CPU expert executor vs streaming read and PyTorch")
    cpu.add_argument("--model-shape", default="mixtral-8x7b", choices=sorted(MODEL_SHAPES))
    cpu.add_argument("--threads", type=int, default=None, help="executor threads (default: physical cores)")
    cpu.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64], help="tokens per expert")
    cpu.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="activations' (and bf16 weights') type")
    cpu.add_argument("--format", nargs="+", default=["bf16"], choices=FORMATS, dest="formats",
                     help="experts' storage, measured in the same passes (bf16: as --dtype)")
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
    modes.add_argument("--fractions", type=fraction, nargs="+", default=[1, 0.5, 0.25, 0])
    modes.add_argument("--num-prompts", type=int, default=8)
    modes.add_argument("--max-tokens", type=int, default=48)
    modes.add_argument("--repeats", type=int, default=3, help="timed runs per figure; medians are reported")
    modes.add_argument("--first-predicted-layer", type=layer_index, default=1)
    modes.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    modes.add_argument("--json", action="store_true", help="print one JSON object")
    modes.add_argument("--out", type=Path, help="also write the JSON here")
    modes.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    serve_load = _load_parser(bench_commands, "serve", "concurrent streaming clients: stock vs daop vllm serve", 1000)
    serve_load.add_argument("--repeats", type=int, default=3, help="runs per server; medians are reported")
    soak = _load_parser(bench_commands, "soak", "the daop server's memory under many requests: flat after warm-up?",
                        5000)
    soak.add_argument("--samples", type=int, default=25, help="memory samples, evenly over the answers")

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
    bench_sim.add_argument("--formats", action="store_true",
                           help="instead: every expert format on the a6000 and h200 presets, 25%% and 46.9%% resident")
    bench_sim.add_argument("--streaming", action="store_true",
                           help="instead: misses on the CPU, streamed, or each where cheaper - time to first token "
                                "of 256-4096-token prompts (Mixtral) and decode tokens/s at batch 1-64 "
                                "(DeepSeek-V2-Lite), a6000 and h200, 25%% resident")
    bench_sim.add_argument("--tensor-parallel", type=int, nargs="+", metavar="N",
                           help="instead: one GPU against N GPUs of one machine (vLLM's tensor parallelism; h200 "
                                "preset, Mixtral) at resident fractions 0.25-1 and at the same expert memory per GPU, "
                                "batch 1 and 16")
    bench_sim.add_argument("--max-num-batched-tokens", type=int, default=2048,
                           help="(--streaming) vLLM's token budget per step: prompts join the decode steps in pieces "
                                "(default 2048, vLLM's for serving)")
    bench_sim.add_argument("--json", action="store_true", help="print one JSON object")
    bench_sim.add_argument("--out", type=Path, help="also write the JSON here")
    bench_sim.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    for name, parser in bench_commands.choices.items():
        parser.set_defaults(run=RUNS[name])


def _print_formats(result: dict) -> None:
    names = list(result["formats"])
    print(f"executor GFLOP/s by expert format (x bf16's in the same passes); streaming read "
          f"{result['stream_read_gbps']:.1f} GB/s")
    print(f"{'tokens':>6} " + " ".join(f"{name + ' GFLOP/s':>14} {'GB/s':>6} {'x bf16':>6}" for name in names))
    for n in result["tokens"]:
        rows = [result["formats"][name]["per_tokens"][str(n)] for name in names]
        print(f"{n:6d} " + " ".join(f"{r['executor_gflops']:14.1f} {r['executor_gbps']:6.1f} "
                                    f"{r.get('executor_over_bf16', float('nan')):6.2f}" for r in rows))


def _bench_cpu_experts(args: argparse.Namespace) -> None:

    import torch

    from daop_vllm.bench.cpu_experts import decode_steps, measure, plot, thread_scaling
    from daop_vllm.core.cpu_executor import physical_core_count

    shape = model_shape(args.model_shape)
    for name in args.formats:
        for cols in (shape.hidden_size, shape.intermediate_size):
            check_format(name, cols, what=f"{shape.name} experts")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    result = measure(shape, args.threads or physical_core_count(), args.tokens, args.repeats, dtype,
                     formats=tuple(dict.fromkeys(args.formats)))
    if args.scaling:
        result["thread_scaling"] = thread_scaling(shape, args.repeats, dtype)
    if args.decode_steps:
        result["decode_steps"] = decode_steps(shape, result["threads"], args.decode_steps, args.repeats, dtype)
    if emit_json(result, args, plot):
        return
    print(f"{shape.name} {result['dtype']}, {result['threads']} threads, kernel: {result['cpu_kernel']}")
    if len(result["formats"]) > 1:
        _print_formats(result)
        return
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
    if emit_json(result, args, plot):
        return
    print(f"{'mode':>9} {'fraction':>8} {'tok/s':>8} {'vs exact':>8} {'pred acc':>8} {'precomp':>8} {'wasted':>7} "
          f"{'agree':>6}")

    for r in result["runs"]:
        print(f"{r['mode']:>9} {r['resident_fraction']:8.2f} {r['tokens_per_s']:8.1f} "
              f"{r.get('tokens_per_s_over_exact', 0):8.2f} {percent(r['prediction_accuracy']):>8} "
              f"{percent(r['precomputed_share']):>8} {percent(r['wasted_share']):>7} "
              f"{percent(r['agreement_with_exact']):>6}")


def _load_parser(bench_commands, name: str, help_text: str, requests: int) -> argparse.ArgumentParser:
    """A benchmark of streaming clients against `vllm serve`: its shared arguments."""
    parser = bench_commands.add_parser(name, help=help_text)
    parser.add_argument("--model", type=Path, default=Path("models/demo-mixtral"),
                        help="a Mixtral checkpoint (a small random-weight one is built here when missing)")
    parser.add_argument("--requests", type=int, default=requests)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--options", default='{"resident_fraction": 0.25}',
                        help="--model-loader-extra-config of the daop server")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser


def _load_model(args: argparse.Namespace) -> str:
    """The load benchmarks' checkpoint, built when missing, once their daop options are checked."""
    from daop_vllm.cli.model_builder import build_tiny_mixtral
    from daop_vllm.vllm_adapter.options import DaopOptions

    DaopOptions.parse(args.options)
    if not (args.model / "config.json").exists():
        build_tiny_mixtral(args.model)
    return str(args.model)


def _bench_serve(args: argparse.Namespace) -> None:
    import tempfile

    from daop_vllm.bench.serve_load import compare

    result = compare(_load_model(args), args.requests, args.concurrency, args.options, Path(tempfile.mkdtemp()),
                     args.repeats)
    if emit_json(result, args, None):
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
    if emit_json(result, args, None):
        return
    for row in result["rows"]:
        print(f"batch {row['batch']:3d}, fraction {row['fraction']:.2f}, {row['mode']:>5}: DAOP op {row['daop_us']:8.1f} us, "
              f"kernels direct {row['direct_us']:8.1f} us ({row['daop_over_direct']:.2f}x, machinery "
              f"{row['machinery_us']:.1f} us, {100 * row['machinery_share']:.0f}%), "
              f"router and kernels {row['routed_us']:8.1f} us "
              f"({row['daop_over_routed']:.2f}x)")


def _bench_soak(args: argparse.Namespace) -> None:
    import tempfile

    from daop_vllm.bench.serve_load import soak

    result = soak(_load_model(args), args.requests, args.concurrency, args.options, Path(tempfile.mkdtemp()),
                  args.samples)
    if emit_json(result, args, None):
        return
    print(f"{args.requests} requests, {args.concurrency} streaming clients: {result['answered']} answered in full, "
          f"{result['requests_per_s']:.1f} req/s")
    print("server memory (MiB) after n answers: " +
          ", ".join(f"{n}: {mib:.0f}" for n, mib in result["rss_mib_after_answers"]))
    print(f"growth after the first {100 * result['warm_up_share']:.0f}%: "
          f"{100 * result['rss_growth_after_warm_up']:.1f}%")


def _bench_vllm_serve(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from daop_vllm.bench.vllm_bench_serve import SETTINGS, run
    from daop_vllm.cli.model_builder import TinyMixtralShape, build_tiny_mixtral

    settings = args.settings or list(SETTINGS)
    unknown = [name for name in settings if name not in SETTINGS]
    if unknown or "stock" not in settings:
        raise DaopConfigError(f"--settings takes {', '.join(SETTINGS)} and must include stock; got {settings}")
    if not (args.model / "config.json").exists():
        build_tiny_mixtral(args.model, TinyMixtralShape(num_layers=8, hidden_size=512, intermediate_size=1792))
    with tqdm(total=args.rounds * len(settings), desc="bench vllm-serve", unit="server", disable=args.json) as progress:
        result = run(str(args.model), args.rounds, settings, progress)
    if emit_json(result, args, None):
        return
    for name, row in result["settings"].items():
        print(f"{name:>10}: {row['output_tokens_per_s_median']:.1f} output tok/s ({row['over_stock_median']:.2f}x stock; "
              f"rounds {row['over_stock_per_round']}), TPOT {row['median_tpot_ms_median']:.1f} ms, answered "
              f"{row['answered']}")


def _bench_simulate(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from daop_vllm.bench.simulation import (
        BATCHES,
        FORMAT_FRACTIONS,
        FORMAT_PRESETS,
        FRACTIONS,
        PRESETS,
        PROMPT_TOKENS,
        STREAM_BATCHES,
        STREAM_POLICIES,
        STREAM_PRESETS,
        plot,
        plot_formats,
        plot_streaming,
        run,
        run_formats,
        run_streaming,
    )
    from daop_vllm.core.quantized_experts import FORMATS
    from daop_vllm.offline.simulator import BASE_POLICIES

    if sum(map(bool, (args.formats, args.streaming, args.tensor_parallel))) > 1:
        raise DaopConfigError("--formats, --streaming and --tensor-parallel are different runs; give one of them")
    mixtral_only = args.formats or args.tensor_parallel
    for trace in (args.mixtral_trace,) if mixtral_only else (args.mixtral_trace, args.deepseek_trace):
        if not trace.is_file():
            raise DaopConfigError(f"trace {trace} not found (the shared traces live in ../shared/traces)")
    if args.streaming and args.max_num_batched_tokens < max(STREAM_BATCHES):
        raise DaopConfigError(f"--max-num-batched-tokens must be at least the largest batch ({max(STREAM_BATCHES)}): "
                              f"every step gives each decoding sequence a token; got {args.max_num_batched_tokens}")
    if args.tensor_parallel:
        _bench_simulate_tensor_parallel(args)
        return
    if args.streaming:
        runs = len(STREAM_PRESETS) * (len(PROMPT_TOKENS) + len(STREAM_BATCHES)) * len(STREAM_POLICIES)
        with tqdm(total=runs, desc="bench simulate --streaming", unit="policy", disable=args.json) as progress:
            result = run_streaming(args.mixtral_trace, args.deepseek_trace, args.deepseek_limit, progress,
                                   args.max_num_batched_tokens)
        if emit_json(result, args, plot_streaming):
            return
        for preset, summary in result["summary"].items():
            for tokens, row in summary["time_to_first_token"].items():
                print(f"{preset}, Mixtral, {tokens}-token prompt: time to first token {row['best_streaming_s']:.3f} s "
                      f"({row['best_streaming']}) against {row['best_cpu_only_s']:.3f} s ({row['best_cpu_only']}), "
                      f"stream-all {row['stream_all_s']:.3f} s")
            for batch, row in summary["decode"].items():
                print(f"{preset}, DeepSeek-V2-Lite, batch {batch}: {row['best_streaming_tokens_per_s']:.1f} tok/s "
                      f"({row['best_streaming']}) = {row['streaming_over_cpu_only']:.2f}x {row['best_cpu_only']}, "
                      f"stream-all {row['stream_all_tokens_per_s']:.1f}")
        return
    if args.formats:
        runs = len(FORMAT_PRESETS) * len(FORMAT_FRACTIONS) * len(FORMATS) * len(BASE_POLICIES)
        with tqdm(total=runs, desc="bench simulate --formats", unit="policy", disable=args.json) as progress:
            result = run_formats(args.mixtral_trace, progress)
        if emit_json(result, args, plot_formats):
            return
        for preset, fractions in result["by_format"].items():
            for fraction, formats in fractions.items():
                print(f"{preset}, {100 * float(fraction):.1f}% resident: " + "; ".join(
                    f"{fmt} daop {runs['daop']['tokens_per_s']:.2f} / auto-daop {runs['auto-daop']['tokens_per_s']:.2f}"
                    " tok/s" for fmt, runs in formats.items()))
        return
    runs = len(PRESETS) * len(FRACTIONS) + len(BATCHES)
    with tqdm(total=runs * len(BASE_POLICIES), desc="bench simulate", unit="policy", disable=args.json) as progress:
        result = run(args.mixtral_trace, args.deepseek_trace, args.deepseek_limit, progress)
    if emit_json(result, args, plot):
        return
    for resident, check in result["paper_check"].items():
        print(f"a6000, Mixtral, {100 * float(resident):.1f}% resident: daop {check['daop_tokens_per_s']:.2f} tok/s "
              f"(paper {check['paper_daop_tokens_per_s']}), static {check['static_tokens_per_s']:.2f}, "
              f"daop/static {check['daop_over_static']:.2f}")
    print(f"daop/static averaged over fractions: {result['daop_over_static_average_a6000']:.2f} (paper 1.35)")


def _bench_simulate_tensor_parallel(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from daop_vllm.bench.simulation import (
        TP_BATCHES,
        plot_tensor_parallel,
        run_tensor_parallel,
        tensor_parallel_lines,
        tensor_parallel_points,
    )
    from daop_vllm.offline.simulator import BASE_POLICIES

    for size in args.tensor_parallel:
        try:
            model_shape("mixtral-8x7b").tensor_parallel_rank(size)
        except ValueError as exc:
            raise DaopConfigError(f"--tensor-parallel: {exc}") from None
    runs = len(TP_BATCHES) * len(tensor_parallel_points(args.tensor_parallel)) * len(BASE_POLICIES)
    with tqdm(total=runs, desc="bench simulate --tensor-parallel", unit="policy", disable=args.json) as progress:
        result = run_tensor_parallel(args.mixtral_trace, args.tensor_parallel, progress)
    if not emit_json(result, args, plot_tensor_parallel):
        print("\n".join(tensor_parallel_lines(result)))


RUNS = {"cpu-experts": _bench_cpu_experts, "modes": _bench_modes, "serve": _bench_serve, "soak": _bench_soak,
        "layer": _bench_layer, "vllm-serve": _bench_vllm_serve, "simulate": _bench_simulate}

"""`daop-vllm bench simulate`: the simulator's evidence in one run - the paper check (a6000,
Mixtral, 46.9% and 25% resident), tokens/s per policy against resident fraction for each
machine model, and against batch size at 25% resident; with `--formats`, what each expert format
buys on the a6000 and h200 presets at 25% and 46.9% resident; with `--streaming`, what streaming
misses to the device buys: time to first token of long prompts (Mixtral) and decode tokens/s
against batch size (DeepSeek-V2-Lite), a6000 and h200, 25% resident; with `--tensor-parallel`,
one GPU against N of one h200 machine (Mixtral), at the same resident fraction and at the same
expert memory per GPU, batch 1 and 16."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daop_vllm.core.hardware import FORMAT_READ_SHARE, load_hardware
from daop_vllm.core.quantized_experts import FORMATS
from daop_vllm.offline.model_shapes import model_shape
from daop_vllm.offline.simulator import BASE_POLICIES, simulate
from daop_vllm.offline.trace_analysis import calibrate_profile
from daop_vllm.offline.traces import TraceSequence, read_traces

# ../shared/reference/daop.md: Mixtral-8x7B on the A6000 machine, batch 1.
PAPER = {"daop_tokens_per_s": {"0.469": 4.52, "0.25": 3.23}, "daop_over_fiddler_full_memory": 1.404,
         "daop_over_fiddler_average": 1.354}
FRACTIONS = [0.25, 0.375, 0.469, 0.625]
PRESETS = ["a6000", "h200", "local"]
BATCHES = [1, 4, 16, 32]
FORMAT_PRESETS, FORMAT_FRACTIONS = ["a6000", "h200"], [0.25, 0.469]
# Mixtral: the one prompted sequence calibrates, the two decode-only ones are scored with their
# first 30% as the prompt (about the paper's 256-token prompts against 512 outputs).
MIXTRAL_ARGS = dict(calibrate_on=0.34, split=0.3)


def run(mixtral_trace: Path, deepseek_trace: Path, deepseek_limit: int, progress) -> dict[str, Any]:
    mixtral = list(read_traces(mixtral_trace))
    deepseek = list(read_traces(deepseek_trace))[:deepseek_limit]
    policies = BASE_POLICIES
    mixtral_args = dict(shape=model_shape("mixtral-8x7b"), **MIXTRAL_ARGS)
    fractions = {}
    for preset in PRESETS:
        fractions[preset] = {
            str(f): simulate(mixtral, policies, hardware=load_hardware(preset), resident_fraction=f, progress=progress,
                             **mixtral_args)
            for f in FRACTIONS
        }
    paper_check = {f: fractions["a6000"][f]["policies"] for f in ("0.469", "0.25")}
    batches = {
        str(b): simulate(deepseek, policies, model_shape("deepseek-v2-lite"), load_hardware("a6000"), 0.25,
                         calibrate_on=0.2, split=0.5, batch=b, progress=progress)
        for b in BATCHES
    }
    return {
        "paper": PAPER,
        "paper_check": {
            f: {"daop_tokens_per_s": r["daop"]["tokens_per_s"], "static_tokens_per_s": r["static"]["tokens_per_s"],
                "daop_over_static": r["daop"]["tokens_per_s"] / r["static"]["tokens_per_s"],
                "paper_daop_tokens_per_s": PAPER["daop_tokens_per_s"][f]}
            for f, r in paper_check.items()
        },
        "daop_over_static_average_a6000": sum(
            r["policies"]["daop"]["tokens_per_s"] / r["policies"]["static"]["tokens_per_s"]
            for r in fractions["a6000"].values()) / len(FRACTIONS),
        "by_fraction": fractions,
        "by_batch_deepseek_a6000_25pct": batches,
    }


def run_formats(mixtral_trace: Path, progress) -> dict[str, Any]:
    """Every policy on the Mixtral trace with its experts in each format (device and host alike),
    per preset and resident fraction: tokens/s, and each format's over bf16's."""
    mixtral = list(read_traces(mixtral_trace))
    by_format: dict[str, Any] = {}
    for preset in FORMAT_PRESETS:
        for fraction in FORMAT_FRACTIONS:
            runs = {fmt: simulate(mixtral, BASE_POLICIES, model_shape("mixtral-8x7b"), load_hardware(preset), fraction,
                                  progress=progress, expert_format=fmt, **MIXTRAL_ARGS)["policies"]
                    for fmt in FORMATS}
            by_format.setdefault(preset, {})[str(fraction)] = {
                fmt: {name: {"tokens_per_s": r["tokens_per_s"],
                             "over_bf16": r["tokens_per_s"] / runs["bf16"][name]["tokens_per_s"]}
                      for name, r in policies.items()}
                for fmt, policies in runs.items()}
    return {"by_format": by_format, "presets": FORMAT_PRESETS, "resident_fractions": FORMAT_FRACTIONS,
            "formats": list(FORMATS), "cpu_read_share": FORMAT_READ_SHARE,
            "note": "bytes per expert of the format everywhere (device reads, CPU reads, PCIe copies); the CPU "
                    "reads quantized experts at cpu_read_share of its bf16 rate (measured, bench cpu-experts --format)"}


STREAM_PRESETS = ["a6000", "h200"]
PROMPT_TOKENS = [256, 1024, 4096]
STREAM_BATCHES = [1, 4, 16, 32, 64]
# the policies the streaming evidence compares: the CPU-only ones (ours and the baselines), ours
# with streaming, and vLLM's prefetch offloader's way (stream-all)
STREAM_POLICIES = ["static", "daop", "ondemand", "auto-exact", "auto-verified", "auto-daop", "auto-exact+stream",
                   "auto-verified+stream", "auto-daop+stream", "stream-all"]


def _pooled_rows(sequences: list[TraceSequence], layer: int, start: float, count: int) -> list[list[int]]:
    """`count` rows of `layer` from every sequence's rows (prompt, then generated) back to back,
    taken cyclically from `start` (a share of the way in: layers of unaligned traces differ in rows)."""
    rows = [row for seq in sequences for phase in (seq.prefill, seq.decode) for row in phase[layer]]
    first = int(start * len(rows))
    return [rows[(first + i) % len(rows)] for i in range(count)]


def long_prompt(sequences: list[TraceSequence], tokens: int) -> TraceSequence:
    """A prompt of `tokens` rows per layer: every sequence's rows (prompt, then generated) back to
    back, repeated as often as needed - no trace has prompts this long - and nothing to decode."""
    first = sequences[0]
    prefill = [_pooled_rows(sequences, layer, 0.0, tokens) for layer in range(first.num_layers)]
    return TraceSequence(f"prompt-{tokens}", first.num_layers, first.num_experts, first.top_k, first.aligned,
                         prefill, [[] for _ in range(first.num_layers)], model=first.model)


def batch_sequences(sequences: list[TraceSequence], count: int, rows: int) -> list[TraceSequence]:
    """`count` sequences of `rows` generated rows per layer cut from the trace's rows back to back,
    the i-th starting i / count of the way in, so that a batch's rows in a step are different
    tokens: the Mixtral trace scores two sequences, and a batch of 16 needs more."""
    first = sequences[0]
    return [TraceSequence(f"rows-{i}", first.num_layers, first.num_experts, first.top_k, first.aligned,
                          [[] for _ in range(first.num_layers)],
                          [_pooled_rows(sequences, layer, i / count, rows) for layer in range(first.num_layers)],
                          model=first.model)
            for i in range(count)]


def run_streaming(mixtral_trace: Path, deepseek_trace: Path, deepseek_limit: int | None, progress,
                  max_batched_tokens: int | None = 2048) -> dict[str, Any]:
    """Per preset: time to first token of one prompt of each length alone (the Mixtral trace's
    prompted sequence calibrates the placement), and decode tokens/s of the DeepSeek-V2-Lite trace
    against batch size, every policy of STREAM_POLICIES; prompts join the decode steps in pieces
    within `max_batched_tokens` a step, as vLLM's scheduler mixes them."""
    mixtral = list(read_traces(mixtral_trace))
    deepseek = list(read_traces(deepseek_trace))[:deepseek_limit]
    prompts, batches = {}, {}
    for preset in STREAM_PRESETS:
        hardware = load_hardware(preset)
        prompts[preset] = {
            str(tokens): simulate([mixtral[0], long_prompt(mixtral, tokens)], STREAM_POLICIES,
                                  model_shape("mixtral-8x7b"), hardware, 0.25, calibrate_on=0.5, progress=progress,
                                  max_batched_tokens=max_batched_tokens)
            for tokens in PROMPT_TOKENS}
        batches[preset] = {
            str(batch): simulate(deepseek, STREAM_POLICIES, model_shape("deepseek-v2-lite"), hardware, 0.25,
                                 calibrate_on=0.2, split=0.5, batch=batch, progress=progress,
                                 max_batched_tokens=max_batched_tokens)
            for batch in STREAM_BATCHES}
    return {"prompts_mixtral_25pct": prompts, "decode_by_batch_deepseek_25pct": batches,
            "summary": _streaming_summary(prompts, batches),
            "max_num_batched_tokens": max_batched_tokens,
            "note": "prompts of 256-4096 tokens are the Mixtral trace's rows (prompt and generated, every sequence) "
                    "back to back, repeated: no trace holds prompts that long"}


def _best(policies: dict[str, Any], names: list[str], key: str, lowest: bool = False) -> tuple[str, float]:
    values = {n: policies[n][key] for n in names if policies[n][key] is not None}
    name = (min if lowest else max)(values, key=values.get)
    return name, values[name]


def _streaming_summary(prompts: dict, batches: dict) -> dict[str, Any]:
    """Ours with streaming against our best CPU-only policy and against stream-all, per preset,
    prompt length and batch."""
    cpu_only = ["auto-exact", "auto-verified", "auto-daop"]
    streaming = [f"{n}+stream" for n in cpu_only]
    summary: dict[str, Any] = {}
    for preset in prompts:
        ttft = {}
        for tokens, result in prompts[preset].items():
            policies = result["policies"]
            best_cpu, cpu_s = _best(policies, cpu_only, "mean_prefill_s", lowest=True)
            best_stream, stream_s = _best(policies, streaming, "mean_prefill_s", lowest=True)
            ttft[tokens] = {"best_cpu_only": best_cpu, "best_cpu_only_s": cpu_s, "best_streaming": best_stream,
                            "best_streaming_s": stream_s, "stream_all_s": policies["stream-all"]["mean_prefill_s"],
                            "streaming_over_cpu_only": stream_s / cpu_s}
        decode = {}
        for batch, result in batches[preset].items():
            policies = result["policies"]
            best_cpu, cpu_rate = _best(policies, cpu_only, "tokens_per_s")
            best_stream, stream_rate = _best(policies, streaming, "tokens_per_s")
            decode[batch] = {"best_cpu_only": best_cpu, "best_cpu_only_tokens_per_s": cpu_rate,
                             "best_streaming": best_stream, "best_streaming_tokens_per_s": stream_rate,
                             "stream_all_tokens_per_s": policies["stream-all"]["tokens_per_s"],
                             "streaming_over_cpu_only": stream_rate / cpu_rate}
        summary[preset] = {"time_to_first_token": ttft, "decode": decode}
    return summary


def plot_streaming(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    presets = list(result["prompts_mixtral_25pct"])
    fig, axes = plt.subplots(2, len(presets), figsize=(6.5 * len(presets), 9))
    for column, preset in enumerate(presets):
        prompts = result["prompts_mixtral_25pct"][preset]
        batches = result["decode_by_batch_deepseek_25pct"][preset]
        for name in STREAM_POLICIES:
            style = dict(marker="o", label=name, linestyle="-" if "stream" in name else "--")
            axes[0][column].plot([int(t) for t in prompts],
                                 [prompts[t]["policies"][name]["mean_prefill_s"] for t in prompts], **style)
            axes[1][column].plot([int(b) for b in batches],
                                 [batches[b]["policies"][name]["tokens_per_s"] for b in batches], **style)
        axes[0][column].set(xlabel="prompt tokens", ylabel="time to first token, s (simulated)", xscale="log",
                            yscale="log", title=f"Mixtral-8x7B, {preset}, 25% resident: one prompt alone")
        axes[1][column].set(xlabel="sequences in flight (batch)", ylabel="decode tokens/s (simulated)", xscale="log",
                            yscale="log", title=f"DeepSeek-V2-Lite trace, {preset}, 25% resident")
    for ax in axes.flat:
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("misses on the CPU, streamed to the device, or each where cheaper (daop-vllm bench simulate "
                 "--streaming)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_formats(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    panels = [(p, f) for p in result["presets"] for f in map(str, result["resident_fractions"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4.3), sharey=True)
    names = BASE_POLICIES
    width = 0.8 / len(result["formats"])
    for ax, (preset, fraction) in zip(axes, panels):
        runs = result["by_format"][preset][fraction]
        for i, fmt in enumerate(result["formats"]):
            ax.bar([n + i * width for n in range(len(names))], [runs[fmt][p]["tokens_per_s"] for p in names], width,
                   label=fmt)
        ax.set_xticks([n + width for n in range(len(names))], names, rotation=60, fontsize=7)
        ax.set(yscale="log", title=f"{preset}, {100 * float(fraction):.1f}% resident", ylabel="decode tokens/s")
        ax.grid(alpha=0.3, axis="y", which="both")
    axes[0].legend(title="expert format")
    fig.suptitle("simulated decode tokens/s per policy and expert format (Mixtral-8x7B trace)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    presets = list(result["by_fraction"])
    fig, axes = plt.subplots(1, len(presets) + 1, figsize=(5 * (len(presets) + 1), 4.3))
    for ax, preset in zip(axes, presets):
        runs = result["by_fraction"][preset]
        fractions = [float(f) for f in runs]
        for name in BASE_POLICIES:
            ax.plot(fractions, [runs[f]["policies"][name]["tokens_per_s"] for f in runs], marker="o", label=name)
        if preset == "a6000":
            ax.scatter([0.469, 0.25], [4.52, 3.23], marker="*", s=150, color="k", zorder=5, label="paper: DAOP")
        ax.set(xlabel="resident fraction", ylabel="decode tokens/s (simulated)", yscale="log",
               title=f"Mixtral-8x7B trace, {preset}")
    ax = axes[-1]
    batches = result["by_batch_deepseek_a6000_25pct"]
    for name in BASE_POLICIES:
        ax.plot([int(b) for b in batches], [batches[b]["policies"][name]["tokens_per_s"] for b in batches],
                marker="o", label=name)
    ax.set(xlabel="sequences in flight (batch)", ylabel="tokens/s (simulated)", xscale="log", yscale="log",
           title="DeepSeek-V2-Lite trace, a6000, 25% resident")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    fig.suptitle("simulated decode tokens/s per policy (daop-vllm bench simulate)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


TP_PRESET = "h200"
TP_FRACTIONS = [0.25, 0.5, 0.75, 1.0]
TP_BATCHES = [1, 16]
# batches above 1: sequences of this many rows (30% of them the prompt, as the scored ones at batch 1)
TP_SEQUENCE_ROWS = 256
# the policies that keep to the budget (`gpu` holds every expert: the memory-unlimited bound)
BUDGETED_POLICIES = [name for name in BASE_POLICIES if name != "gpu"]


def tensor_parallel_points(sizes: list[int]) -> list[tuple[int, float]]:
    """(GPUs, resident fraction) to simulate: one GPU and each size at TP_FRACTIONS, and one GPU
    at each fraction / N too - the same expert memory per GPU as N GPUs at that fraction."""
    points = {(n, f) for n in {1, *sizes} for f in TP_FRACTIONS} | {(1, f / n) for n in sizes for f in TP_FRACTIONS}
    return sorted(points)


def run_tensor_parallel(mixtral_trace: Path, sizes: list[int], progress) -> dict[str, Any]:
    """Every policy on the Mixtral trace on the h200 preset at each point of
    `tensor_parallel_points`, batch 1 (the two decode-only sequences, their first 30% the prompt)
    and 16 (`batch_sequences` of their rows); the prompted sequence places the experts."""
    mixtral = list(read_traces(mixtral_trace))
    profile = calibrate_profile(mixtral[:1])
    hardware, shape = load_hardware(TP_PRESET), model_shape("mixtral-8x7b")
    by_batch: dict[str, Any] = {}
    for batch in TP_BATCHES:
        scored = mixtral[1:] if batch == 1 else batch_sequences(mixtral[1:], batch, TP_SEQUENCE_ROWS)
        for n, fraction in tensor_parallel_points(sizes):
            by_batch.setdefault(str(batch), {}).setdefault(str(n), {})[str(fraction)] = simulate(
                scored, BASE_POLICIES, shape, hardware, fraction, calibrate_on=0, profile=profile, split=0.3,
                batch=batch, progress=progress, tensor_parallel=n)
    return {"by_batch": by_batch, "summary": _tensor_parallel_summary(by_batch, sizes), "preset": TP_PRESET,
            "model_shape": shape.name, "tensor_parallel_sizes": sorted({1, *sizes}),
            "resident_fractions": TP_FRACTIONS, "batches": TP_BATCHES,
            "note": "one GPU's clocks: each GPU holds the resident fraction of the experts as 1/N shards, has its own "
                    "device memory, rates and PCIe link, and 1/N of the host's memory bandwidth and CPU; two "
                    "all-reduces per layer. Batch 1 scores the trace's two decode-only sequences (as bench simulate); "
                    f"batch 16 scores 16 sequences of {TP_SEQUENCE_ROWS} of their rows each, cut at even offsets. "
                    "The prompted sequence's prefill places the experts (calibrate_on 0 with its profile)"}


def _tensor_parallel_summary(by_batch: dict[str, Any], sizes: list[int]) -> list[dict[str, Any]]:
    """Per batch, size N > 1 and fraction f: the best budgeted policy on N GPUs at f against one GPU
    at f (the same share of experts resident) and at f / N (the same expert memory per GPU)."""
    rows = []
    for batch, by_size in by_batch.items():
        for n in (n for n in sizes if n > 1):
            for fraction in TP_FRACTIONS:
                many = by_size[str(n)][str(fraction)]
                many_best, many_rate = _best(many["policies"], BUDGETED_POLICIES, "tokens_per_s")
                for compare, one_gpu_fraction in (("same fraction", fraction), ("same memory per GPU", fraction / n)):
                    one_best, one_rate = _best(by_size["1"][str(one_gpu_fraction)]["policies"], BUDGETED_POLICIES,
                                               "tokens_per_s")
                    rows.append({
                        "batch": int(batch), "tensor_parallel": n, "resident_fraction": fraction,
                        "compare": compare, "one_gpu_resident_fraction": one_gpu_fraction,
                        "resident_gib_per_gpu": many["settings"]["resident_expert_bytes_per_gpu"] / 2**30,
                        "one_gpu_best": one_best, "one_gpu_tokens_per_s": one_rate,
                        "best": many_best, "tokens_per_s": many_rate, "over_one_gpu": many_rate / one_rate,
                        "allreduce_share": many["policies"][many_best]["allreduce_s_per_token"] * many_rate})
    return rows


def tensor_parallel_lines(result: dict[str, Any]) -> list[str]:
    """The summary of `run_tensor_parallel`, a line per row."""
    return [f"batch {row['batch']}, {row['tensor_parallel']} GPUs at {100 * row['resident_fraction']:.0f}% "
            f"({row['resident_gib_per_gpu']:.1f} GiB per GPU): {row['tokens_per_s']:.2f} tok/s ({row['best']}) "
            f"against one GPU at {100 * row['one_gpu_resident_fraction']:.1f}% ({row['compare']}) "
            f"{row['one_gpu_tokens_per_s']:.2f} ({row['one_gpu_best']}) = {row['over_one_gpu']:.2f}x"
            for row in result["summary"]]


def plot_tensor_parallel(result: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    batches = list(result["by_batch"])
    fig, axes = plt.subplots(len(batches), 2, figsize=(15, 4.5 * len(batches)), squeeze=False)
    colors = {name: f"C{i}" for i, name in enumerate(BASE_POLICIES)}
    for row, batch in zip(axes, batches):
        for n, runs in result["by_batch"][batch].items():
            for name in BASE_POLICIES:
                style = dict(marker="o", color=colors[name], linestyle="-" if n == "1" else "--",
                             label=f"{name}, {n} GPU{'s' if n != '1' else ''}")
                row[0].plot([float(f) for f in runs], [r["policies"][name]["tokens_per_s"] for r in runs.values()],
                            **style)
                row[1].plot([r["settings"]["resident_expert_bytes_per_gpu"] / 2**30 for r in runs.values()],
                            [r["policies"][name]["tokens_per_s"] for r in runs.values()], **style)
        row[0].set(xlabel="resident fraction (of experts, on every GPU)", ylabel="decode tokens/s (simulated)",
                   yscale="log", title=f"Mixtral-8x7B trace, {result['preset']}, batch {batch}: same fraction")
        row[1].set(xlabel="resident experts per GPU, GiB", ylabel="decode tokens/s (simulated)", yscale="log",
                   title=f"batch {batch}: same expert memory per GPU")
    for ax in axes.flat:
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("tensor parallelism: one GPU (solid) against N of one machine (dashed), sharing its CPU "
                 "(daop-vllm bench simulate --tensor-parallel)")
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="center right", fontsize=7)
    fig.savefig(path, dpi=100)

"""`daop-vllm bench modes`: the fidelity modes through vLLM on a small local Mixtral, per
resident fraction: prediction accuracy per layer, the share of CPU expert work pre-computed and
wasted, and decode tokens/s against `exact` in the same run."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

from daop_vllm.cli.demo import DEMO_PROMPTS
from daop_vllm.cli.model_builder import TinyMixtralShape
from daop_vllm.offline.simulator import PAPER_PREDICTION_ACCURACY

# Big enough that expert work, not Python, dominates a decode step on a small CPU machine.
BENCH_SHAPE = TinyMixtralShape(num_layers=8, hidden_size=512, intermediate_size=1536, num_heads=8, num_kv_heads=2)


def ensure_bench_model(model_dir: Path) -> Path:
    from daop_vllm.cli.model_builder import build_tiny_mixtral

    if not (model_dir / "config.json").exists():
        print(f"building the benchmark Mixtral ({BENCH_SHAPE}) in {model_dir}")
        build_tiny_mixtral(model_dir, BENCH_SHAPE)
    return model_dir


def run(model_dir: Path, modes: list[str], fractions: list[float], num_prompts: int, max_tokens: int,
        repeats: int, first_predicted_layer: int, dtype: str) -> dict[str, Any]:
    """One engine per mode, re-placed for each fraction; medians over `repeats` timed runs."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # faster start; RPCs work either way
    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    prompts = [DEMO_PROMPTS[i % len(DEMO_PROMPTS)] for i in range(num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    runs, exact_ids = [], {}
    progress = tqdm(total=len(modes) * len(fractions), desc="bench modes", unit="config")
    for mode in modes:
        # placement stays as placed, so that modes differ in nothing else
        extra: dict[str, Any] = {"resident_fraction": fractions[0], "mode": mode, "realloc": "off"}
        if mode != "exact":
            extra["first_predicted_layer"] = first_predicted_layer
        llm = LLM(model=str(model_dir), load_format="daop", model_loader_extra_config=extra, dtype=dtype,
                  max_model_len=512, max_num_seqs=max(8, num_prompts), enforce_eager=True, seed=0,
                  gpu_memory_utilization=0.5)
        try:
            for fraction in fractions:
                llm.collective_rpc("daop_place_fraction", args=(fraction,))
                llm.generate(prompts, params, use_tqdm=False)  # warm-up
                seconds = []
                for _ in range(repeats):
                    llm.collective_rpc("daop_reset_counters")
                    start = time.perf_counter()
                    outputs = llm.generate(prompts, params, use_tqdm=False)
                    seconds.append(time.perf_counter() - start)
                ids = [list(o.outputs[0].token_ids) for o in outputs]
                if mode == "exact":
                    exact_ids[fraction] = ids
                report = llm.collective_rpc("daop_report")[0]
                runs.append(summarize(mode, fraction, report, ids, exact_ids.get(fraction), seconds))
                progress.update()
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
    progress.close()
    exact_speed = {r["resident_fraction"]: r["tokens_per_s"] for r in runs if r["mode"] == "exact"}
    for r in runs:
        if r["resident_fraction"] in exact_speed:
            r["tokens_per_s_over_exact"] = r["tokens_per_s"] / exact_speed[r["resident_fraction"]]
    return {
        "model": str(model_dir), "dtype": dtype, "num_prompts": num_prompts, "max_tokens": max_tokens,
        "repeats": repeats, "first_predicted_layer": first_predicted_layer, "paper_prediction_accuracy": PAPER_PREDICTION_ACCURACY,
        "runs": runs,
    }


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def summarize(mode: str, fraction: float, report: dict, ids: list[list[int]], exact: list[list[int]] | None,
              seconds: list[float]) -> dict[str, Any]:
    tokens = sum(map(len, ids))
    return {
        "mode": mode,
        "resident_fraction": fraction,
        "degrade": report["degrade"],
        "tokens": tokens,
        "seconds_median": statistics.median(seconds),
        "tokens_per_s": tokens / statistics.median(seconds),
        **prediction_counters(report),
        "agreement_with_exact": None if exact is None else agreement(ids, exact),
    }


def prediction_counters(report: dict) -> dict[str, Any]:
    """What a run's DAOP report says of prediction, pre-computation and degradation."""
    totals = report["totals"]
    precomputed = totals["precomputed_used"] + totals["precomputed_rejected"] + totals["precomputed_wasted"]
    return {
        "prediction_accuracy": _ratio(totals["predictions_correct"], totals["predictions"]),
        "prediction_accuracy_per_layer": [_ratio(layer["predictions_correct"], layer["predictions"])
                                          for layer in report["layers"]],
        # of the decode rows' CPU expert work, the share served by pre-computed results
        "precomputed_share": _ratio(totals["precomputed_used"], totals["decode_cpu_expert_tokens"]),
        "wasted_share": _ratio(totals["precomputed_wasted"], precomputed),
        "rejected_share": _ratio(totals["precomputed_rejected"], precomputed),  # by the staleness gate
        "degraded_rows": totals["degraded"],
        "decode_cpu_share": _ratio(totals["decode_cpu_expert_tokens"],
                                   totals["decode_cpu_expert_tokens"] + totals["decode_device_expert_tokens"]),
    }


def agreement(ids: list[list[int]], reference: list[list[int]]) -> float:
    """Share of the reference's tokens that `ids` repeats at the same position."""
    return sum(a == b for x, y in zip(ids, reference) for a, b in zip(x, y)) / sum(map(len, reference))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    modes = list(dict.fromkeys(r["mode"] for r in runs))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        fractions = [r["resident_fraction"] for r in mine]
        axes[0].plot(fractions, [r["tokens_per_s"] for r in mine], marker="o", label=mode)
        if mode != "exact":
            axes[1].plot(fractions, [100 * (r["precomputed_share"] or 0) for r in mine], marker="o",
                         label=f"{mode}: pre-computed share")
            axes[1].plot(fractions, [100 * (r["wasted_share"] or 0) for r in mine], marker="x", linestyle="--",
                         label=f"{mode}: wasted share")
    axes[0].set(xlabel="resident fraction", ylabel="tokens/s (median)", title="throughput per mode")
    axes[1].set(xlabel="resident fraction", ylabel="%", title="decode CPU expert work pre-computed / wasted")
    predicted = [r for r in runs if r["mode"] != "exact" and r["prediction_accuracy"] is not None]
    if predicted:
        plot_prediction_accuracy(axes[2], min(predicted, key=lambda r: (r["resident_fraction"] != 0.25,
                                                                        r["mode"] != "daop")))
    finish_figure(fig, axes, f"{Path(result['model']).name}, {result['dtype']}, {result['num_prompts']} prompts x "
                             f"{result['max_tokens']} tokens (random weights)", path)


def plot_prediction_accuracy(ax, run: dict[str, Any]) -> None:
    """Per-layer prediction accuracy of one run, against the paper's figure for Mixtral."""
    layers = [i for i, a in enumerate(run["prediction_accuracy_per_layer"]) if a is not None]
    ax.bar(layers, [100 * run["prediction_accuracy_per_layer"][i] for i in layers], label="this model")
    ax.axhline(100 * PAPER_PREDICTION_ACCURACY, color="k", linestyle=":", label="paper (Mixtral)")
    ax.set(xlabel="layer", ylabel="% correct", ylim=(0, 100),
           title=f"prediction accuracy ({run['mode']}, fraction {run['resident_fraction']})")


def finish_figure(fig, axes, title: str, path: Path) -> None:
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)

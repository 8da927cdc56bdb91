"""`daop-vllm eval quality --tolerance T ...`: the curve of `staleness_tolerance` - perplexity over
`exact` against the share of decode CPU expert work taken pre-computed - for `verified` and
`daop` at each resident fraction, through vLLM on the trained model (no greedy agreement: the
sweep is many runs). With a routing trace, each point also gets the tokens/s the simulator gives
for the share of pre-computed results the gate kept (Mixtral shape, `a6000` preset, realloc
auto, the point's fraction).

One engine per mode, re-placed for each fraction; the tolerance changes between runs by RPC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daop_vllm.bench.modes import prediction_counters
from daop_vllm.bench.quality import engine_starter, forced_perplexity, held_out_passages, stop

# (mode, degrade) swept: verified; daop without and with substitution (as `eval quality`).
SWEPT = (("verified", False), ("daop", False), ("daop", True))
SIMULATED_POLICY = {"verified": "auto-verified", "daop": "auto-daop"}
SIMULATED_HARDWARE = "a6000"


def run(model_dirs: list[Path], fractions: list[float], tolerances: list[float | None], num_passages: int,
        prompt_len: int, forced_len: int, first_predicted_layer: int, dtype: str = "float32",
        simulate_trace: Path | None = None) -> dict[str, Any]:
    """Every model's curve; `tolerances`: None is the ungated mode (today's results)."""
    from tqdm import tqdm

    progress = tqdm(total=len(model_dirs) * len(fractions) * (1 + len(SWEPT) * len(tolerances)), desc="eval quality",
                    unit="run")
    points, models = [], {}
    for model_dir in model_dirs:
        exact_perplexity = _model_points(model_dir, fractions, tolerances, num_passages, prompt_len, forced_len,
                                         first_predicted_layer, dtype, points, progress)
        models[Path(model_dir).name] = {"path": str(model_dir),
                                        "exact_perplexity": {str(f): p for f, p in exact_perplexity.items()}}
    progress.close()
    result = {"models": models, "dtype": dtype, "passages": num_passages, "prompt_tokens": prompt_len,
              "scored_tokens": num_passages * forced_len, "first_predicted_layer": first_predicted_layer,
              "points": points}
    if simulate_trace is not None:
        result["simulated"] = _simulate_points(points, simulate_trace)
    return result


def _model_points(model_dir: Path, fractions: list[float], tolerances: list[float | None], num_passages: int,
                  prompt_len: int, forced_len: int, first_predicted_layer: int, dtype: str, points: list,
                  progress) -> dict[float, float]:
    """One model's points, appended to `points`; returns its exact perplexity per fraction."""
    scored = held_out_passages(model_dir, num_passages, prompt_len + forced_len)
    start = engine_starter(model_dir, dtype, prompt_len + forced_len, num_passages)
    exact_perplexity: dict[float, float] = {}
    llm = start(load_format="daop", model_loader_extra_config={"resident_fraction": fractions[0], "realloc": "off"})
    try:
        for fraction in fractions:
            llm.collective_rpc("daop_place_fraction", args=(fraction,))
            exact_perplexity[fraction] = forced_perplexity(llm, scored, prompt_len)
            progress.update()
    finally:
        stop(llm)
    for mode, degrade in SWEPT:
        llm = start(load_format="daop", model_loader_extra_config={
            "resident_fraction": fractions[0], "mode": mode, "realloc": "off",
            "first_predicted_layer": first_predicted_layer, "degrade": degrade})
        try:
            for fraction in fractions:
                llm.collective_rpc("daop_place_fraction", args=(fraction,))
                for tolerance in tolerances:
                    llm.collective_rpc("daop_set_staleness_tolerance", args=(tolerance,))
                    llm.collective_rpc("daop_reset_counters")
                    perplexity = forced_perplexity(llm, scored, prompt_len)
                    counters = prediction_counters(llm.collective_rpc("daop_report")[0])
                    rejected = counters["rejected_share"]
                    points.append({
                        "model": Path(model_dir).name, "mode": mode, "degrade": degrade, "resident_fraction": fraction,
                        "tolerance": tolerance, "perplexity": perplexity,
                        "perplexity_over_exact": perplexity / exact_perplexity[fraction],
                        "precomputed_share": counters["precomputed_share"],
                        "kept_share": None if rejected is None else 1 - rejected,
                        "prediction_accuracy": counters["prediction_accuracy"],
                        "decode_cpu_share": counters["decode_cpu_share"],
                    })
                    progress.update()
        finally:
            stop(llm)
    return exact_perplexity


def _simulate_points(points: list[dict[str, Any]], trace: Path) -> dict[str, Any]:
    """Each point's simulated tokens/s at the share of pre-computed results its gate kept."""
    from daop_vllm.bench.simulation import MIXTRAL_ARGS
    from daop_vllm.core.hardware import load_hardware
    from daop_vllm.offline.model_shapes import model_shape
    from daop_vllm.offline.simulator import simulate
    from daop_vllm.offline.traces import read_traces

    sequences, shape = list(read_traces(trace)), model_shape("mixtral-8x7b")
    hardware = load_hardware(SIMULATED_HARDWARE)
    cache: dict[tuple, dict] = {}
    for point in points:
        kept = 1.0 if point["kept_share"] is None else point["kept_share"]
        key = (point["mode"], point["degrade"], point["resident_fraction"], round(kept, 4))
        if key not in cache:
            policy = SIMULATED_POLICY[point["mode"]]
            cache[key] = simulate(sequences, [policy], shape, hardware, point["resident_fraction"],
                                  precomputed_kept=kept, degrades=point["degrade"],
                                  **MIXTRAL_ARGS)["policies"][policy]
        point["simulated_tokens_per_s"] = cache[key]["tokens_per_s"]
        point["simulated_precomputed_share"] = cache[key]["precomputed_share"]
    exact = {f: simulate(sequences, ["auto-exact"], shape, hardware, f, **MIXTRAL_ARGS)["policies"]["auto-exact"]
             for f in sorted({p["resident_fraction"] for p in points})}
    return {"trace": trace.name, "model_shape": shape.name, "hardware": SIMULATED_HARDWARE,
            "policies": SIMULATED_POLICY, **MIXTRAL_ARGS,
            "exact_tokens_per_s": {str(f): r["tokens_per_s"] for f, r in exact.items()}}


def label(point: dict[str, Any]) -> str:
    mode = "verified" if point["mode"] == "verified" else f"daop, degrade {'on' if point['degrade'] else 'off'}"
    return f"{mode}, {100 * point['resident_fraction']:g}% resident"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["models"])
    simulated = "simulated" in result
    fig, axes = plt.subplots(len(models), 2 if simulated else 1, figsize=(13 if simulated else 7, 4.6 * len(models)),
                             squeeze=False)
    for row, model in zip(axes, models):
        _plot_model(result, model, row, simulated)
    fig.suptitle(f"staleness_tolerance: {result['scored_tokens']} held-out tokens scored per run, first predicted "
                 f"layer {result['first_predicted_layer']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_model(result: dict[str, Any], model: str, axes, simulated: bool) -> None:
    points = [p for p in result["points"] if p["model"] == model]
    quality = axes[0]
    for name in dict.fromkeys(map(label, points)):
        mine = [p for p in points if label(p) == name and p["precomputed_share"] is not None]
        line, = quality.plot([100 * p["precomputed_share"] for p in mine],
                             [100 * (p["perplexity_over_exact"] - 1) for p in mine], marker="o", label=name)
        for p in mine:
            quality.annotate("off" if p["tolerance"] is None else f"{p['tolerance']:g}",
                             (100 * p["precomputed_share"], 100 * (p["perplexity_over_exact"] - 1)),
                             fontsize=6, color=line.get_color(), xytext=(3, 2), textcoords="offset points")
        if simulated:
            axes[1].plot([100 * p["precomputed_share"] for p in mine], [p["simulated_tokens_per_s"] for p in mine],
                         marker="o", label=name, color=line.get_color())
    for limit, name in ((1, "verified goal"), (5, "daop goal")):
        quality.axhline(limit, color="k", linestyle=":", linewidth=0.8)
        quality.annotate(name, (0.01, limit), xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    quality.axvline(20, color="k", linestyle=":", linewidth=0.8)
    quality.set(xlabel="% of decode CPU expert work taken pre-computed", ylabel="% perplexity above exact",
                title=f"{model}: tolerance (labels), accuracy against pre-computed work")
    if simulated:
        sim = result["simulated"]
        for fraction, speed in sim["exact_tokens_per_s"].items():
            axes[1].axhline(speed, color="k", linestyle="--", linewidth=0.8)
            axes[1].annotate(f"auto-exact, {100 * float(fraction):g}% resident", (0.01, speed),
                             xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
        axes[1].set(xlabel="% of decode CPU expert work taken pre-computed (measured)", ylabel="tokens/s",
                    title=f"simulated: {sim['model_shape']} on {sim['hardware']} at the share the gate kept")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)

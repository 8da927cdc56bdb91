"""`daop-vllm eval quality`: what each mode costs in accuracy, on the trained model of
`daop-vllm build-model shakespeare-moe`, through vLLM.

Perplexity is measured on decode rows (the only rows DAOP approximates): each held-out passage
is a short prompt followed by forced continuation tokens (vllm_adapter.forced_tokens). Agreement
is the share of greedy tokens equal to `exact`'s at the same resident fraction, position by
position. Prediction and pre-computation counters come from the perplexity runs.

With expert formats (`--format`), what quantized experts cost instead: `exact` mode with each
`expert_format`, once (exact mode gives the same tokens at every fraction), against the model as
loaded (stock vLLM): perplexity over its perplexity, and greedy agreement with its tokens.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from daop_vllm.bench.modes import (
    agreement,
    finish_figure,
    plot_prediction_accuracy,
    prediction_counters,
)
from daop_vllm.offline.simulator import PAPER_PREDICTION_ACCURACY

# (mode, degrade): exact; verified (stale inputs only); daop without and with substitution.
CONFIGS = (("exact", None), ("verified", False), ("daop", False), ("daop", True))


def held_out_passages(model_dir: Path, count: int, length: int) -> list[list[int]]:
    """`count` windows of `length` tokens, evenly spread over the held-out works."""
    from transformers import AutoTokenizer

    from daop_vllm.cli.corpus import load_corpus

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids: list[int] = []
    for text in load_corpus().held_out.values():
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    stride = (len(ids) - length) // count
    return [ids[i * stride: i * stride + length] for i in range(count)]


def forced_perplexity(llm, passages: list[list[int]], prompt_len: int) -> float:
    """exp(mean negative log-likelihood) of every passage token after the first `prompt_len`."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    requests = [TokensPrompt(prompt_token_ids=p[:prompt_len]) for p in passages]
    params = [SamplingParams(temperature=0.0, max_tokens=len(p) - prompt_len, ignore_eos=True, logprobs=0,
                             extra_args={"forced_tokens": p[prompt_len:]}) for p in passages]
    outputs = llm.generate(requests, params, use_tqdm=False)
    nll, count = 0.0, 0
    for passage, output in zip(passages, outputs):
        completion = output.outputs[0]
        assert list(completion.token_ids) == passage[prompt_len:], "forced decoding went off the passage"
        nll -= sum(step[token].logprob for step, token in zip(completion.logprobs, completion.token_ids))
        count += len(completion.token_ids)
    return math.exp(nll / count)


def greedy_continuations(llm, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                           SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def engine_starter(model_dir: Path, dtype: str, max_model_len: int, max_num_seqs: int):
    """A function starting this evaluation's vLLM engine (in-process, forced decoding) with
    extra engine arguments."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    from daop_vllm.vllm_adapter.forced_tokens import ForcedTokens

    engine_args = {"model": str(model_dir), "dtype": dtype, "max_model_len": max_model_len,
                   "max_num_seqs": max_num_seqs, "enforce_eager": True, "seed": 0,
                   "gpu_memory_utilization": 0.5, "logits_processors": [ForcedTokens]}
    return lambda **kwargs: LLM(**engine_args, **kwargs)


def stop(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def run(model_dir: Path, fractions: list[float], num_passages: int, prompt_len: int, forced_len: int,
        num_prompts: int, max_tokens: int, first_predicted_layer: int,
        formats: list[str] | None = None, dtype: str = "float32") -> dict[str, Any]:
    """One engine per configuration, re-placed for each fraction; a stock engine first for the
    model's own perplexity. With `formats`, one `exact` engine per expert format instead.
    `dtype`: the engines' (vLLM's --dtype)."""
    from tqdm import tqdm

    passages = held_out_passages(model_dir, num_passages + num_prompts, prompt_len + forced_len)
    scored, prompts = passages[:num_passages], [p[:prompt_len] for p in passages[num_passages:]]
    start = engine_starter(model_dir, dtype, prompt_len + max(forced_len, max_tokens), max(num_passages, num_prompts))
    stock = start()
    moe_perplexity = forced_perplexity(stock, scored, prompt_len)
    stock_ids = greedy_continuations(stock, prompts, max_tokens) if formats else None
    stop(stock)
    settings = {
        "model": str(model_dir), "dtype": dtype, "dense_perplexity": None, "moe_perplexity": moe_perplexity,
        "scored_tokens": num_passages * forced_len, "passages": num_passages, "prompt_tokens": prompt_len,
        "agreement_prompts": num_prompts, "agreement_tokens": max_tokens,
    }
    if formats:
        runs = [_format_run(start, fmt, fractions[0], scored, prompts, prompt_len, max_tokens, moe_perplexity,
                            stock_ids) for fmt in tqdm(formats, desc="eval quality", unit="run")]
        return {**settings, "formats": formats, "runs": runs}
    runs, exact_ids, exact_perplexity = [], {}, {}
    progress = tqdm(total=len(CONFIGS) * len(fractions), desc="eval quality", unit="run")
    for mode, degrade in CONFIGS:
        extra: dict[str, Any] = {"resident_fraction": fractions[0], "mode": mode, "realloc": "off"}
        if mode != "exact":
            extra.update(first_predicted_layer=first_predicted_layer, degrade=degrade)
        llm = start(load_format="daop", model_loader_extra_config=extra)
        try:
            for fraction in fractions:
                llm.collective_rpc("daop_place_fraction", args=(fraction,))
                llm.collective_rpc("daop_reset_counters")
                perplexity = forced_perplexity(llm, scored, prompt_len)
                report = llm.collective_rpc("daop_report")[0]
                ids = greedy_continuations(llm, prompts, max_tokens)
                if mode == "exact":  # CONFIGS starts with exact: every later run compares with it
                    exact_ids[fraction], exact_perplexity[fraction] = ids, perplexity
                counters = prediction_counters(report)
                del counters["wasted_share"], counters["rejected_share"]  # not in this result's schema (#12)
                runs.append({
                    "mode": mode, "format": report["expert_format"], "degrade": report["degrade"],
                    "resident_fraction": fraction,
                    "perplexity": perplexity, "perplexity_over_exact": perplexity / exact_perplexity[fraction],
                    "agreement": agreement(ids, exact_ids[fraction]), **counters,
                })
                progress.update()
        finally:
            stop(llm)
    progress.close()
    return {**settings, "first_predicted_layer": first_predicted_layer,
            "paper_prediction_accuracy": PAPER_PREDICTION_ACCURACY, "runs": runs}


def _format_run(start, fmt: str, fraction: float, scored, prompts, prompt_len: int, max_tokens: int,
                moe_perplexity: float, stock_ids: list[list[int]]) -> dict[str, Any]:
    llm = start(load_format="daop", model_loader_extra_config={"resident_fraction": fraction, "realloc": "off",
                                                                "expert_format": fmt})
    try:
        perplexity = forced_perplexity(llm, scored, prompt_len)
        ids = greedy_continuations(llm, prompts, max_tokens)
        report = llm.collective_rpc("daop_report")[0]
    finally:
        stop(llm)
    return {"mode": "exact", "format": fmt, "resident_fraction": fraction, "perplexity": perplexity,
            "perplexity_over_bf16": perplexity / moe_perplexity, "agreement": agreement(ids, stock_ids),
            "host_expert_bytes": report["host_expert_bytes"]}


def _label(run: dict[str, Any]) -> str:
    return run["mode"] if run["mode"] in ("exact", "verified") else f"daop, degrade {'on' if run['degrade'] else 'off'}"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    if "formats" in result:
        _plot_formats(result, path, plt)
        return
    labels = list(dict.fromkeys(_label(r) for r in runs))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for label in labels:
        mine = [r for r in runs if _label(r) == label]
        fractions = [r["resident_fraction"] for r in mine]
        axes[0].plot(fractions, [100 * (r["perplexity_over_exact"] - 1) for r in mine], marker="o", label=label)
        axes[1].plot(fractions, [100 * r["agreement"] for r in mine], marker="o", label=label)
    for limit, name in ((1, "verified goal"), (5, "daop goal")):
        axes[0].axhline(limit, color="k", linestyle=":", linewidth=0.8)
        axes[0].annotate(name, (min(r["resident_fraction"] for r in runs), limit), fontsize=7, va="bottom")
    axes[0].set(xlabel="resident fraction", ylabel="% above exact", title="held-out perplexity (decode rows)")
    axes[1].set(xlabel="resident fraction", ylabel="% of greedy tokens equal to exact's", title="greedy agreement")
    predicted = [r for r in runs if r["mode"] == "daop" and r["degrade"] and r["prediction_accuracy"] is not None]
    if predicted:
        plot_prediction_accuracy(axes[2], min(predicted, key=lambda r: r["resident_fraction"]))
    finish_figure(fig, axes, f"{Path(result['model']).name}: {result['scored_tokens']} held-out tokens scored, "
                             f"{result['agreement_prompts']} prompts x {result['agreement_tokens']} greedy tokens", path)


def _plot_formats(result: dict[str, Any], path: Path, plt) -> None:
    runs = result["runs"]
    fig, (ppl, agree) = plt.subplots(1, 2, figsize=(9, 3.8))
    names = [r["format"] for r in runs]
    ppl.bar(names, [100 * (r["perplexity_over_bf16"] - 1) for r in runs])
    for limit, fmt in ((0.5, "int8"), (3, "int4")):
        ppl.axhline(limit, color="k", linestyle=":", linewidth=0.8)
        ppl.annotate(f"{fmt} goal", (0, limit), fontsize=7, va="bottom")
    ppl.set(ylabel="% above the loaded model's", title="held-out perplexity (decode rows)")
    agree.bar(names, [100 * r["agreement"] for r in runs])
    agree.set(ylabel="% of greedy tokens equal to the loaded model's", title="greedy agreement", ylim=(0, 100))
    fig.suptitle(f"{Path(result['model']).name}, exact mode, experts stored as: {result['scored_tokens']} "
                 f"held-out tokens, {result['agreement_prompts']} prompts x {result['agreement_tokens']} tokens",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)

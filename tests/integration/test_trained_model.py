"""The trained model of `daop-vllm build-model` at its tiny recipe (seconds of training), and the
quality evaluation of the modes on it: the same code paths as the demo model and
`daop-vllm eval quality`, at a size CI can afford."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from daop_vllm.cli.trained_model import (
    RECIPES,
    SHIPPED_MODEL_DIR,
    build_trained_model,
    is_build_of,
    reproduce_first_steps,
)

from .engines import max_difference, prompt_logprobs, running_llm, transformers_logprobs

TINY = RECIPES["shakespeare-moe-tiny"]
SMALL = RECIPES["shakespeare-moe-small"]
RESULTS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "results")


def card(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "daop_model_card.json")) as f:
        return json.load(f)


def test_checkpoint_is_a_mixtral_of_the_recipe_shape(trained_tiny):
    from safetensors import safe_open

    with open(os.path.join(trained_tiny, "config.json")) as f:
        config = json.load(f)
    shape = TINY.shape
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert (config["num_hidden_layers"], config["num_local_experts"], config["num_experts_per_tok"],
            config["hidden_size"], config["intermediate_size"], config["vocab_size"]) == \
        (shape.num_layers, shape.num_experts, shape.top_k, shape.hidden_size, shape.intermediate_size,
         shape.vocab_size)
    assert not config.get("output_router_logits"), "training-only setting left in the checkpoint"
    with safe_open(os.path.join(trained_tiny, "model.safetensors"), "pt") as f:
        names = f.keys()
        params = sum(math.prod(f.get_slice(name).get_shape()) for name in names)
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    head_dim = h // shape.num_heads
    attention = h * h * 2 + 2 * h * shape.num_kv_heads * head_dim
    per_layer = attention + shape.num_experts * 3 * h * i + shape.num_experts * h + 2 * h
    assert params == shape.num_layers * per_layer + 2 * v * h + h


def test_every_recipe_is_in_the_shared_shape_table():
    from daop_vllm.offline.model_shapes import model_shape

    for name, spec in RECIPES.items():
        shape = model_shape(name)
        assert (shape.num_layers, shape.num_experts, shape.top_k, shape.hidden_size, shape.intermediate_size) == \
            (spec.shape.num_layers, spec.shape.num_experts, spec.shape.top_k, spec.shape.hidden_size,
             spec.shape.intermediate_size)


def test_training_lowers_the_loss_and_keeps_every_expert_in_use(trained_tiny):
    info = card(trained_tiny)
    assert info["loss_last_10"] < info["loss_first_10"] - 1.0, info["loss_curve"]
    assert info["held_out_perplexity"] < math.exp(info["loss_first_10"]) / 4
    assert set(info["held_out_works"]) == {"macbeth", "twelfth_night"}
    for layer, shares in enumerate(info["expert_shares"]):
        assert len(shares) == TINY.shape.num_experts
        assert min(shares) > 0, f"layer {layer}: an expert got no held-out token: {shares}"
        assert abs(sum(shares) - 1) < 1e-3
    assert all(isinstance(text, str) and text for text in info["samples"].values())


def test_a_second_build_is_the_cached_one(trained_tiny):
    before = os.path.getmtime(os.path.join(trained_tiny, "model.safetensors"))
    assert str(build_trained_model(TINY.name, trained_tiny, progress=False)) == trained_tiny
    assert os.path.getmtime(os.path.join(trained_tiny, "model.safetensors")) == before


@pytest.mark.vllm
def test_stock_vllm_and_transformers_agree_on_the_logits(trained_tiny):
    from daop_vllm.bench.quality import held_out_passages

    passages = held_out_passages(trained_tiny, 3, 64)
    with running_llm(trained_tiny) as llm:
        got = prompt_logprobs(llm, passages)
    assert max_difference(got, transformers_logprobs(trained_tiny, passages, torch.float32)) < 2e-3


@pytest.mark.vllm
def test_quality_eval_measures_every_mode(trained_tiny):
    from daop_vllm.bench.quality import CONFIGS, run

    fractions = [1, 0.25]
    result = run(trained_tiny, fractions, num_passages=4, prompt_len=16, forced_len=48, num_prompts=3, max_tokens=24,
                 first_predicted_layer=1)
    runs = {(r["mode"], r["degrade"], r["resident_fraction"]): r for r in result["runs"]}
    assert len(runs) == len(CONFIGS) * len(fractions)
    assert 1 < result["moe_perplexity"] < TINY.shape.vocab_size
    for fraction in fractions:
        exact = runs[("exact", False, fraction)]
        assert exact["perplexity"] == pytest.approx(result["moe_perplexity"], rel=1e-4), "exact is the model"
        assert exact["agreement"] == 1 and exact["prediction_accuracy"] is None
        for mode, degrade in (("verified", False), ("daop", False), ("daop", True)):
            r = runs[(mode, degrade, fraction)]
            assert 0 < r["prediction_accuracy"] <= 1 and len(r["prediction_accuracy_per_layer"]) == 2
            assert r["prediction_accuracy_per_layer"][0] is None, "layer 0 is never predicted"
            assert 0 <= r["agreement"] <= 1 and r["perplexity"] > 1
    # with every expert on the device nothing is pre-computed: verified is exact there
    assert runs[("verified", False, 1)]["perplexity"] == pytest.approx(result["moe_perplexity"], rel=1e-4)
    assert runs[("verified", False, 1)]["agreement"] == 1
    assert runs[("verified", False, 0.25)]["precomputed_share"] > 0
    assert runs[("daop", True, 0.25)]["degraded_rows"] > 0
    assert {r["format"] for r in result["runs"]} == {"bf16"}


def test_quality_eval_measures_expert_formats(trained_tiny):
    """--format: exact mode per expert format against the model as loaded (int4 needs sizes
    that are multiples of 128, which the tiny recipe's hidden size 64 is not)."""
    from daop_vllm.bench.quality import run

    result = run(trained_tiny, [1], num_passages=4, prompt_len=16, forced_len=48, num_prompts=3, max_tokens=24,
                 first_predicted_layer=1, formats=["bf16", "int8"])
    bf16, int8 = result["runs"]
    assert (bf16["format"], int8["format"]) == ("bf16", "int8") and bf16["mode"] == int8["mode"] == "exact"
    assert bf16["perplexity"] == pytest.approx(result["moe_perplexity"], rel=1e-4) and bf16["agreement"] == 1
    assert bf16["perplexity_over_bf16"] == pytest.approx(1, rel=1e-4)
    assert int8["perplexity_over_bf16"] == pytest.approx(int8["perplexity"] / result["moe_perplexity"])
    assert 0.95 < int8["perplexity_over_bf16"] < 1.05 and 0 <= int8["agreement"] <= 1
    assert int8["host_expert_bytes"] < bf16["host_expert_bytes"] / 3  # fp32 as loaded: 4 bytes a weight, 1 now


@pytest.mark.vllm
def test_tolerance_sweep_spans_exact_to_the_ungated_mode(trained_tiny):
    from daop_vllm.bench.quality_tolerance import SWEPT, run

    result = run([trained_tiny], [0.25], [0.0, 0.05, None], num_passages=4, prompt_len=16, forced_len=48,
                 first_predicted_layer=1)
    points = {(p["mode"], p["degrade"], p["tolerance"]): p for p in result["points"]}
    assert len(points) == len(SWEPT) * 3
    assert set(result["models"]) == {Path(trained_tiny).name} == {p["model"] for p in result["points"]}
    for mode, degrade in SWEPT:
        zero, ungated = points[(mode, degrade, 0.0)], points[(mode, degrade, None)]
        assert zero["perplexity_over_exact"] == pytest.approx(1, rel=1e-4), "tolerance 0 is exact"
        assert zero["precomputed_share"] == 0 and zero["kept_share"] == 0
        assert ungated["kept_share"] == 1 and ungated["precomputed_share"] > 0
        assert 0 <= points[(mode, degrade, 0.05)]["kept_share"] <= 1
        assert set(zero) >= {"model", "mode", "resident_fraction", "tolerance", "perplexity_over_exact",
                             "precomputed_share"}


def test_tolerance_sweep_simulates_each_point_at_the_share_its_gate_kept():
    from daop_vllm.bench.quality_tolerance import _simulate_points

    from ..shared_traces import trace_path

    points = [{"mode": "verified", "degrade": False, "resident_fraction": 0.25, "kept_share": kept}
              for kept in (0.0, 0.5, None)]
    simulated = _simulate_points(points, trace_path("mixtral-8x7b-vllm.jsonl.gz"))
    shares = [p["simulated_precomputed_share"] for p in points]
    assert shares[0] == 0 < shares[1] < shares[2]
    speeds = [p["simulated_tokens_per_s"] for p in points]
    assert speeds[0] < speeds[1] < speeds[2]
    assert set(simulated["exact_tokens_per_s"]) == {"0.25"}


def test_simulator_default_prediction_accuracy_is_the_measured_one():
    from daop_vllm.offline.model_shapes import model_shape

    result = json.loads((Path(__file__).parents[2] / "benchmarks/results/quality_shakespeare_moe.json").read_text())
    measured = next(r["prediction_accuracy"] for r in result["runs"]
                    if (r["mode"], r["degrade"], r["resident_fraction"]) == ("daop", True, 0.25))
    assert model_shape("shakespeare-moe").prediction_accuracy == pytest.approx(measured, abs=5e-4)


def test_the_shipped_demo_model_is_the_recipes_build_and_small():
    assert is_build_of(SHIPPED_MODEL_DIR, SMALL), "the recipe changed: re-train it (build-model shakespeare-moe-small)"
    assert str(build_trained_model(SMALL.name)) == str(SHIPPED_MODEL_DIR), "the demo would train"
    size = sum(f.stat().st_size for f in SHIPPED_MODEL_DIR.iterdir())
    assert size <= 20e6, f"{size / 1e6:.1f} MB"


def test_the_shipped_demo_model_predicts_held_out_text_as_well_as_shakespeare_moe():
    small = card(str(SHIPPED_MODEL_DIR))
    with open(os.path.join(RESULTS, "shakespeare_moe_card.json")) as f:
        large = json.load(f)
    # the same tokenizer (corpus, vocabulary) and windows: the perplexities are over the same tokens
    for key in ("corpus", "seq_len", "eval_windows", "train_chars"):
        assert small["recipe"][key] == large["recipe"][key], key
    assert small["recipe"]["shape"]["vocab_size"] == large["recipe"]["shape"]["vocab_size"]
    assert small["held_out_tokens"] == large["held_out_tokens"]
    assert small["held_out_perplexity"] <= large["held_out_perplexity"]


def test_the_shipped_weights_are_the_ones_the_card_measured():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from daop_vllm.cli.corpus import load_corpus
    from daop_vllm.cli.trained_model import evaluate, token_stream

    model = AutoModelForCausalLM.from_pretrained(SHIPPED_MODEL_DIR, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED_MODEL_DIR)
    held_out = token_stream(tokenizer, list(load_corpus().held_out.values()))
    quality = evaluate(model.eval(), SMALL, held_out)
    assert quality["held_out_perplexity"] == pytest.approx(card(str(SHIPPED_MODEL_DIR))["held_out_perplexity"],
                                                           rel=1e-3)


def test_the_recipe_still_reproduces_the_shipped_model(tmp_path):
    losses = reproduce_first_steps(SMALL.name, 30, tmp_path)
    curve = card(str(SHIPPED_MODEL_DIR))["loss_curve"]  # means of 10 steps
    got = [sum(losses[i:i + 10]) / 10 for i in range(0, 30, 10)]
    assert got == pytest.approx(curve[:3], rel=0.01), (got, curve[:3])


@pytest.mark.parametrize("args, words", [
    (["--tolerance", "0.1", "--format", "int8"], "--tolerance and --format"),
    (["--simulate-trace", "trace.jsonl.gz"], "--simulate-trace applies to --tolerance only"),
    (["--tolerance", "0.1", "--simulate-trace", "missing.jsonl.gz"], "missing.jsonl.gz: no such file"),
    (["--model", "shakespeare-moe", "shakespeare-moe-deep"], "several --model apply to --tolerance only"),
    (["--model", "no-such-model"], "not a recipe (shakespeare-moe,"),
])
def test_eval_quality_refuses_wrong_arguments_in_one_line(args, words, tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "daop_vllm.cli", "eval", "quality", *args], capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert words in result.stderr

"""Quantized experts through vLLM: `exact` mode with `expert_format` int8 or int4 gives, at every
resident fraction, the greedy tokens of stock vLLM on the same model with its experts replaced by
their dequantised weights (fp32 activations); the report names the format and its bytes."""

import re
import shutil

import pytest
from safetensors.torch import load_file, save_file

from daop_vllm.cli.model_builder import TinyMixtralShape, build_tiny_mixtral
from daop_vllm.core.quantized_experts import dequantize, quantize

from .engines import close_llm, greedy_ids, make_llm, running_llm, runs_at_fractions

SHAPE = TinyMixtralShape(num_layers=3, num_experts=8, top_k=2, hidden_size=128, intermediate_size=128, num_heads=2,
                         num_kv_heads=2)
EXPERT_WEIGHT = re.compile(r"\.experts\.\d+\.w[123]\.weight$")


def dequantised_copy(model, out, fmt):
    """`model`'s checkpoint with every expert matrix replaced by dequantize(quantize(.)): per row
    (int8) and per group of the row (int4) alike, whether the rows are fused or not."""
    shutil.copytree(model, out)
    for path in out.glob("*.safetensors"):
        tensors = load_file(path)
        replaced = {name: dequantize(quantize(t, fmt), t.dtype) if EXPERT_WEIGHT.search(name) else t
                    for name, t in tensors.items()}
        assert sum(EXPERT_WEIGHT.search(name) is not None for name in tensors) == 3 * 8 * 3
        save_file(replaced, path, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_tiny_mixtral(tmp_path_factory.mktemp("q-mixtral"), SHAPE, init_std=0.2)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_exact_matches_stock_on_the_dequantised_checkpoint(model, tmp_path, fmt):
    stock = make_llm(str(dequantised_copy(model, tmp_path / "dequantised", fmt)), enforce_eager=True)
    expected = greedy_ids(stock)
    close_llm(stock)
    plain = make_llm(str(model), enforce_eager=True)
    assert greedy_ids(plain) != expected, "the format changes the model: the comparison can fail"
    close_llm(plain)
    with running_llm(str(model), enforce_eager=True, load_format="daop",
                     model_loader_extra_config={"resident_fraction": 0.25, "realloc": "off",
                                                "expert_format": fmt}) as llm:
        for fraction, ids, report in runs_at_fractions(llm, [0.25, 1, 0.5, 0]):
            assert ids == expected, f"fraction {fraction}"
            assert report["expert_format"] == fmt
            assert report["device_path"].startswith("torch") or "vLLM's CPU fused-MoE" not in report["device_path"]
            totals = report["totals"]
            assert (totals["cpu_expert_tokens"] == 0) == (fraction == 1)
        # fp32 weights of 4 bytes become 1 (int8, and a fp32 scale per row) or 0.5 (int4, and a
        # bf16 scale per 128 of a row)
        weights, rows = 3 * SHAPE.hidden_size * SHAPE.intermediate_size, 2 * SHAPE.intermediate_size + SHAPE.hidden_size
        per_expert = weights + 4 * rows if fmt == "int8" else weights // 2 + 2 * weights // 128
        assert report["host_expert_bytes"] == 3 * 8 * per_expert

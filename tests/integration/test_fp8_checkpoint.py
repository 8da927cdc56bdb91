"""FP8 checkpoints (`build-model random --quantize fp8`: routed experts in e4m3, blocks of 128 x
128 with a scale each, as DeepSeek-V3 and Qwen3 publish them): `daop` keeps the experts in fp8 in
host memory and computes them there, and gives, at every resident fraction, what stock vLLM gives
on the same checkpoint with its experts dequantised (exact in bf16: the builder's scales are
powers of two). vLLM computes FP8 models in bf16, so the comparison is of log-probabilities
within bf16's noise, against a control that shows the fp8 rounding is far outside it."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from daop_vllm.cli.model_builder import EXPERT_WEIGHT, TinyMixtralShape, build_tiny_mixtral
from daop_vllm.core.quantized_experts import dequantize, from_checkpoint_fp8

from .engines import PROMPTS, max_difference, prompt_logprobs, running_llm, runs_at_fractions
from .test_deepseek import BF16_LOGPROB_TOLERANCE

SHAPE = TinyMixtralShape(num_layers=3, num_experts=8, top_k=2, hidden_size=128, intermediate_size=256, num_heads=2,
                         num_kv_heads=2)
BF16 = dict(dtype="bfloat16", enforce_eager=True)


def dequantised_copy(model, out):
    """The FP8 checkpoint as an unquantized one: each expert matrix its dequantised values (fp32),
    no scales, no quantization_config."""
    shutil.copytree(model, out)
    for path in out.glob("*.safetensors"):
        tensors = load_file(path)
        replaced = {name: dequantize(from_checkpoint_fp8(t, tensors[name + "_scale_inv"])) if EXPERT_WEIGHT.search(name)
                    else t for name, t in tensors.items() if not name.endswith("_scale_inv")}
        assert sum(EXPERT_WEIGHT.search(name) is not None for name in replaced) == 3 * 8 * 3
        save_file(replaced, path, metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(the FP8 checkpoint, the same with dequantised experts, the same model before quantization)."""
    fp8 = build_tiny_mixtral(tmp_path_factory.mktemp("fp8"), SHAPE, init_std=0.2, quantize_experts="fp8")
    plain = build_tiny_mixtral(tmp_path_factory.mktemp("plain"), SHAPE, init_std=0.2)
    return fp8, dequantised_copy(fp8, tmp_path_factory.mktemp("dequantised") / "model"), plain


def test_the_checkpoint_is_written_as_fp8_checkpoints_are(models):
    fp8, _, _ = models
    config = json.loads((fp8 / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fp8" and config["weight_block_size"] == [128, 128]
    assert "model.layers.0.self_attn.q_proj" in config["ignored_layers"]
    tensors = load_file(fp8 / "model.safetensors")
    w1 = "model.layers.1.block_sparse_moe.experts.5.w1.weight"
    assert str(tensors[w1].dtype) == "torch.float8_e4m3fn" and tensors[w1 + "_scale_inv"].shape == (2, 1)
    assert str(tensors["model.layers.1.self_attn.q_proj.weight"].dtype) == "torch.bfloat16"


def test_daop_serves_fp8_experts_as_stock_serves_them_dequantised(models):
    fp8, dequantised, plain = models
    tokenizer = AutoTokenizer.from_pretrained(str(fp8))
    prompts = [tokenizer(prompt).input_ids for prompt in PROMPTS[:4]]
    with running_llm(str(dequantised), **BF16) as stock:
        expected = prompt_logprobs(stock, prompts)
    with running_llm(str(plain), **BF16) as unquantized:
        control = max_difference(prompt_logprobs(unquantized, prompts), expected)
    assert control > 2 * BF16_LOGPROB_TOLERANCE, "fp8's rounding is outside bf16's noise: the comparison can fail"
    with running_llm(str(fp8), **BF16, load_format="daop",
                     model_loader_extra_config={"resident_fraction": 0.25, "realloc": "off"}) as llm:
        first_ids = None
        for fraction, ids, report in runs_at_fractions(llm, [0.25, 1, 0.5, 0]):
            got = prompt_logprobs(llm, prompts)
            assert max_difference(got, expected) < BF16_LOGPROB_TOLERANCE, f"fraction {fraction}"
            first_ids = first_ids or ids
            assert ids == first_ids, f"fraction {fraction}: the placement changes no token"
            assert report["expert_format"] == "fp8"
            assert (report["totals"]["cpu_expert_tokens"] == 0) == (fraction == 1)
        # 1 byte a weight, 4 per block of 128 x 128 for its scale; nothing of the experts in bf16
        weights = 3 * SHAPE.hidden_size * SHAPE.intermediate_size
        assert report["host_expert_bytes"] == 3 * 8 * (weights + 4 * weights // 128**2)

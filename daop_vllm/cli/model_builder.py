"""Build small Mixtral-format checkpoints locally (no downloads), for tests and the demo.

Random weights: the model says nothing about accuracy, but it exercises every code path of
the real Mixtral architecture in vLLM. The tokenizer is a byte-level BPE trained here on a
few sentences, so that text prompts work end to end.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from daop_vllm.core.quantized_experts import FP8_BLOCK, quantize

_TOKENIZER_CORPUS = [
    "Mixture-of-Experts models route every token to a few experts out of many.",
    "The experts that do not fit in accelerator memory live in host memory,",
    "and the processor computes the tokens routed to them instead of copying weights.",
    "After a prefill the device slots are filled with the experts the sequence uses.",
    "During decode the next layer's experts are predicted from the current hidden state.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.",
    "Once upon a time there was a small model that wanted to serve many requests at once.",
    "One, two, three, four, five, six, seven, eight, nine, ten: numbers count tokens.",
    "What is the capital of France? Paris is the capital and largest city of France.",
    "Write a short poem about the sea, the wind, the rain and the mountains far away.",
]


@dataclass(frozen=True)
class TinyMixtralShape:
    """Shape of a generated checkpoint; head_dim 32 is the smallest vLLM's CPU attention takes."""

    num_layers: int = 4
    num_experts: int = 8
    top_k: int = 2
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 2
    num_kv_heads: int = 1
    vocab_size: int = 512
    max_positions: int = 1024


def build_tokenizer(out_dir: Path, vocab_size: int, corpus: list[str] | None = None):
    """Train a byte-level BPE on `corpus` (default: a few built-in sentences), save it in Hugging
    Face format and return it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", "</s>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus or _TOKENIZER_CORPUS * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    wrapped.save_pretrained(str(out_dir))
    return wrapped


FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "phimoe", "deepseek_v2", "deepseek_v3")


def family_config(family: str, shape: TinyMixtralShape, init_std: float):
    """(config, model class) of a small checkpoint of one MoE family, from `transformers`."""
    common = dict(vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
                  intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
                  num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                  num_experts_per_tok=shape.top_k, max_position_embeddings=shape.max_positions,
                  initializer_range=init_std, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "mixtral":
        from transformers import MixtralConfig, MixtralForCausalLM

        return MixtralConfig(num_local_experts=shape.num_experts, **common), MixtralForCausalLM
    if family == "olmoe":
        from transformers import OlmoeConfig, OlmoeForCausalLM

        return OlmoeConfig(num_experts=shape.num_experts, norm_topk_prob=False, pad_token_id=0, **common), \
            OlmoeForCausalLM
    if family == "qwen2_moe":
        from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

        del common["intermediate_size"]
        return Qwen2MoeConfig(num_experts=shape.num_experts, moe_intermediate_size=shape.intermediate_size,
                              intermediate_size=2 * shape.intermediate_size,
                              shared_expert_intermediate_size=2 * shape.intermediate_size, decoder_sparse_step=1,
                              norm_topk_prob=False, **common), Qwen2MoeForCausalLM
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        del common["intermediate_size"]
        return Qwen3MoeConfig(num_experts=shape.num_experts, moe_intermediate_size=shape.intermediate_size,
                              intermediate_size=2 * shape.intermediate_size, decoder_sparse_step=1,
                              head_dim=shape.hidden_size // shape.num_heads, norm_topk_prob=True, **common), \
            Qwen3MoeForCausalLM
    if family == "phimoe":
        from transformers import PhimoeConfig, PhimoeForCausalLM

        # vLLM's PhiMoE always has q/k/v/o and lm_head biases (real checkpoints do); transformers'
        # defaults leave them out, and vLLM then runs with uninitialised biases (only token 0).
        return PhimoeConfig(num_local_experts=shape.num_experts, attention_bias=True, lm_head_bias=True,
                            pad_token_id=0, **common), PhimoeForCausalLM
    # DeepSeek: top-k within the best 2 of 4 expert groups where the shape allows it (V3 ranks
    # groups by their two best experts)
    grouped = shape.num_experts % 4 == 0 and shape.num_experts >= 8 and shape.top_k <= shape.num_experts // 2
    if family == "deepseek_v2":
        from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

        # DeepSeek-V2-Lite's attention (MLA without a query projection, latent 512 + rope 64: the
        # only head size vLLM's CPU MLA kernels take), one dense layer first, two shared experts
        del common["intermediate_size"]
        return DeepseekV2Config(n_routed_experts=shape.num_experts, moe_intermediate_size=shape.intermediate_size,
                                intermediate_size=2 * shape.intermediate_size, n_shared_experts=2,
                                first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128,
                                qk_rope_head_dim=64, v_head_dim=128,
                                topk_method="group_limited_greedy" if grouped else "greedy",
                                n_group=4 if grouped else 1, topk_group=2 if grouped else 1, norm_topk_prob=False,
                                routed_scaling_factor=1.0, **common), DeepseekV2ForCausalLM
    if family == "deepseek_v3":
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

        # DeepSeek-V3's routing as its config.json gives it (transformers' config names neither
        # topk_method nor scoring_func; vLLM reads both): sigmoid scores plus a per-expert bias for
        # the choice, grouped as above, renormalised, scaled by 2.5; its query LoRA; otherwise the
        # attention and layout of the V2 model above
        del common["intermediate_size"]
        return DeepseekV3Config(n_routed_experts=shape.num_experts, moe_intermediate_size=shape.intermediate_size,
                                intermediate_size=2 * shape.intermediate_size, n_shared_experts=1,
                                first_k_dense_replace=1, q_lora_rank=shape.hidden_size, kv_lora_rank=512,
                                qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                                n_group=4 if grouped else 1, topk_group=2 if grouped else 1,
                                topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True,
                                routed_scaling_factor=2.5, **common), DeepseekV3ForCausalLM
    raise ValueError(f"unknown MoE family {family!r}; known: {', '.join(FAMILIES)}")


# A routed expert's weight in the families' checkpoints (shared experts are not routed)
EXPERT_WEIGHT = re.compile(r"\.experts\.\d+\.(w[123]|gate_proj|up_proj|down_proj)\.weight$")


def build_tiny_mixtral(
    out_dir: str | Path,
    shape: TinyMixtralShape = TinyMixtralShape(),
    seed: int = 0,
    init_std: float = 0.1,
    family: str = "mixtral",
    quantize_experts: str | None = None,
) -> Path:
    """Write config, safetensors weights and tokenizer of a random MoE model (Mixtral, or
    another family of FAMILIES in the same small shape) to `out_dir`; with `quantize_experts`
    "fp8", its routed experts as an FP8 block-quantized checkpoint holds them (fp8_checkpoint).

    `init_std` is larger than Mixtral's 0.02 so that greedy decoding has clear winners:
    comparisons between two implementations then do not hinge on near-ties of logits.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config, model_class = family_config(family, shape, init_std)
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    for module in model.modules():  # DeepSeek-V3's router bias: zeros when built, learned in real checkpoints
        if isinstance(getattr(module, "e_score_correction_bias", None), torch.Tensor):
            module.e_score_correction_bias.normal_(0, init_std)
    model.save_pretrained(str(out), safe_serialization=True)
    if family == "phimoe":  # transformers saves "PhimoeForCausalLM"; real checkpoints and vLLM say:
        config_path = out / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                           "architectures": ["PhiMoEForCausalLM"]}, indent=2))
    if quantize_experts == "fp8":
        fp8_checkpoint(out)
    elif quantize_experts is not None:
        raise ValueError(f"checkpoints quantize their experts as fp8 only, not {quantize_experts!r}")
    build_tokenizer(out, shape.vocab_size)
    (out / "daop_model_card.json").write_text(
        json.dumps({"builder": "daop_vllm.cli.model_builder", "family": family, "seed": seed,
                    "quantize_experts": quantize_experts, **shape.__dict__})
    )
    return out


def fp8_checkpoint(model_dir: Path) -> None:
    """Rewrite the checkpoint in `model_dir` the way DeepSeek-V3's and Qwen3's FP8 checkpoints are
    written, for its routed experts: each expert matrix as float8 e4m3 values in blocks of 128 x
    128 and a `weight_scale_inv` per block (quantized_experts' fp8), `quantization_config` with
    `weight_block_size` [128, 128] and dynamic activation scales, the model in bf16. Every other
    linear layer is left unquantized and named in `ignored_layers` (vLLM's FP8 linear kernels on
    the CPU need AMX)."""
    from safetensors.torch import load_file, save_file

    ignored = []
    for path in model_dir.glob("*.safetensors"):
        tensors = {}
        for name, tensor in load_file(path).items():
            if EXPERT_WEIGHT.search(name):
                quantized = quantize(tensor, "fp8")
                tensors[name] = quantized.data.view(torch.float8_e4m3fn)
                tensors[name.removesuffix("weight") + "weight_scale_inv"] = quantized.scales
            else:
                tensors[name] = tensor.to(torch.bfloat16)
                if tensor.dim() == 2:
                    ignored.append(name.removesuffix(".weight"))
        save_file(tensors, path, metadata={"format": "pt"})
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = "bfloat16"
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": [FP8_BLOCK, FP8_BLOCK], "ignored_layers": sorted(ignored)}
    config_path.write_text(json.dumps(config, indent=2))

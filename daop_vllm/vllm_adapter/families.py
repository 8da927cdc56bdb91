"""The MoE families DAOP serves, and how each is recognised in a Hugging Face config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from daop_vllm.core.errors import DaopConfigError

# Attributes through which Hugging Face configs of MoE models give the routed-expert count.
_EXPERT_COUNT_ATTRS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class MoEFamily:
    """One supported architecture: where vLLM builds its MoE layers, and its config's names."""

    architecture: str
    model_module: str  # the vLLM module whose FusedMoEFactory the loader replaces
    num_experts_attr: str
    top_k_attr: str
    gate_attr: str = "gate"  # the router's module, beside the experts in the MoE block
    dense_layers_attr: str | None = None  # config attribute: how many dense MLP layers come first
    moe_layer_step_attr: str | None = None  # config attribute: after those, every n-th layer is MoE

    def expert_sizes(self, hf_config: Any) -> tuple[int, int]:
        """(hidden size, an expert's intermediate size): the families with a dense MLP beside
        their experts name the experts' own `moe_intermediate_size`."""
        return hf_config.hidden_size, getattr(hf_config, "moe_intermediate_size", None) or hf_config.intermediate_size

    def shape(self, hf_config: Any) -> tuple[int, int, int]:
        """(MoE layers, routed experts per layer, top-k)."""
        dense = getattr(hf_config, self.dense_layers_attr, 0) if self.dense_layers_attr else 0
        step = getattr(hf_config, self.moe_layer_step_attr, 1) if self.moe_layer_step_attr else 1
        return (
            sum(1 for layer in range(dense, hf_config.num_hidden_layers) if layer % step == 0),
            getattr(hf_config, self.num_experts_attr),
            getattr(hf_config, self.top_k_attr),
        )


SUPPORTED_FAMILIES = {
    family.architecture: family
    for family in (
        MoEFamily(
            architecture="MixtralForCausalLM",
            model_module="vllm.model_executor.models.mixtral",
            num_experts_attr="num_local_experts",
            top_k_attr="num_experts_per_tok",
        ),
        # 64 experts, top-8, softmax without renormalisation (the factory passes renormalize=False)
        MoEFamily(
            architecture="OlmoeForCausalLM",
            model_module="vllm.model_executor.models.olmoe",
            num_experts_attr="num_experts",
            top_k_attr="num_experts_per_tok",
        ),
        # the paper's second model: 16 experts, top-2 by sparsemixer (vLLM's custom routing function)
        MoEFamily(
            architecture="PhiMoEForCausalLM",
            model_module="vllm.model_executor.models.phimoe",
            num_experts_attr="num_local_experts",
            top_k_attr="num_experts_per_tok",
        ),
        # top-k of many small experts plus a gated shared expert (kept on the device by vLLM's
        # own module, outside the budget)
        MoEFamily(
            architecture="Qwen2MoeForCausalLM",
            model_module="vllm.model_executor.models.qwen2_moe",
            num_experts_attr="num_experts",
            top_k_attr="num_experts_per_tok",
        ),
        # 128 small experts, top-8, no shared expert; the MoE layer computes the router logits
        # from the gate the block hands it
        MoEFamily(
            architecture="Qwen3MoeForCausalLM",
            model_module="vllm.model_executor.models.qwen3_moe",
            num_experts_attr="num_experts",
            top_k_attr="num_experts_per_tok",
        ),
        # DeepSeek-V2 (and -Lite): grouped top-k routing, shared experts kept on the device by vLLM's
        # own module, MLA attention, and dense MLPs in the first layers
        *(
            MoEFamily(
                architecture=architecture,
                model_module="vllm.model_executor.models.deepseek_v2",
                num_experts_attr="n_routed_experts",
                top_k_attr="num_experts_per_tok",
                dense_layers_attr="first_k_dense_replace",
                moe_layer_step_attr="moe_layer_freq",
            )
            # DeepSeek-V3 (and its fine-tunes, e.g. Kimi-K2): the same module, routing by sigmoid
            # scores with a per-expert bias on the choice
            for architecture in ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
        ),
    )
}


def family_for(architectures: list[str], hf_config: Any) -> MoEFamily:
    """The family of a model, or a DaopConfigError saying why it cannot be served."""
    for architecture in architectures:
        if architecture in SUPPORTED_FAMILIES:
            return SUPPORTED_FAMILIES[architecture]
    names = ", ".join(architectures) or "unknown"
    supported = ", ".join(SUPPORTED_FAMILIES)
    is_moe = any((getattr(hf_config, attr, None) or 0) > 1 for attr in _EXPERT_COUNT_ATTRS)
    if not is_moe:
        raise DaopConfigError(
            f"load_format 'daop' needs a Mixture-of-Experts model, and {names} is not an MoE model; "
            f"supported architectures: {supported}"
        )
    raise DaopConfigError(
        f"MoE architecture {names} is not supported by load_format 'daop' yet; supported: {supported}"
    )

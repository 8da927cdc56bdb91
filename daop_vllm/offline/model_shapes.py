"""Expert shapes of the MoE models the project talks about: one table for every command."""

from __future__ import annotations

from dataclasses import dataclass, replace

from daop_vllm.core.quantized_experts import bytes_per_weight


@dataclass(frozen=True)
class MoEShape:
    """L MoE layers of E routed experts (top-k), hidden size H, expert intermediate size I; shared
    experts (always on the device, outside any budget) of S intermediate rows in all."""

    name: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    # share of next-layer predictions that are right, measured on this model (`daop-vllm eval
    # quality`); the simulator's default for it, where known
    prediction_accuracy: float | None = None
    shared_intermediate_size: int = 0

    def expert_bytes(self, element_size: int = 2, expert_format: str = "bf16") -> int:
        """Bytes of one expert: `element_size` a weight as loaded, or as `expert_format` stores it."""
        return round(3 * self.hidden_size * self.intermediate_size * bytes_per_weight(expert_format, element_size))

    def shared_expert_bytes(self, element_size: int = 2) -> int:
        return 3 * self.hidden_size * self.shared_intermediate_size * element_size

    def tensor_parallel_rank(self, size: int) -> MoEShape:
        """One GPU's share under tensor parallelism over `size` GPUs: vLLM splits the intermediate
        rows of every routed and shared expert evenly across the ranks."""
        if size < 1:
            raise ValueError(f"the tensor parallel size must be >= 1, got {size}")
        for what, rows in (("expert", self.intermediate_size), ("shared experts'", self.shared_intermediate_size)):
            if rows % size:
                raise ValueError(f"tensor parallel size {size} does not divide {self.name}'s {what} intermediate "
                                 f"size {rows}: vLLM splits it evenly across the GPUs")
        return replace(self, intermediate_size=self.intermediate_size // size,
                       shared_intermediate_size=self.shared_intermediate_size // size)


MODEL_SHAPES = {
    shape.name: shape
    for shape in (
        MoEShape("mixtral-8x7b", 32, 8, 2, 4096, 14336),
        MoEShape("phi-3.5-moe", 32, 16, 2, 4096, 6400),
        MoEShape("deepseek-v2-lite", 26, 64, 6, 2048, 1408, shared_intermediate_size=2 * 1408),  # layer 0 is dense
        MoEShape("olmoe-1b-7b", 16, 64, 8, 2048, 1024),
        MoEShape("qwen1.5-moe-a2.7b", 24, 60, 4, 2048, 1408, shared_intermediate_size=5632),  # Qwen2MoeForCausalLM
        MoEShape("qwen3-30b-a3b", 48, 128, 8, 2048, 768),
        MoEShape("tiny-mixtral", 4, 8, 2, 64, 128),  # daop_vllm.cli.model_builder's default
        # daop_vllm.cli.trained_model's recipes (Shakespeare, trained here)
        MoEShape("shakespeare-moe", 6, 8, 2, 256, 512, prediction_accuracy=0.803),  # results/quality_shakespeare_moe.json
        MoEShape("shakespeare-moe-small", 6, 8, 2, 192, 256),  # the demo's
        MoEShape("shakespeare-moe-deep", 12, 8, 2, 128, 384),
        MoEShape("shakespeare-moe-tiny", 2, 8, 2, 64, 128),
    )
}


def model_shape(name: str) -> MoEShape:
    if name not in MODEL_SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(MODEL_SHAPES)}")
    return MODEL_SHAPES[name]

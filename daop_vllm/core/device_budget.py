"""How much device memory the experts may take, beside what vLLM needs for the rest: the KV
cache for the sequences it will run at once and the activations of its largest step.

vLLM sizes its KV cache after the model is loaded, from what the weights (our device experts
among them) and its profile run left under `gpu_memory_utilization`; if that leaves less than
one `max_model_len` sequence, it refuses to start. So the auto budget reserves both first.
"""

from __future__ import annotations

from dataclasses import dataclass

from daop_vllm.core.errors import DaopConfigError

# Tokens of KV cache reserved per sequence when `kv_reserve_tokens` is not given (capped by
# max_model_len): the cache still grows into whatever the experts leave, so this is a floor
# for concurrency, not a cap. vLLM's default max_num_seqs on an H200 is 1024: 1024 sequences of
# 512 tokens of Mixtral's KV (128 KiB a token in bf16) are 64 GiB.
DEFAULT_KV_RESERVE_TOKENS = 512
# Beside the activations: CUDA context, cuBLAS and Triton workspaces, allocator fragmentation.
WORKSPACE_BYTES = 1 << 30


@dataclass(frozen=True)
class DeviceMemory:
    free: int  # bytes free on the device now (after emptying torch's cache)
    total: int
    utilization: float  # vLLM's gpu_memory_utilization

    @property
    def allowed(self) -> int:
        """Bytes vLLM may still use: its share of the device, less what is in use now."""
        return int(self.utilization * self.total - (self.total - self.free))


@dataclass(frozen=True)
class KvReserve:
    sequences: int  # max_num_seqs
    tokens_per_sequence: int
    bytes_per_token: int  # all layers, in the KV cache's dtype
    min_tokens: int  # max_model_len: vLLM needs one whole sequence
    explicit_bytes: int | None = None  # vLLM's kv_cache_memory_bytes, where the user set it

    @property
    def tokens(self) -> int:
        return max(self.sequences * self.tokens_per_sequence, self.min_tokens)

    @property
    def bytes(self) -> int:
        return self.explicit_bytes if self.explicit_bytes is not None else self.tokens * self.bytes_per_token

    def explain(self) -> str:
        if self.explicit_bytes is not None:
            return f"KV reserve {self.bytes / 2**30:.2f} GiB (kv_cache_memory_bytes)"
        return (f"KV reserve {self.bytes / 2**30:.2f} GiB (max_num_seqs {self.sequences} x kv_reserve_tokens "
                f"{self.tokens_per_sequence}, at least max_model_len {self.min_tokens}: {self.tokens} tokens x "
                f"{self.bytes_per_token / 1024:.1f} KiB)")


def activation_peak_bytes(max_num_batched_tokens: int, hidden_size: int, element_size: int, max_num_seqs: int,
                          vocab_size: int) -> int:
    """An estimate of vLLM's profile run peak: a step of `max_num_batched_tokens` rows holds about
    a dozen hidden-sized activations at once (residual, norm, q/k/v and attention output, the MoE
    input and the fp32 sum of its experts), and the sampler fp32 logits, probabilities and a sorted
    copy for `max_num_seqs` rows."""
    step = max_num_batched_tokens * hidden_size * (12 * element_size + 4)
    sampler = 3 * max_num_seqs * vocab_size * 4
    return step + sampler + WORKSPACE_BYTES


@dataclass(frozen=True)
class AutoBudget:
    expert_bytes: int  # device bytes left for experts
    memory: DeviceMemory
    kv: KvReserve
    activation_bytes: int

    @classmethod
    def compute(cls, memory: DeviceMemory, kv: KvReserve, activation_bytes: int) -> AutoBudget:
        return cls(max(0, memory.allowed - kv.bytes - activation_bytes), memory, kv, activation_bytes)

    def explain(self) -> str:
        gib = 2**30
        return (f"{self.expert_bytes / gib:.2f} GiB for experts = {self.memory.allowed / gib:.2f} GiB allowed "
                f"(gpu_memory_utilization {self.memory.utilization} of {self.memory.total / gib:.1f} GiB, less "
                f"{(self.memory.total - self.memory.free) / gib:.2f} GiB in use) - {self.kv.explain()} - activations "
                f"{self.activation_bytes / gib:.2f} GiB (estimated from max_num_batched_tokens); lower max_num_seqs or "
                "kv_reserve_tokens for more resident experts")


def check_slot_growth(added_bytes: int, memory: DeviceMemory) -> None:
    """Slots allocated after vLLM sized its KV cache (a re-placement) must fit in what is left."""
    if added_bytes > memory.allowed:
        raise DaopConfigError(
            f"this placement needs {added_bytes / 2**30:.2f} GiB more device memory for expert slots, and "
            f"{max(0, memory.allowed) / 2**30:.2f} GiB are left under gpu_memory_utilization {memory.utilization} "
            "(vLLM sized its KV cache at start); place fewer experts, or start with more"
        )

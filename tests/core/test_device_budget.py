"""The auto budget's arithmetic: KV for the sequences vLLM will run at once and its largest
step's activations are kept before the experts get the rest."""

import pytest

from daop_vllm.core.device_budget import (
    WORKSPACE_BYTES,
    AutoBudget,
    DeviceMemory,
    KvReserve,
    activation_peak_bytes,
    check_slot_growth,
)
from daop_vllm.core.errors import DaopConfigError

GIB = 2**30
MIXTRAL_KV_PER_TOKEN = 2 * 32 * 8 * 128 * 2  # K and V, 32 layers, 8 KV heads of 128, bf16


def test_kv_is_reserved_for_every_sequence_not_one_long_one():
    kv = KvReserve(sequences=256, tokens_per_sequence=512, bytes_per_token=MIXTRAL_KV_PER_TOKEN, min_tokens=4096)
    assert kv.tokens == 256 * 512 and kv.bytes == 256 * 512 * MIXTRAL_KV_PER_TOKEN  # 16 GiB
    few = KvReserve(sequences=2, tokens_per_sequence=512, bytes_per_token=MIXTRAL_KV_PER_TOKEN, min_tokens=4096)
    assert few.tokens == 4096, "vLLM refuses to start without room for one max_model_len sequence"
    fixed = KvReserve(8, 512, MIXTRAL_KV_PER_TOKEN, 4096, explicit_bytes=3 * GIB)
    assert fixed.bytes == 3 * GIB and "kv_cache_memory_bytes" in fixed.explain()


def test_the_kv_cache_dtype_sets_the_bytes():
    bf16 = KvReserve(64, 1024, MIXTRAL_KV_PER_TOKEN, 32768)
    fp8 = KvReserve(64, 1024, MIXTRAL_KV_PER_TOKEN // 2, 32768)
    assert fp8.bytes * 2 == bf16.bytes


def test_experts_get_what_is_left_and_the_log_says_why():
    memory = DeviceMemory(free=130 * GIB, total=140 * GIB, utilization=0.9)
    assert memory.allowed == int(0.9 * 140 * GIB - 10 * GIB)
    kv = KvReserve(256, 512, MIXTRAL_KV_PER_TOKEN, 32768)
    activations = activation_peak_bytes(8192, 4096, 2, 256, 32000)
    assert activations > WORKSPACE_BYTES + 8192 * 4096 * 2 * 12
    budget = AutoBudget.compute(memory, kv, activations)
    assert budget.expert_bytes == memory.allowed - kv.bytes - activations
    text = budget.explain()
    for figure in ("max_num_seqs 256", "kv_reserve_tokens 512", "gpu_memory_utilization 0.9", "activations"):
        assert figure in text
    starved = AutoBudget.compute(memory, KvReserve(4096, 32768, MIXTRAL_KV_PER_TOKEN, 32768), activations)
    assert starved.expert_bytes == 0


def test_the_activation_estimate_grows_with_the_step_and_the_sampler():
    base = activation_peak_bytes(2048, 4096, 2, 64, 32000)
    assert activation_peak_bytes(4096, 4096, 2, 64, 32000) > base
    assert activation_peak_bytes(2048, 4096, 2, 1024, 32000) > base


def test_slots_added_after_start_must_fit():
    memory = DeviceMemory(free=10 * GIB, total=100 * GIB, utilization=0.92)  # 2 GiB left under the share
    check_slot_growth(GIB, memory)
    with pytest.raises(DaopConfigError, match="needs 3.00 GiB more device memory for expert slots"):
        check_slot_growth(3 * GIB, memory)

"""Wrong input fails with DaopConfigError naming what was wrong, before any weight loads."""

import json
from pathlib import Path

import pytest

from daop_vllm.core.errors import DaopConfigError

from .engines import make_llm


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory) -> str:
    from transformers import LlamaConfig

    path = tmp_path_factory.mktemp("dense")
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, architectures=["LlamaForCausalLM"])
    config.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def unsupported_moe(tmp_path_factory) -> str:
    from transformers import GraniteMoeConfig

    path = tmp_path_factory.mktemp("granitemoe")
    config = GraniteMoeConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, num_local_experts=8,
                              num_experts_per_tok=2, architectures=["GraniteMoeForCausalLM"])
    config.save_pretrained(path)
    return str(path)


def expect_config_error(model: str, extra, *words: str, **engine_args) -> None:
    with pytest.raises(DaopConfigError) as info:
        make_llm(model, load_format="daop", model_loader_extra_config=extra, enforce_eager=True,
                 skip_tokenizer_init=True, **engine_args)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"resident_fraction": 0.5, "resident_experts": 2}, ["'resident_experts' and 'resident_fraction'"]),
        ({"cache_ratio": 0.5}, ["unknown daop option 'cache_ratio'", "accepted keys"]),
        ({"resident_fraction": "0.5"}, ["'resident_fraction'", "number in [0, 1]"]),
        ({"resident_fraction": 2}, ["'resident_fraction'", "got 2"]),
        ({"resident_experts": 9}, ["'resident_experts'", "0 <= n <= 8", "got 9"]),
        ({"mode": "fast"}, ["'mode'", '"exact"']),
        ({"cpu_threads": -1}, ["'cpu_threads'"]),
        ({"profile": "/nonexistent/profile.json"}, ["'profile'", "does not exist"]),
        ({"expert_format": "int3"}, ["'expert_format'", '"bf16", "int8", "int4"', "got 'int3'"]),
        # tiny_mixtral's hidden size is 64: int4's groups of 128 along the input do not fit
        ({"expert_format": "int4"}, ["int4 experts (daop option 'expert_format')", "multiples of 128; got 64"]),
        ({"expert_format": "int8", "device_expert_format": "bf16"},
         ["'device_expert_format' 'bf16' needs a device with its own memory", "drop device_expert_format"]),
    ],
)
def test_bad_options(tiny_mixtral, extra, words):
    expect_config_error(tiny_mixtral, extra, *words)


def test_malformed_profile(tiny_mixtral, tmp_path):
    bad = tmp_path / "profile.json"
    bad.write_text(json.dumps([[0, 1], [99, 0]]))
    expect_config_error(tiny_mixtral, {"profile": str(bad)}, "'profile'", "[99, 0]", "0 <= layer < 4")


def test_dense_model_is_not_moe(dense_model):
    expect_config_error(dense_model, {}, "LlamaForCausalLM is not an MoE model", "MixtralForCausalLM")


def test_unsupported_moe_architecture(unsupported_moe):
    expect_config_error(unsupported_moe, {}, "GraniteMoeForCausalLM is not supported", "MixtralForCausalLM",
                        "Qwen3MoeForCausalLM")


def with_quantization_config(tiny_mixtral, directory, quantization_config) -> str:
    """tiny_mixtral's config with `quantization_config` (the weights are not read)."""
    config = json.loads((Path(tiny_mixtral) / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config))
    return str(directory)


DEEPSEEK_V3_FP8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}


def test_fp8_checkpoints_other_than_128_blocks_are_refused_before_the_engine_starts(tiny_mixtral, tmp_path):
    """Per-tensor FP8 (as Mixtral's published FP8 checkpoints): vLLM's CPU platform accepts the
    config, and without this check the worker failed building the model ("Engine core
    initialization failed")."""
    per_tensor = with_quantization_config(tiny_mixtral, tmp_path, {**DEEPSEEK_V3_FP8, "weight_block_size": None})
    expect_config_error(per_tensor, {}, "FP8 checkpoints with weight_block_size [128, 128]", "weight_block_size None",
                        dtype="bfloat16")  # fp8 checkpoints compute in bf16


def test_fp8_experts_are_not_quantized_again(tiny_mixtral, tmp_path):
    fp8 = with_quantization_config(tiny_mixtral, tmp_path, DEEPSEEK_V3_FP8)
    expect_config_error(fp8, {"expert_format": "int4"}, "experts are fp8 already", "'int4'", dtype="bfloat16")
    expect_config_error(fp8, {"device_expert_format": "int8"}, "experts are fp8 already",
                        "'device_expert_format' 'int8'", dtype="bfloat16")


def test_quantization_flag_points_at_expert_format(tiny_mixtral):
    expect_config_error(tiny_mixtral, {}, "--quantization fp8", '"expert_format": "fp8"',
                        quantization="fp8", dtype="bfloat16")


def test_vllm_experts_int8_points_at_expert_format(tiny_mixtral):
    expect_config_error(tiny_mixtral, {}, "--quantization experts_int8", '"expert_format": "int8"',
                        quantization="experts_int8", dtype="bfloat16")


def test_loader_in_the_worker_checks_too():
    """The worker builds the loader from the load config alone: options fail there as well."""
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    with pytest.raises(DaopConfigError, match="unknown daop option 'bogus'"):
        get_model_loader(LoadConfig(load_format="daop", model_loader_extra_config={"bogus": 1}))
    loader = get_model_loader(LoadConfig(load_format="daop", model_loader_extra_config={"resident_experts": 2}))
    assert loader.options.budget_value == 2


@pytest.mark.parametrize("mode", ["FULL_AND_PIECEWISE", "FULL", "FULL_DECODE_ONLY"])
def test_full_cuda_graphs_are_refused_naming_the_flags(mode):
    from daop_vllm.vllm_adapter.loader import DAOP_OP, check_cuda_graph_mode

    check_cuda_graph_mode("NONE", None)
    check_cuda_graph_mode("PIECEWISE", ["vllm::unified_attention", DAOP_OP])
    with pytest.raises(DaopConfigError) as info:
        check_cuda_graph_mode(mode, [DAOP_OP])
    message = str(info.value)
    assert mode in message and "--enforce-eager" in message and "cudagraph_mode=PIECEWISE" in message
    with pytest.raises(DaopConfigError, match="among the splitting ops"):
        check_cuda_graph_mode("PIECEWISE", ["vllm::unified_attention"])


def test_cuda_graphs_default_to_piecewise_split_at_the_daop_op():
    """The compilation config a CUDA machine would get (vLLM's own CompilationConfig and its own
    splitting-op defaults; nothing here can capture CUDA graphs): with no mode set, PIECEWISE,
    vLLM's attention ops kept and the DAOP op added; a mode the user set is left to the check."""
    from vllm.config import CompilationConfig, CompilationMode, CUDAGraphMode

    from daop_vllm.vllm_adapter.loader import (
        DAOP_OP,
        check_cuda_graph_mode,
        prefer_piecewise_cuda_graphs,
        split_at_daop_op,
    )

    config = CompilationConfig(mode=CompilationMode.VLLM_COMPILE)
    prefer_piecewise_cuda_graphs(config, enforce_eager=False)
    assert config.cudagraph_mode == CUDAGraphMode.PIECEWISE
    config.set_splitting_ops_for_v1(all2all_backend="allgather_reducescatter")  # what VllmConfig does
    split_at_daop_op(config)
    assert config.splitting_ops_contain_attention() and config.splitting_ops.count(DAOP_OP) == 1
    check_cuda_graph_mode(config.cudagraph_mode.name, config.splitting_ops)
    split_at_daop_op(config)
    assert config.splitting_ops.count(DAOP_OP) == 1, "added once"
    eager = CompilationConfig()
    prefer_piecewise_cuda_graphs(eager, enforce_eager=True)
    assert eager.cudagraph_mode is None
    full = CompilationConfig(cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    prefer_piecewise_cuda_graphs(full, enforce_eager=False)
    split_at_daop_op(full)
    assert full.cudagraph_mode == CUDAGraphMode.FULL_AND_PIECEWISE and not full.splitting_ops


def test_parallelism_other_than_tensor_is_refused_naming_the_setting(tiny_mixtral):
    """Pipeline parallelism fails in stock vLLM's CPU backend (so it cannot be tested here) and
    expert parallelism would move experts behind DAOP's placement: one line each, naming the
    setting. LLM() refuses data parallelism itself; `vllm serve --data-parallel-size` reaches
    the same check as its vLLM config."""
    from vllm.config import ParallelConfig

    from daop_vllm.vllm_adapter.loader import check_parallelism

    expect_config_error(tiny_mixtral, {}, "pipeline_parallel_size must be 1, got 2", "tensor_parallel_size",
                        pipeline_parallel_size=2)
    expect_config_error(tiny_mixtral, {}, "enable_expert_parallel must be off", enable_expert_parallel=True,
                        tensor_parallel_size=2)
    with pytest.raises(DaopConfigError, match=r"data_parallel_size must be 1, got 2; use tensor_parallel_size"):
        check_parallelism(ParallelConfig(data_parallel_size=2))


def test_experts_split_over_other_than_every_rank_are_refused():
    """A model whose MoE layers split their experts over fewer ranks than the engine runs: the
    factory would shard them over all of them, so it refuses, before adding a layer."""
    import torch

    from daop_vllm.core.engine import DaopEngine
    from daop_vllm.core.ranks import TensorParallelRank
    from daop_vllm.vllm_adapter.moe_layer import _make_factory

    engine = DaopEngine(torch.device("cpu"), cpu_threads=1, tensor_parallel=TensorParallelRank(0, 2, 2))
    try:
        factory = _make_factory(engine, vllm_config=None)
        with pytest.raises(DaopConfigError, match=r"tp_size=1 ranks and the engine runs 2"):
            factory(num_experts=8, top_k=2, hidden_size=64, intermediate_size=128, prefix="layers.0.experts",
                    tp_size=1)
        assert engine.layers == []
    finally:
        engine.close()

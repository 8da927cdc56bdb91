"""DAOP's reading of vLLM's settings, from real vLLM configs (no engine starts): the KV cache's
bytes per token for the auto budget, and the model runner DAOP's hooks need."""

import pytest

pytestmark = pytest.mark.vllm


def engine_config(model: str, **engine_args):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, dtype="float32", max_model_len=256, **engine_args).create_engine_config()


def test_kv_bytes_per_token_follow_the_kv_cache_dtype(tiny_mixtral):
    from transformers import AutoConfig

    from daop_vllm.vllm_adapter.loader import kv_bytes_per_token

    text = AutoConfig.from_pretrained(tiny_mixtral)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_element = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim
    sizes = {dtype: kv_bytes_per_token(engine_config(tiny_mixtral, kv_cache_dtype=dtype))
             for dtype in ("auto", "bfloat16", "fp8")}
    assert sizes == {"auto": 4 * per_element, "bfloat16": 2 * per_element, "fp8": per_element}


def test_a_config_that_forces_the_v2_model_runner_is_refused(tiny_mixtral):
    """A watermark config makes vLLM pick its V2 model runner whatever VLLM_USE_V2_MODEL_RUNNER
    says; there DAOP's step hooks would never run: refused in one line. (On this CPU, vLLM
    itself refuses V2 before DAOP sees the config, so the watermark is set on a built config.)"""
    from daop_vllm.core.errors import DaopConfigError
    from daop_vllm.vllm_adapter.loader import check_engine_config
    from daop_vllm.vllm_adapter.options import DaopOptions

    config = engine_config(tiny_mixtral)
    check_engine_config(DaopOptions.parse({}), config)
    object.__setattr__(config, "watermark_config", {"seed": 0})
    assert config.use_v2_model_runner
    with pytest.raises(DaopConfigError) as info:
        check_engine_config(DaopOptions.parse({}), config)
    message = str(info.value)
    assert "V1 model runner" in message and "VLLM_USE_V2_MODEL_RUNNER=0" in message and "\n" not in message

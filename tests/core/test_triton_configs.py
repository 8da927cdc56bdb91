"""Launch configurations from JSON, and what the Triton kernel supports (no Triton needed)."""

import json

import pytest
import torch

from daop_vllm.core.device_path import pick_device_forward
from daop_vllm.core.triton_configs import LaunchConfig, config_file_name, launch_config, supports


def test_a_swept_config_file_is_found_by_device_dtype_and_shape(tmp_path):
    swept = LaunchConfig(few_pairs_max=8, gemv_block_i=32, block_m=32, warps=8)
    name = config_file_name("cpu", torch.bfloat16, 8, 4096, 14336)
    assert name == "device=cpu,dtype=bfloat16,E=8,H=4096,I=14336.json"
    (tmp_path / name).write_text(json.dumps(swept.to_json()))
    assert launch_config(torch.device("cpu"), torch.bfloat16, 8, 4096, 14336, tmp_path) == swept
    # another dtype or shape: the defaults
    assert launch_config(torch.device("cpu"), torch.float16, 8, 4096, 14336, tmp_path) == LaunchConfig()
    assert launch_config(torch.device("cpu"), torch.bfloat16, 8, 4096, 1024, tmp_path) == LaunchConfig()


def test_a_config_file_with_unknown_keys_is_refused():
    with pytest.raises(ValueError, match=r"unknown launch config keys \['block_k'\]"):
        LaunchConfig.from_json({"block_k": 32})


def test_supports_names_why_not(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, reason = supports(torch.device("meta"))
    assert not ok and ("needs CUDA" in reason or "not installed" in reason)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, reason = supports(torch.device("meta"), torch.float64)
    assert not ok and ("float64" in reason or "not installed" in reason)


def test_the_device_path_names_its_fallback(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    forward, description = pick_device_forward(torch.device("meta"))
    assert description.startswith("torch reference on meta (") and description.endswith(")")

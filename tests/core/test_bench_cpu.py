"""`daop-vllm bench cpu-experts` produces its documented fields (a smoke run, not a timing)."""

import json
import subprocess
import sys

import pytest


def test_bench_cpu_experts_json(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "daop_vllm.cli", "bench", "cpu-experts", "--model-shape", "tiny-mixtral",
         "--tokens", "1", "4", "--repeats", "1", "--threads", "2", "--decode-steps", "1", "8", "--json",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["tokens"] == [1, 4] and printed["threads"] == 2 and printed["stream_read_gbps"] > 0
    for n in ("1", "4"):
        row = printed["per_tokens"][n]
        assert all(row[key] > 0 for key in ("executor_gbps", "executor_gflops", "torch_gbps", "torch_gflops"))
    first = printed["per_tokens"]["1"]
    assert first["stream_gbps"] > 0
    assert printed["decode_efficiency"] == first["executor_over_stream"] > 0
    steps = printed["decode_steps"]
    assert steps["batches"] == [1, 8] and steps["threads"] == 2
    one, eight = steps["per_batch"]["1"], steps["per_batch"]["8"]
    assert one["distinct_experts"] == 2 and 2 < eight["distinct_experts"] <= 8  # tiny-mixtral routes top-2 of 8
    for row in (one, eight):
        assert all(row[key] > 0 for key in ("whole_ms", "sliced_ms", "whole_gbps", "sliced_gbps", "stream_gbps"))
        assert row["executor_takes"] == "sliced"  # a handful of experts per thread
        assert row["executor_over_stream"] == pytest.approx(row["sliced_gbps"] / row["stream_gbps"])  # one pass


def test_bench_cpu_experts_formats_in_the_same_passes(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "daop_vllm.cli", "bench", "cpu-experts", "--model-shape", "tiny-mixtral",
         "--tokens", "1", "2", "--repeats", "1", "--threads", "2", "--format", "bf16", "int8", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(printed["formats"]) == {"bf16", "int8"}
    bf16, int8 = printed["formats"]["bf16"], printed["formats"]["int8"]
    # one byte a weight where bf16 has two, and a fp32 scale per row
    assert int8["expert_bytes"] == printed["expert_bytes"] // 2 + 4 * (2 * 128 + 64)
    assert printed["per_tokens"] == bf16["per_tokens"]
    for n in ("1", "2"):
        row, base = int8["per_tokens"][n], bf16["per_tokens"][n]
        assert row["executor_gbps"] > 0 and row["executor_over_bf16"] > 0 and base["executor_over_bf16"] == 1
        # the same flops over the time, the format's own bytes over the time
        assert row["executor_gflops"] / row["executor_gbps"] == pytest.approx(
            base["executor_gflops"] / base["executor_gbps"] * printed["expert_bytes"] / int8["expert_bytes"])


def test_bench_cpu_experts_refuses_int4_on_a_shape_it_cannot_group():
    result = subprocess.run(
        [sys.executable, "-m", "daop_vllm.cli", "bench", "cpu-experts", "--model-shape", "tiny-mixtral",
         "--format", "int4"], capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "daop-vllm: error: int4 tiny-mixtral experts need input sizes that are multiples of 128; got 64"]

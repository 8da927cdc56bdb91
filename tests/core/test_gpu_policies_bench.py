"""benchmarks/gpu/policies.py at a tiny size on the CPU, so that the GPU benchmark cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

from daop_vllm.offline.simulator import BASE_POLICIES

TINY_TRACE = Path(__file__).resolve().parents[1] / "data" / "tiny-mixtral.jsonl.gz"  # recorded by our own trace_path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu" / "policies.py"


def test_policies_benchmark_runs_every_policy_at_a_tiny_size(tmp_path):
    out = tmp_path / "policies.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--trace", str(TINY_TRACE),
         "--layers", "2", "--hidden", "64", "--intermediate", "128", "--steps", "2", "--batches", "1", "3",
         "--fractions", "0.25", "0.5", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=SCRIPT.parents[2],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["layers_run"] == 2 and report["scaled_to_layers"] == 32
    assert report["measured"]["cpu_executor_gbps"] > 0
    assert [(r["resident_fraction"], r["batch"]) for r in report["runs"]] == [(0.25, 1), (0.25, 3), (0.5, 1), (0.5, 3)]
    for run in report["runs"]:
        assert set(run["policies"]) == set(BASE_POLICIES)
        for name, r in run["policies"].items():
            assert r["tokens_per_s"] > 0 and r["h200_preset_tokens_per_s"] > 0, name
        assert run["policies"]["gpu"]["decode_hit_rate"] == 1
        assert run["policies"]["all-cpu"]["decode_hit_rate"] == 0
        assert run["policies"]["static"]["over_static"] == 1
        assert run["policies"]["daop"]["precomputed_used"] > 0


def test_policies_benchmark_profiles_each_policy(tmp_path):
    out, profiles = tmp_path / "policies.json", tmp_path / "profiles"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--trace", str(TINY_TRACE), "--layers", "2", "--hidden", "64",
         "--intermediate", "128", "--steps", "2", "--batches", "1", "--fractions", "0.5", "--policies", "gpu", "static",
         "--profile", str(profiles), "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=SCRIPT.parents[2],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    policies = json.loads(out.read_text())["runs"][0]["policies"]
    for name in ("gpu", "static"):
        profile = policies[name]["profile"]
        assert profile["step_ms"] > 0
        assert profile["device_busy_ms"] is None, "no device on the CPU: the split needs CUDA"
        table = (profiles / "fraction0.5" / f"{name}-batch1.txt").read_text()
        assert "Self CPU" in table and "aten::" in table, table[:500]


def test_policies_benchmark_times_prompts_with_and_without_streaming(tmp_path):
    out = tmp_path / "streaming.json"
    policies = ["static", "auto-exact", "auto-exact+stream", "stream-all", "ondemand"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--trace", str(TINY_TRACE), "--layers", "2", "--hidden", "64",
         "--intermediate", "128", "--steps", "2", "--batches", "2", "--fractions", "0.25", "--prompt-tokens", "16",
         "--policies", *policies, "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=SCRIPT.parents[2],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["runs"][0]["policies"]) == set(policies)
    [prompt] = report["prompts"]
    assert prompt["prompt_tokens"] == 16
    assert set(prompt["policies"]) == set(policies) - {"ondemand"}, "copying policies take no prompt timing"
    for name, r in prompt["policies"].items():
        assert r["time_to_first_token_s"] > 0 and r["h200_preset_time_to_first_token_s"] > 0, name
    # one memory here: only stream "all" streams (its bookkeeping), every host expert the prompt routes to
    assert prompt["policies"]["stream-all"]["prefill_streamed_experts"] > 0
    assert prompt["policies"]["auto-exact"]["prefill_streamed_experts"] == 0

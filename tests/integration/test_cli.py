"""The `vllm` command itself on this machine, and one-line errors for bad DAOP options."""

import json
import subprocess

import pytest

from daop_vllm.bench.server import VLLM

TIMEOUT_S = 180  # a vLLM import alone takes 10-20 s on a 2-core machine


def run_vllm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([VLLM, *args], capture_output=True, text=True, timeout=TIMEOUT_S)


def test_vllm_version_and_serve_help():
    version = run_vllm("--version")
    assert version.returncode == 0, version.stderr[-2000:]
    assert version.stdout.strip().splitlines()[-1] == "0.32.0"
    serve_help = run_vllm("serve", "--help")
    assert serve_help.returncode == 0, serve_help.stderr[-2000:]
    assert "vllm serve" in serve_help.stdout and "--help=" in serve_help.stdout
    load_help = run_vllm("serve", "--help=load-format")
    assert load_help.returncode == 0 and "--load-format" in load_help.stdout, load_help.stdout[-2000:]


@pytest.mark.parametrize(
    "extra, words",
    [
        (json.dumps({"cache_ratio": 0.5}), ["unknown daop option 'cache_ratio'", "resident_fraction"]),
        (json.dumps({"resident_fraction": 1.5}), ["'resident_fraction'", "[0, 1]", "1.5"]),
        (json.dumps({"resident_fraction": 0.5, "resident_experts": 2}), ["given together", "at most one"]),
        ("resident_fraction=0.5", ["not valid JSON", "JSON object"]),
        (json.dumps({"profile": "/nonexistent/profile.json"}), ["'profile'", "does not exist"]),
        (json.dumps({"resident_experts": 12}), ["'resident_experts'", "0 <= n <= 8", "12"]),
    ],
)
def test_bad_options_one_line_no_traceback(tiny_mixtral, extra, words):
    result = run_vllm("serve", tiny_mixtral, "--load-format", "daop", "--model-loader-extra-config", extra,
                      "--dtype", "float32", "--max-model-len", "256")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert "Traceback" not in output and "EngineCore" not in output
    errors = [line for line in result.stderr.splitlines() if line.startswith("vllm serve: error:")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0]

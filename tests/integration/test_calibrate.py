"""`daop-vllm calibrate --model --prompts`: prompts through vLLM with trace recording, to a profile."""

import json
import os
import subprocess
import sys


def test_calibrate_from_prompts(tiny_mixtral, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello world\nThe quick brown fox jumps over the lazy dog\n\nWhat is the capital of France?\n")
    out = tmp_path / "profile.json"
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "TMPDIR": str(temp)}
    result = subprocess.run([sys.executable, "-m", "daop_vllm.cli", "calibrate", "--model", tiny_mixtral,
                             "--prompts", str(prompts), "-o", str(out)], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 sequences -> 32 [layer, expert] pairs" in result.stdout
    pairs = [tuple(p) for p in json.loads(out.read_text())]
    assert sorted(pairs) == [(layer, expert) for layer in range(4) for expert in range(8)]
    assert not list(temp.glob("daop-calibrate-*")), "the recorded trace's directory is left behind"


def test_calibrate_model_needs_prompts(tiny_mixtral):
    result = subprocess.run([sys.executable, "-m", "daop_vllm.cli", "calibrate", "--model", tiny_mixtral, "-o", "x.json"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and "needs --prompts" in result.stderr and "Traceback" not in result.stderr

"""The demo end to end: the `daop-vllm` command, vLLM's default multi-process engine."""

import os
import re
import subprocess
import sys
from importlib.metadata import entry_points


def test_plugin_is_registered_through_entry_point():
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("daop") == "daop_vllm.vllm_adapter.plugin:register"


def test_demo_prints_text_placement_speed_and_cpu_share(trained_tiny):
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "daop_vllm.cli", "demo", "--model", "shakespeare-moe-tiny",
         "--model-dir", trained_tiny,
         "--resident-fraction", "0.25", "--num-prompts", "4", "--max-tokens", "8"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    # the demo's own lines only: vLLM's logs and progress bars go to a log file without --verbose
    logged = re.findall(r"^.*\b(?:INFO|WARNING) \d\d-\d\d .*$", result.stdout + result.stderr, re.M)
    assert not logged and not result.stderr.strip(), f"vLLM output reached the terminal: {logged[:3]}{result.stderr}"
    assert out.rstrip().splitlines()[-1].startswith("expert work on the CPU: "), "the last screen is the demo's"
    assert "resident_fraction=0.25" in out
    assert "realloc auto made" in out
    assert "shakespeare-moe-tiny, a Mixtral-format MoE trained on Shakespeare" in out
    assert "\n'ROMEO.\\n' -> '" in out, out
    for layer in range(2):
        assert re.search(rf"layer  {layer}: \[\d, \d\]  expert-tokens", out), out
    assert "4 prompts, 32 tokens in" in out and "tokens/s" in out
    share = float(out.split("expert work on the CPU: ")[1].split("%")[0])
    assert 0 < share < 100

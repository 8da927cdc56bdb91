"""`daop-vllm bench modes` at a tiny size, so that the benchmark cannot rot."""

import importlib.util
import json
import subprocess
import sys


def test_bench_modes_reports_every_mode_and_fraction(tiny_mixtral, tmp_path):
    plot = importlib.util.find_spec("matplotlib") is not None
    out = tmp_path / "modes.json"
    result = subprocess.run(
        [sys.executable, "-m", "daop_vllm.cli", "bench", "modes", "--model", tiny_mixtral, "--modes", "exact", "daop",
         "--fractions", "1", "0.25", "--repeats", "1", "--num-prompts", "3", "--max-tokens", "6", "--dtype", "float32",
         "--json", "--out", str(out), *(["--plot", str(tmp_path / "modes.png")] if plot else [])],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    runs = {(r["mode"], r["resident_fraction"]): r for r in printed["runs"]}
    assert set(runs) == {("exact", 1), ("exact", 0.25), ("daop", 1), ("daop", 0.25)}
    assert all(r["tokens"] == 18 and r["tokens_per_s"] > 0 for r in runs.values())
    assert runs["exact", 0.25]["tokens_per_s_over_exact"] == 1 and runs["exact", 1]["agreement_with_exact"] == 1
    daop = runs["daop", 0.25]
    assert 0 < daop["prediction_accuracy"] <= 1 and daop["prediction_accuracy_per_layer"][0] is None
    assert 0 < daop["precomputed_share"] <= 1 and daop["wasted_share"] == 0
    assert runs["exact", 0.25]["prediction_accuracy"] is None
    assert printed["command"].startswith("daop-vllm bench modes")
    if plot:
        assert (tmp_path / "modes.png").stat().st_size > 10_000

"""`daop-vllm bench vllm-serve`: vLLM's own client, `vllm bench serve`, against stock `vllm serve`
and `--load-format daop` at several settings: each server started and measured in turn, the
rounds interleaved (stock, then each daop setting, again), medians over the rounds and each
setting's output tokens/s as a ratio to stock's in the same round."""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from daop_vllm.bench.server import VLLM, vllm_server

# setting -> daop options (None: stock vLLM)
SETTINGS: dict[str, dict[str, Any] | None] = {
    "stock": None,
    "exact-1.0": {"resident_fraction": 1.0},
    "exact-0.5": {"resident_fraction": 0.5},
    "exact-0.25": {"resident_fraction": 0.25},
    "daop-0.25": {"resident_fraction": 0.25, "mode": "daop"},
}
SERVE_ARGS = ["--max-model-len", "512", "--max-num-seqs", "16", "--enforce-eager"]
CLIENT_ARGS = ["--backend", "vllm", "--dataset-name", "random", "--random-input-len", "64", "--random-output-len",
               "64", "--num-prompts", "96", "--max-concurrency", "8", "--ignore-eos", "--seed", "0"]
KEPT = ("completed", "failed", "output_throughput", "request_throughput", "median_tpot_ms", "median_ttft_ms",
        "total_output_tokens")


def client_command(base_url: str, model: str, result_dir: Path, name: str) -> list[str]:
    return [VLLM, "bench", "serve", "--base-url", base_url.removesuffix("/v1"), "--model", model, *CLIENT_ARGS,
            "--save-result", "--result-dir", str(result_dir), "--result-filename", f"{name}.json"]


def measure(model: str, name: str, options: dict[str, Any] | None, work_dir: Path) -> dict[str, Any]:
    extra = list(SERVE_ARGS)
    if options is not None:
        extra += ["--load-format", "daop", "--model-loader-extra-config", json.dumps(options)]
    with vllm_server(model, *extra, log_path=work_dir / f"{name}.server.log") as base_url:
        with open(work_dir / f"{name}.client.log", "w") as log:
            subprocess.run(client_command(base_url, model, work_dir, name), stdout=log, stderr=subprocess.STDOUT,
                           check=True, timeout=1800)
    result = json.loads((work_dir / f"{name}.json").read_text())
    return {key: result.get(key) for key in KEPT}


def run(model: str, rounds: int, settings: list[str], progress=None) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory(prefix="daop-vllm-bench-") as tmp:
        for round_index in range(rounds):
            for name in settings:
                runs[name].append(measure(model, f"{name}-{round_index}", SETTINGS[name], Path(tmp)))
                if progress is not None:
                    progress.update(1)
    summary = {}
    for name, results in runs.items():
        ratios = [r["output_throughput"] / s["output_throughput"] for r, s in zip(results, runs["stock"])]
        summary[name] = {
            "options": SETTINGS[name],
            "answered": [f"{r['completed']}/{r['completed'] + (r['failed'] or 0)}" for r in results],
            "output_tokens_per_s_median": statistics.median(r["output_throughput"] for r in results),
            "median_tpot_ms_median": statistics.median(r["median_tpot_ms"] for r in results),
            "over_stock_per_round": [round(x, 3) for x in ratios],
            "over_stock_median": round(statistics.median(ratios), 3),
            "runs": results,
        }
    return {"serve_args": SERVE_ARGS, "client_args": CLIENT_ARGS, "rounds": rounds, "settings": summary}

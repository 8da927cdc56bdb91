"""`daop-vllm bench serve`: many concurrent streaming clients against `vllm serve`, stock and
`--load-format daop` in the same run: every request answered, outputs compared, requests/s and
time per output token (p50, p99), and the servers' memory across the run."""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WORDS = ["expert", "token", "device", "memory", "route", "layer", "prefill", "decode", "batch", "cache"]


def load_requests(count: int, seed: int = 0) -> list[tuple[str, int]]:
    """(prompt, max_tokens) with mixed prompt lengths (2-60 words) and output lengths (1-40)."""
    import random

    rng = random.Random(seed)
    return [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 60))), rng.randint(1, 40))
            for _ in range(count)]


@dataclass
class Answer:
    text: str
    tokens: int
    seconds_per_output_token: float | None  # after the first token


def stream_one(client, model: str, prompt: str, max_tokens: int) -> Answer:
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    parts, times, tokens = [], [], 0
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].text)
            times.append(time.perf_counter())
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None
    return Answer("".join(parts), tokens, tpot)


def server_rss_bytes(pid: int) -> int:
    """Resident memory of a server and all its processes (engine core, workers)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_load(base_url: str, requests: list[tuple[str, int]], concurrency: int, server_pid: int,
             memory_samples: int = 2) -> dict[str, Any]:
    """All requests through `concurrency` streaming clients; the server's memory is sampled
    `memory_samples` times, evenly over the answers (the last when all are answered)."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    sample_at = {len(requests) * k // memory_samples for k in range(1, memory_samples)}
    done, memory, lock = [0], [], threading.Lock()

    def one(request: tuple[str, int]) -> Answer:
        answer = stream_one(client, model, *request)
        with lock:
            done[0] += 1
            if done[0] in sample_at:
                memory.append((done[0], server_rss_bytes(server_pid) / 2**20))
        return answer

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        answers = list(pool.map(one, requests))
    elapsed = time.perf_counter() - start
    memory.append((len(requests), server_rss_bytes(server_pid) / 2**20))
    tpots = sorted(a.seconds_per_output_token for a in answers if a.seconds_per_output_token is not None)
    return {
        "answers": answers,
        "requests_per_s": len(requests) / elapsed,
        "output_tokens_per_s": sum(a.tokens for a in answers) / elapsed,
        "tpot_p50_ms": 1000 * statistics.median(tpots),
        "tpot_p99_ms": 1000 * tpots[min(len(tpots) - 1, int(0.99 * len(tpots)))],
        "rss_half_mib": min(memory, key=lambda sample: abs(sample[0] - len(requests) // 2))[1],
        "rss_end_mib": memory[-1][1],
        "rss_mib_after_answers": memory,
    }


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One server's runs: speed figures as medians; memory from the first run's half-way point
    to the last run's end (bounded memory holds across all of them); the first run's answers."""
    speed = ("requests_per_s", "output_tokens_per_s", "tpot_p50_ms", "tpot_p99_ms")
    return {"answers": runs[0]["answers"], **{k: statistics.median(r[k] for r in runs) for k in speed},
            "rss_mib_after_answers": runs[0]["rss_mib_after_answers"], "rss_half_mib": runs[0]["rss_half_mib"],
            "rss_end_mib": runs[-1]["rss_end_mib"], "runs": len(runs)}


def compare(model: str, requests: int, concurrency: int, daop_options: str, work_dir: Path,
            repeats: int = 1) -> dict[str, Any]:
    """The stock server, then the daop server, on the same requests (`repeats` times each)."""
    from daop_vllm.bench.server import vllm_server

    load = load_requests(requests)
    results = {}
    for name, extra in (("stock", ()), ("daop", ("--load-format", "daop", "--model-loader-extra-config",
                                                 daop_options))):
        pids: list[int] = []
        with vllm_server(model, *extra, "--max-num-seqs", str(min(concurrency, 64)),
                         log_path=work_dir / f"{name}.log", pids=pids) as url:
            results[name] = _medians([run_load(url, load, concurrency, pids[0]) for _ in range(repeats)])
    stock, daop = results["stock"], results["daop"]
    same = sum(a.text == b.text for a, b in zip(stock["answers"], daop["answers"]))
    summary = {name: {k: v for k, v in r.items() if k not in ("answers", "rss_mib_after_answers")}
               for name, r in results.items()}
    return {
        "requests": requests, "concurrency": concurrency, "daop_options": daop_options,
        "answered": {name: sum(a.tokens == n for a, (_, n) in zip(r["answers"], load)) for name, r in results.items()},
        "outputs_equal_stock": same, **summary,
        "daop_over_stock": {"requests_per_s": daop["requests_per_s"] / stock["requests_per_s"],
                            "tpot_p50": daop["tpot_p50_ms"] / stock["tpot_p50_ms"],
                            "tpot_p99": daop["tpot_p99_ms"] / stock["tpot_p99_ms"]},
    }


def soak(model: str, requests: int, concurrency: int, daop_options: str, work_dir: Path, memory_samples: int = 25,
         warm_up_share: float = 0.2) -> dict[str, Any]:
    """The daop server alone under `requests` requests (mixed lengths, as in compare), its memory
    sampled evenly: after the first `warm_up_share` of the answers it should stay flat."""
    from daop_vllm.bench.server import vllm_server

    load = load_requests(requests, seed=1)
    pids: list[int] = []
    with vllm_server(model, "--load-format", "daop", "--model-loader-extra-config", daop_options,
                     "--max-num-seqs", str(min(concurrency, 64)), log_path=work_dir / "soak.log", pids=pids) as url:
        result = run_load(url, load, concurrency, pids[0], memory_samples)
    after_warm_up = [mib for answered, mib in result["rss_mib_after_answers"] if answered > warm_up_share * requests]
    return {
        "requests": requests, "concurrency": concurrency, "daop_options": daop_options,
        "answered": sum(a.tokens == n for a, (_, n) in zip(result["answers"], load)),
        **{k: v for k, v in result.items() if k != "answers"},
        "warm_up_share": warm_up_share,
        "rss_growth_after_warm_up": max(after_warm_up) / min(after_warm_up) - 1,
    }

"""`vllm serve --load-format daop` with the official openai client, against the stock server."""

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from daop_vllm.bench.server import vllm_server

openai = pytest.importorskip("openai", reason="the openai client is installed by `make test`")

PROMPTS = [f"{start} {n}" for n in range(5) for start in ("Hello world", "The quick brown fox", "Once upon a time",
                                                            "What is the capital")]
MAX_TOKENS = 16


def complete_all(base_url: str) -> list[str]:
    """All prompts at once, one request each, from 16+ concurrent client threads."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id

    def complete(prompt: str) -> str:
        response = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0)
        return response.choices[0].text

    with ThreadPoolExecutor(max_workers=len(PROMPTS)) as pool:
        return list(pool.map(complete, PROMPTS))


@pytest.fixture(scope="module")
def stock_completions(tiny_mixtral, tmp_path_factory):
    with vllm_server(tiny_mixtral, log_path=tmp_path_factory.mktemp("stock") / "serve.log") as url:
        return complete_all(url)


def abort_streams(base_url: str, count: int) -> None:
    """Streaming requests whose clients hang up after the first chunk."""
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120)
    model = client.models.list().data[0].id

    def abort(prompt: str) -> None:
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=200, temperature=0.0,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))
        stream.close()

    with ThreadPoolExecutor(max_workers=count) as pool:
        list(pool.map(abort, PROMPTS[:count]))


@pytest.mark.parametrize("realloc", ["paper", "auto"])
def test_daop_server_matches_stock_and_writes_stats(tiny_mixtral, stock_completions, tmp_path, realloc):
    """Concurrent clients while experts move (both policies), then clients that hang up
    mid-stream: outputs equal the stock server's and no per-request state is left."""
    assert len(PROMPTS) >= 16
    stats_path = tmp_path / "stats.json"
    extra = json.dumps({"resident_fraction": 0.25, "realloc": realloc, "stats_path": str(stats_path)})
    with vllm_server(tiny_mixtral, "--load-format", "daop", "--model-loader-extra-config", extra,
                     log_path=tmp_path / "serve.log") as url:
        completions = complete_all(url)
        abort_streams(url, 8)
        after_aborts = complete_all(url)
        # vLLM tells the worker about finished and aborted requests at its next step: after
        # one more request on its own, only that one may still be tracked.
        openai.OpenAI(base_url=url, api_key="unused").completions.create(
            model=tiny_mixtral, prompt="one more", max_tokens=2)
        time.sleep(2.5)  # the stats file is rewritten every second
        live = json.loads(stats_path.read_text())
    assert completions == stock_completions and after_aborts == stock_completions
    assert live["requests_tracked"] <= 1, "finished and aborted requests leave no state behind"
    assert live["totals"]["swaps"] > 0 and live["realloc"] == realloc
    totals = live["totals"]
    assert 0 < totals["decode_hit_rate"] < 1 and totals["decode_hit_rate"] == totals["decode_device_expert_tokens"] / (
        totals["decode_device_expert_tokens"] + totals["decode_cpu_expert_tokens"])
    assert live["budget"]["asked"] == {"resident_fraction": 0.25}
    assert [len(layer["resident"]) for layer in live["layers"]] == [2, 2, 2, 2]
    assert live["totals"]["device_expert_tokens"] > 0 and live["totals"]["cpu_expert_tokens"] > 0
    final = json.loads(stats_path.read_text())
    assert final["updated_at"] >= live["updated_at"]
    assert final["totals"]["cpu_expert_tokens"] >= live["totals"]["cpu_expert_tokens"]
    log = (tmp_path / "serve.log").read_text()
    assert "daop: load format ready" in log and "budget asked:  resident_fraction=0.25" in log
    assert "its final write at shutdown needs --shutdown-timeout > 0" in log


@pytest.mark.parametrize("mode", ["verified", "daop"])
def test_prediction_modes_serve_concurrent_clients(tiny_mixtral, stock_completions, tmp_path, mode):
    """Predicting modes under a real server's continuous batching: every request answered,
    and the worker's counters show predictions and pre-computed CPU work."""
    stats_path = tmp_path / "stats.json"
    extra = json.dumps({"resident_fraction": 0.25, "mode": mode, "first_predicted_layer": 1,
                        "stats_path": str(stats_path)})
    with vllm_server(tiny_mixtral, "--load-format", "daop", "--model-loader-extra-config", extra,
                     log_path=tmp_path / "serve.log") as url:
        completions = complete_all(url)
        time.sleep(2.5)  # the worker rewrites its stats file every second; the write at shutdown may not come
    final = json.loads(stats_path.read_text())
    assert len(completions) == len(stock_completions) and all(completions)
    totals = final["totals"]
    assert final["mode"] == mode and final["first_predicted_layer"] == 1
    assert 0 < totals["predictions_correct"] <= totals["predictions"]
    assert totals["precomputed_used"] > 0
    assert (totals["degraded"] > 0) == (mode == "daop")
    assert f"mode:          {mode}, first_predicted_layer 1" in (tmp_path / "serve.log").read_text()


def metric_values(text: str, name: str) -> dict[str, float]:
    """{labels: value} of one metric in Prometheus text format."""
    values = {}
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            key, value = line.rsplit(" ", 1)
            values[key[len(name):]] = float(value)
    return values


def test_metrics_and_recovered_cpu_faults(tiny_mixtral, stock_completions, tmp_path):
    """/metrics carries the worker's daop_* counters (no stats_path given: a temporary one is
    used, and removed when the server exits); injected CPU executor faults are recovered inside
    the layer - every answer stays the stock one - counted, and logged once; `daop-vllm stats`
    renders the worker's file."""
    import subprocess
    import sys
    import urllib.request

    extra = json.dumps({"resident_fraction": 0.25, "test_cpu_fault_every": 3})
    log_path = tmp_path / "serve.log"
    with vllm_server(tiny_mixtral, "--load-format", "daop", "--model-loader-extra-config", extra,
                     log_path=log_path) as url:
        completions = complete_all(url)
        time.sleep(2.5)  # the worker rewrites its stats file every second
        with urllib.request.urlopen(url.removesuffix("/v1") + "/metrics", timeout=10) as response:
            metrics = response.read().decode()
        stats_file = Path(log_path.read_text().split("stats_path:    ")[1].split()[0])
        shown = subprocess.run([sys.executable, "-m", "daop_vllm.cli", "stats", str(stats_file)],
                               check=False, capture_output=True, text=True)
    assert not stats_file.parent.exists(), "the temporary stats directory goes with the server"
    assert completions == stock_completions
    cpu = metric_values(metrics, "daop_cpu_expert_tokens_total")
    assert set(cpu) == {f'{{layer="{i}"}}' for i in range(4)} and all(v > 0 for v in cpu.values())
    assert sum(metric_values(metrics, "daop_faults_recovered_total").values()) > 0
    assert metric_values(metrics, "daop_resident_experts") == {f'{{layer="{i}"}}': 2.0 for i in range(4)}
    assert 0 < metric_values(metrics, "daop_device_hit_rate")['{phase="decode"}'] < 1
    assert metric_values(metrics, "daop_cpu_busy_seconds_total")[""] > 0
    log = log_path.read_text()
    assert log.count("recomputed on the fallback path") == 1
    assert shown.returncode == 0 and "realloc auto" in shown.stdout
    assert [line.split()[0] for line in shown.stdout.splitlines()[3:]] == ["0", "1", "2", "3", "all"]


def test_sigint_under_load_leaves_the_final_stats_write(tiny_mixtral, tmp_path):
    """SIGINT while 16 clients stream, with --shutdown-timeout (vLLM's default 0 kills the engine
    processes at once, before any last write; the startup log says so): the worker's last stats
    write lands (`final`) and counts every decode row whose token a client received."""
    stats_path = tmp_path / "stats.json"
    extra = json.dumps({"resident_fraction": 0.25, "stats_path": str(stats_path)})
    received = [0] * len(PROMPTS)

    def stream(index: int, url: str) -> None:
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        try:
            for chunk in client.completions.create(model=tiny_mixtral, prompt=PROMPTS[index], max_tokens=200,
                                                   temperature=0.0, stream=True, extra_body={"ignore_eos": True}):
                received[index] += len(chunk.choices)
        except openai.APIError:  # the server went away mid-stream: what this test does to it
            pass

    pool = ThreadPoolExecutor(max_workers=len(PROMPTS))
    with vllm_server(tiny_mixtral, "--load-format", "daop", "--model-loader-extra-config", extra,
                     "--shutdown-timeout", "5", log_path=tmp_path / "serve.log") as url:
        futures = [pool.submit(stream, index, url) for index in range(len(PROMPTS))]
        deadline = time.monotonic() + 120
        while sum(received) < 20 * len(PROMPTS) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(not future.done() for future in futures), "the load must still be running at SIGINT"
    for future in futures:
        future.result()
    final = json.loads(stats_path.read_text())
    assert final["final"] is True, "the worker's closing write is missing"
    decode_rows = [(layer["decode_device_expert_tokens"] + layer["decode_cpu_expert_tokens"]) // 2
                   for layer in final["layers"]]  # top-2
    streamed_after_the_first = sum(max(0, count - 1) for count in received)
    assert min(decode_rows) >= streamed_after_the_first > 0, (decode_rows, received)
    assert "its final write at shutdown needs --shutdown-timeout" not in (tmp_path / "serve.log").read_text()

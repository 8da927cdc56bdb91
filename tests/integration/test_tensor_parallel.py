"""DAOP under vLLM's tensor parallelism on the CPU backend: two worker processes, one core each
(VLLM_CPU_OMP_THREADS_BIND="0|1"), each holding half of every expert. Exact mode gives stock
vLLM's greedy tokens at the same tensor-parallel size at every fraction, both ranks reach the same
placement after re-allocation, and the startup log and stats files show the split."""

import json
import os
import time

import pytest

from .engines import PROMPTS, close_llm, greedy_ids, make_llm, run_counted, runs_at_fractions

TP = 2
pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < TP,
                                 reason=f"needs {TP} CPUs for {TP} tensor-parallel ranks of one core each")


@pytest.fixture(scope="module")
def tp_env():
    """One core per rank, and a KV cache that leaves host memory for two workers."""
    saved = {k: os.environ.get(k) for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_KVCACHE_SPACE")}
    os.environ.update(VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_KVCACHE_SPACE="1")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def stock_tp_ids(tiny_mixtral, tp_env):
    llm = make_llm(tiny_mixtral, enforce_eager=True, tensor_parallel_size=TP)
    ids = greedy_ids(llm)
    close_llm(llm)
    return ids


@pytest.fixture(scope="module")
def daop_tp(tiny_mixtral, stock_tp_ids, tmp_path_factory):
    """The DAOP engine at TP=2, with the worker processes' output (vLLM logs to stdout) in a file."""
    directory = tmp_path_factory.mktemp("tp")
    log = directory / "workers.log"
    stats = directory / "stats.json"
    trace = directory / "trace.jsonl"
    saved = [os.dup(1), os.dup(2)]
    with open(log, "w") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
        try:
            llm = make_llm(tiny_mixtral, enforce_eager=True, tensor_parallel_size=TP, load_format="daop",
                           model_loader_extra_config={"resident_fraction": 1.0, "realloc": "paper",
                                                      "stats_path": str(stats), "trace_path": str(trace)})
        finally:
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
    yield llm, log.read_text(), stats
    close_llm(llm)


def test_exact_matches_stock_at_the_same_tensor_parallel_size(daop_tp, stock_tp_ids):
    llm, _, _ = daop_tp
    for fraction, ids, report in runs_at_fractions(llm, [1.0, 0.5, 0.25, 0.0]):
        assert ids == stock_tp_ids, f"tensor_parallel_size {TP}, fraction {fraction}"
        totals = report["totals"]
        assert (totals["cpu_expert_tokens"] > 0) == (fraction < 1)
        assert (totals["device_expert_tokens"] > 0) == (fraction > 0)


def test_ranks_reach_the_same_placement_after_reallocation(daop_tp):
    llm, _, _ = daop_tp
    llm.collective_rpc("daop_place_fraction", args=(0.25,))
    before = [report["layers"] for report in llm.collective_rpc("daop_report")]
    run_counted(llm)
    reports = llm.collective_rpc("daop_report")
    assert [r["tensor_parallel"]["rank"] for r in reports] == list(range(TP))
    placements = [[layer["resident"] for layer in report["layers"]] for report in reports]
    assert all(report["totals"]["swaps"] > 0 for report in reports), "re-allocation moved experts on every rank"
    assert placements[0] != [layer["resident"] for layer in before[0]], "the placement changed"
    assert all(p == placements[0] for p in placements), placements
    # each rank counted the same routed work: routing is replicated
    assert len({json.dumps([layer["cpu_expert_tokens"] for layer in r["layers"]]) for r in reports}) == 1


def test_the_split_in_the_startup_log_and_stats_files(daop_tp, tiny_mixtral):
    llm, log, stats = daop_tp
    model = json.load(open(os.path.join(tiny_mixtral, "config.json")))
    hidden, intermediate, experts = model["hidden_size"], model["intermediate_size"], model["num_local_experts"]
    shard_bytes = model["num_hidden_layers"] * experts * 3 * hidden * (intermediate // TP) * 4  # fp32
    for rank in range(TP):
        assert (f"tensor parallel: rank {rank} of {TP} ({TP} on this machine); every expert's intermediate size "
                f"{intermediate} split in {TP}, {intermediate // TP} here") in log, log[-3000:]
        assert f"CPU executor pinned to CPUs [{rank}]" in log
        path = stats if rank == 0 else stats.with_name(f"stats.rank{rank}.json")
        written = json.loads(path.read_text())
        assert written["tensor_parallel"] == {"rank": rank, "size": TP, "local_ranks": TP}
        assert written["cpu_threads"] == 1 and written["cpu_cores"] == [rank]
        assert written["host_expert_bytes"] == shard_bytes, "each rank holds half of every expert"


def test_stats_and_metrics_per_rank_and_summed(daop_tp):
    """`daop-vllm stats` and /metrics read every rank's file: summed, and each rank's own."""
    from daop_vllm.cli.stats_view import load_report, render
    from daop_vllm.vllm_adapter.metrics import DaopCollector

    llm, _, stats = daop_tp
    run_counted(llm)
    time.sleep(1.5)  # the files are rewritten every second
    report = load_report(stats)
    ranks = report["ranks"]
    assert [r["tensor_parallel"]["rank"] for r in ranks] == list(range(TP))
    assert report["host_expert_bytes"] == sum(r["host_expert_bytes"] for r in ranks)
    assert report["host_expert_bytes"] == TP * ranks[0]["host_expert_bytes"]
    assert report["totals"]["cpu_expert_tokens"] == sum(r["totals"]["cpu_expert_tokens"] for r in ranks)
    assert report["cpu_threads"] == TP and f"tensor parallel: {TP} ranks" in render(report)
    collector = DaopCollector()
    collector.stats_path = stats
    families = {family.name: family for family in collector.collect()}
    per_rank = families["daop_rank_cpu_expert_tokens"].samples
    assert sorted(sample.labels["rank"] for sample in per_rank) == [str(r) for r in range(TP)]
    summed = sum(sample.value for sample in families["daop_cpu_expert_tokens"].samples)
    assert summed == sum(sample.value for sample in per_rank)


def test_rank_0_alone_writes_the_trace(daop_tp):
    """Every rank routes alike: the trace has each finished request once."""
    llm, _, stats = daop_tp
    greedy_ids(llm)
    llm.generate(["one more"], use_tqdm=False)  # the worker learns of finished requests a step later
    ids = [json.loads(line)["id"] for line in (stats.parent / "trace.jsonl").read_text().splitlines()]
    assert len(ids) >= len(PROMPTS) and len(ids) == len(set(ids)), ids

"""`daop-vllm bench cpu-experts`: the CPU expert executor against the machine's streaming read
bandwidth and against PyTorch's matmul on the same weights, measured in one run.

Each measurement rotates through more expert bytes than 4x the last-level cache, so weights
come from memory as they do in decode; each figure is the median of `repeats` passes, in which
the streaming read, the executor and PyTorch take turns, so that the noise of a shared machine
falls on all three alike; ratios are medians of the ratios within a pass.
"""

from __future__ import annotations

import functools
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from daop_vllm.core.cpu_executor import (
    JOB_NEXT_EXPERT,
    CpuExpertExecutor,
    job_state,
    physical_core_count,
    takes_whole_experts,
)
from daop_vllm.core.cpu_kernels import native_kernels
from daop_vllm.core.expert_math import expert_mlp
from daop_vllm.core.quantized_experts import quantize
from daop_vllm.offline.model_shapes import MoEShape

MAX_ROTATED_EXPERTS = 512
# After a parallel region torch's OpenMP threads spin for milliseconds (libgomp's default wait
# policy) on the cores the next call needs: 13% slower calls right after a torch matmul on our
# 2-core machine. Torch runs in the benchmark's thread and in the executor's (its torch path),
# so the passes sleep this long, untimed, after every block of calls.
OPENMP_SPIN_SECONDS = 0.02
STEPS_PER_PASS_PER_LAYER = 8  # decode steps: each layer's routing comes back this often per pass


def last_level_cache_bytes() -> int:
    """Size of the L3 (or the largest cache the kernel reports); 256 MiB when unknown."""
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        sizes.append(int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
    return max(sizes, default=256 * 2**20)


class StreamRead:
    """Reads `chunk_bytes` of a buffer of at least `total_bytes` per call, a share per thread, at
    rotating offsets: the machine's streaming read, in the same shape as one expert call, so that
    it can take turns with the calls it is the baseline of. Its threads are the native kernels'
    own kind (a pool of `threads` of them): a call costs what an expert call costs to start and
    wait for (~6 us; Python's thread pool took ~100, which flattered small experts)."""

    def __init__(self, total_bytes: int, chunk_bytes: int, threads: int) -> None:
        self.kernels = native_kernels()
        self.chunks = max(1, -(-total_bytes // chunk_bytes))
        self.buffer = torch.ones(self.chunks * chunk_bytes // 8, dtype=torch.int64)
        self.chunk_words = chunk_bytes // 8
        self.pool = self.kernels.pool_create(threads) if self.kernels else None
        self.last_sum = 0

    def __call__(self, call: int) -> None:
        base = (call % self.chunks) * self.chunk_words
        if self.pool is None:
            self.last_sum = int(self.buffer[base : base + self.chunk_words].sum())
            return
        state = job_state()
        address = self.buffer.data_ptr() + 8 * base
        self.kernels.pool_read(self.pool, address, 8 * self.chunk_words, state.buffer_info()[0])
        self.kernels.pool_wait(self.pool, state.buffer_info()[0])
        self.last_sum = state[JOB_NEXT_EXPERT]  # where a read job's sum goes

    def close(self) -> None:
        if self.pool is not None:
            self.kernels.pool_destroy(self.pool)
            self.pool = None


def _experts(shape: MoEShape, count: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    h, i = shape.hidden_size, shape.intermediate_size
    w13 = torch.empty(count, 2 * i, h, dtype=dtype)
    w2 = torch.empty(count, h, i, dtype=dtype)
    for weights, fan_in in ((w13, h), (w2, i)):
        for chunk in weights.view(-1).split(1 << 26):  # no fp32 copy of everything at once
            chunk.copy_(torch.randn(chunk.numel(), generator=gen) / fan_in**0.5)
    return w13, w2


def _pass_seconds(runs: dict[str, Any], calls: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, pass by pass: in each pass every function makes its
    `calls` calls in a row, in turn, so that the slow drift of a shared machine's noise falls on
    all of them alike. (Not call by call: a streaming read right after an executor call ran 30%
    slower than after another read on our development machine, which made the baseline too easy.)"""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():
        run(0)  # warm-up: thread start, workspace growth
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            for call in range(calls):
                run(call)
            times[name].append((time.perf_counter() - start) / calls)
            time.sleep(OPENMP_SPIN_SECONDS)
    return times


def _speed_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    """Median over passes of `name`'s speed relative to `baseline`'s in the same pass."""
    return statistics.median(b / t for t, b in zip(times[name], times[baseline], strict=True))


def measure(shape: MoEShape, threads: int, tokens: list[int], repeats: int, dtype: torch.dtype,
            native_max_tokens: int | None = None, formats: tuple[str, ...] = ("bf16",)) -> dict[str, Any]:
    """The executor on experts stored in each of `formats` (bf16: as `dtype`; int8, int4:
    quantized from the same weights), the streaming read and torch's matmul on the `dtype`
    weights, in the same passes. `per_tokens` holds the first format's figures, `formats` each's."""
    llc = last_level_cache_bytes()
    element_size = torch.tensor([], dtype=dtype).element_size()
    expert_bytes = shape.expert_bytes(element_size)
    smallest = min(shape.expert_bytes(element_size, f) for f in formats)
    # Rotate through > 4x the L3 in the smallest format, so that weights come from memory; tiny
    # test shapes would need too many calls for that and stop at MAX_ROTATED_EXPERTS ("rotated_bytes" tells).
    num_experts = min(MAX_ROTATED_EXPERTS, max(2, -(-4 * llc // smallest) + 1))
    w13, w2 = _experts(shape, num_experts, dtype)
    stored = {f: (w13, w2) if f == "bf16" else (quantize(w13, f), quantize(w2, f)) for f in formats}
    # the bytes a call reads: values and scales
    bytes_of = {f: expert_bytes if f == "bf16" else (stored[f][0].nbytes + stored[f][1].nbytes) // num_experts
                for f in formats}
    executor = CpuExpertExecutor(threads, native_max_tokens)
    amx = dtype == torch.bfloat16 and executor.amx and "bf16" in formats
    torch.set_num_threads(threads)
    table = torch.arange(num_experts)
    result: dict[str, Any] = {
        "model_shape": shape.name, "dtype": str(dtype).removeprefix("torch."), "threads": threads,
        "cpu_kernel": executor.kernel_name, "llc_bytes": llc, "expert_bytes": expert_bytes,
        "experts_rotated": num_experts, "rotated_bytes": num_experts * expert_bytes, "repeats": repeats,
        "tokens": tokens, "formats": {f: {"expert_bytes": bytes_of[f], "per_tokens": {}} for f in formats},
    }
    stream = StreamRead(max(4 * llc, 2**30), expert_bytes, threads)
    for n in tqdm(tokens, desc=f"{shape.name} {threads} threads", leave=False):
        x = torch.randn(n, shape.hidden_size).to(dtype)
        weights = torch.ones(n, 1)

        def run_executor(call: int, experts: tuple = (w13, w2)) -> None:
            ids = torch.full((n, 1), call % num_experts, dtype=torch.int64)
            executor.submit(x, ids, weights, *experts, table).result()

        def run_torch(call: int) -> None:
            e = call % num_experts
            expert_mlp(x, w13[e], w2[e])

        flops = 6 * shape.hidden_size * shape.intermediate_size * n
        runs = {"stream": stream, "torch": run_torch}
        runs.update({f"executor[{f}]": functools.partial(run_executor, experts=stored[f]) for f in formats})
        if amx:  # the kernel's AVX-512 path beside its AMX one, in the same passes
            runs["executor_avx512"] = _without_amx(executor.kernels, functools.partial(run_executor,
                                                                                      experts=stored["bf16"]))
        times = _pass_seconds(runs, num_experts, repeats)
        def rates(name: str, size: int = expert_bytes) -> dict[str, float]:
            s = statistics.median(times[name])
            return {f"{name}_gbps": size / s / 1e9, f"{name}_gflops": flops / s / 1e9}

        shared = {"stream_gbps": expert_bytes / statistics.median(times["stream"]) / 1e9, **rates("torch")}
        for f in formats:
            name = f"executor[{f}]"
            s = statistics.median(times[name])
            row = {**shared, "executor_gbps": bytes_of[f] / s / 1e9, "executor_gflops": flops / s / 1e9,
                   "executor_over_torch": _speed_ratio(times, name, "torch"),
                   # the read rates' ratio: the stream's chunks are the dtype's expert bytes
                   "executor_over_stream": _speed_ratio(times, name, "stream") * bytes_of[f] / expert_bytes}
            if "bf16" in formats:
                row["executor_over_bf16"] = _speed_ratio(times, name, "executor[bf16]")
            if f == "bf16" and amx:
                row.update(rates("executor_avx512"))
            result["formats"][f]["per_tokens"][str(n)] = row
    result["per_tokens"] = result["formats"][formats[0]]["per_tokens"]
    # The baseline is measured in the same passes as the calls it is compared with.
    result["stream_read_gbps"] = statistics.median(r["stream_gbps"] for r in result["per_tokens"].values())
    result["decode_efficiency"] = result["per_tokens"][str(tokens[0])]["executor_over_stream"]
    executor.shutdown()
    stream.close()
    return result


def _without_amx(kernels, run):
    """`run` with the native kernels' AMX path switched off for the call."""
    def run_avx512(call: int) -> None:
        previous = kernels.set_amx_min_tokens(0)
        try:
            run(call)
        finally:
            kernels.set_amx_min_tokens(previous)
    return run_avx512


def _decode_step_runner(executor: CpuExpertExecutor, x: torch.Tensor, steps: list, tables: list[torch.Tensor],
                        w13: torch.Tensor, w2: torch.Tensor):
    """call -> one decode step's CPU experts, of layer `call` modulo the layers."""
    def run(call: int) -> None:
        weights, ids = steps[call % len(steps)]
        executor.submit(x, ids, weights, w13, w2, tables[call % len(steps)]).result()
    return run


def decode_steps(shape: MoEShape, threads: int, batches: list[int], repeats: int, dtype: torch.dtype,
                 seed: int = 0) -> dict[str, Any]:
    """Decode steps' CPU work as the engine hands it over: `batch` tokens, each routed to top-k
    of the layer's E experts (uniformly at random), every expert in host memory, layers taken in
    turn so that the weights come from memory. The executor's threads taking whole experts in
    turn against the same threads slicing every expert between them, and the streaming read,
    in the same passes; `executor_takes` is the way the executor chooses for the step."""
    llc = last_level_cache_bytes()
    expert_bytes = shape.expert_bytes(torch.tensor([], dtype=dtype).element_size())
    layers = max(1, min(MAX_ROTATED_EXPERTS // shape.num_experts, -(-4 * llc // (shape.num_experts * expert_bytes))))
    w13, w2 = _experts(shape, layers * shape.num_experts, dtype)
    executors = {"whole": CpuExpertExecutor(threads, whole_experts_from=0),
                 "sliced": CpuExpertExecutor(threads, whole_experts_from=w13.shape[0] + 1)}
    gen = torch.Generator().manual_seed(seed)
    result: dict[str, Any] = {"model_shape": shape.name, "dtype": str(dtype).removeprefix("torch."),
                              "threads": threads, "layers_rotated": layers, "expert_bytes": expert_bytes,
                              "batches": batches, "per_batch": {}}
    for batch in tqdm(batches, desc=f"{shape.name} decode steps", leave=False):
        x = torch.randn(batch, shape.hidden_size).to(dtype)
        steps = [torch.rand(batch, shape.num_experts, generator=gen).topk(shape.top_k) for _ in range(layers)]
        tables = [torch.arange(shape.num_experts) + layer * shape.num_experts for layer in range(layers)]
        distinct = statistics.mean(len(set(ids.flatten().tolist())) for _, ids in steps)

        step_bytes = int(distinct * expert_bytes)
        stream = StreamRead(max(4 * llc, 2**30), step_bytes, threads)  # a step's bytes per call, as the steps
        runs = {name: _decode_step_runner(e, x, steps, tables, w13, w2) for name, e in executors.items()}
        times = _pass_seconds({"stream": stream, **runs}, STEPS_PER_PASS_PER_LAYER * layers, repeats)
        stream.close()
        row = {"distinct_experts": distinct, "stream_gbps": step_bytes / statistics.median(times["stream"]) / 1e9}
        for name in runs:
            s = statistics.median(times[name])
            row[f"{name}_ms"] = 1e3 * s
            row[f"{name}_gbps"] = step_bytes / s / 1e9
        row["whole_over_sliced"] = _speed_ratio(times, "whole", "sliced")
        row["executor_takes"] = "whole" if takes_whole_experts(distinct, threads) else "sliced"
        row["executor_over_stream"] = _speed_ratio(times, row["executor_takes"], "stream")
        result["per_batch"][str(batch)] = row
    for executor in executors.values():
        executor.shutdown()
    return result


def thread_scaling(shape: MoEShape, repeats: int, dtype: torch.dtype) -> dict[str, Any]:
    """Stream and 1-token executor GB/s for 1, 2, 4, 8, 16 threads, as far as the cores go."""
    cores = physical_core_count()
    scaling = {}
    for threads in (t for t in (1, 2, 4, 8, 16) if t <= cores):
        r = measure(shape, threads, [1], repeats, dtype)
        scaling[str(threads)] = {"stream_read_gbps": r["stream_read_gbps"],
                                 "executor_gbps": r["per_tokens"]["1"]["executor_gbps"]}
    return scaling


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if len(result["formats"]) > 1:
        _plot_formats(result, path, plt)
        return
    tokens = result["tokens"]
    rows = [result["per_tokens"][str(n)] for n in tokens]
    fig, (bw, share, fl) = plt.subplots(1, 3, figsize=(15, 4))
    bw.plot(tokens, [r["executor_gbps"] for r in rows], "o-", label="DAOP executor")
    if "executor_avx512_gbps" in rows[0]:
        bw.plot(tokens, [r["executor_avx512_gbps"] for r in rows], "^:", label="DAOP executor without AMX")
    bw.plot(tokens, [r["torch_gbps"] for r in rows], "s--", label="PyTorch x @ w.t()")
    bw.plot(tokens, [r["stream_gbps"] for r in rows], "x:", color="gray", label="streaming read (same passes)")
    bw.set(xscale="log", xlabel="tokens per expert", ylabel="GB/s of expert weights", title="bandwidth")
    share.plot(tokens, [100 * r["executor_over_stream"] for r in rows], "o-", label="DAOP executor")
    share.axhline(85, color="gray", linestyle="-.", linewidth=0.7, label="85%")
    share.set(xscale="log", xlabel="tokens per expert", ylabel="% of the streaming read",
              title="share of the streaming read (median of passes)")
    fl.plot(tokens, [r["executor_gflops"] for r in rows], "o-", label="DAOP executor")
    fl.plot(tokens, [r["torch_gflops"] for r in rows], "s--", label="PyTorch")
    fl.set(xscale="log", yscale="log", xlabel="tokens per expert", ylabel="GFLOP/s", title="compute")
    for axis in (bw, share, fl):
        axis.set_xticks(tokens, [str(n) for n in tokens])
        axis.legend()
    fig.suptitle(f"{result['model_shape']} experts, {result['dtype']}, {result['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_formats(result: dict[str, Any], path: Path, plt) -> None:
    """The executor's GFLOP/s and read rate per expert format, beside torch and the streaming read."""
    tokens = result["tokens"]
    fig, (fl, bw) = plt.subplots(1, 2, figsize=(11, 4))
    for name, measured in result["formats"].items():
        rows = [measured["per_tokens"][str(n)] for n in tokens]
        fl.plot(tokens, [r["executor_gflops"] for r in rows], "o-", label=f"DAOP executor, {name} experts")
        size = f"{measured['expert_bytes'] / 2**20:.0f} MiB an expert"
        bw.plot(tokens, [r["executor_gbps"] for r in rows], "o-", label=f"{name} ({size})")
    first = [result["per_tokens"][str(n)] for n in tokens]
    fl.plot(tokens, [r["torch_gflops"] for r in first], "s--", color="gray", label=f"PyTorch, {result['dtype']}")
    bw.plot(tokens, [r["stream_gbps"] for r in first], "x:", color="gray", label="streaming read (same passes)")
    fl.set(xscale="log", yscale="log", xlabel="tokens per expert", ylabel="GFLOP/s", title="compute")
    bw.set(xscale="log", xlabel="tokens per expert", ylabel="GB/s of stored expert bytes", title="bytes read")
    for axis in (fl, bw):
        axis.set_xticks(tokens, [str(n) for n in tokens])
        axis.legend(fontsize=8)
    fig.suptitle(f"{result['model_shape']} experts by storage format, {result['dtype']} activations, "
                 f"{result['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)

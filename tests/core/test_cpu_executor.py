"""The CPU expert executor against a float64 reference: native and torch paths, thread counts,
sizes that are not multiples of the vector width; errors in a worker thread."""

import ctypes
import os
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from daop_vllm.core.cpu_executor import (
    JOB_DONE,
    JOB_NEXT_EXPERT,
    CpuExpertExecutor,
    _grouped_in_lists,
    job_state,
)
from daop_vllm.core.cpu_kernels import native_kernels


def reference(x, topk_ids, topk_weights, w13, w2, table):
    x, w13, w2 = x.double(), w13.double(), w2.double()
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(topk_ids.shape[1]):
            slot = int(table[topk_ids[t, k]])
            if slot >= 0:
                gate, up = (x[t] @ w13[slot].t()).chunk(2)
                out[t] += float(topk_weights[t, k]) * ((F.silu(gate) * up) @ w2[slot].t())
    return out


def case(tokens, experts, top_k, hidden, inter, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(dtype)
    topk_weights, topk_ids = torch.topk(torch.rand(tokens, experts, generator=gen), top_k, dim=-1)
    table = torch.where(torch.arange(experts) % 3 == 0, -1, torch.arange(experts))  # some experts not ours
    return x, topk_ids, topk_weights, w13, w2, table


TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize(
    "tokens, experts, top_k, hidden, inter",
    [(1, 8, 2, 64, 128), (2, 8, 2, 100, 70), (3, 4, 2, 33, 17), (9, 8, 2, 96, 40), (40, 16, 4, 48, 24),
     (8, 64, 8, 64, 40)],  # the last: dozens of small experts
)
@pytest.mark.parametrize("native_max_tokens", [0, 2, 64], ids=["torch", "mixed", "native"])
@pytest.mark.parametrize("whole_experts_from", [0, 10**6], ids=["whole", "sliced"])
def test_matches_float64_reference(dtype, threads, tokens, experts, top_k, hidden, inter, native_max_tokens,
                                   whole_experts_from):
    args = case(tokens, experts, top_k, hidden, inter, dtype)
    executor = CpuExpertExecutor(threads, native_max_tokens=native_max_tokens, whole_experts_from=whole_experts_from)
    try:
        got = executor.submit(*args).result()
        want = reference(*args)
        assert got.dtype == dtype and got.shape == want.shape
        scale = want.abs().max().item()
        assert (got.double() - want).abs().max().item() <= TOLERANCE[dtype] * scale
        # the workspace is reused: a second, smaller call must not see the first one's values
        again = executor.submit(*[a[:1] if i in (0, 1, 2) else a for i, a in enumerate(args)]).result()
        want_again = reference(*[a[:1] if i in (0, 1, 2) else a for i, a in enumerate(args)])
        assert (again.double() - want_again).abs().max().item() <= TOLERANCE[dtype] * max(scale, 1e-6)
    finally:
        executor.shutdown()


def test_native_kernels_are_built_here():
    """make test builds the C extension; without it the executor would silently be slow."""
    kernels = native_kernels()
    assert kernels is not None, "daop_vllm._cpu_experts is missing: reinstall with a C compiler"
    assert set(kernels.isa()) == {"avx512f", "avx512_bf16", "amx_bf16"}


@pytest.mark.parametrize("native_max_tokens", [64, 0], ids=["native-threads", "torch-thread"])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_worker_error_fails_that_call_and_executor_keeps_serving(threads, native_max_tokens):
    executor = CpuExpertExecutor(threads, native_max_tokens=native_max_tokens)
    args = case(4, 8, 2, 64, 32, torch.float32)
    try:
        executor.fail_every = 1
        with pytest.raises(RuntimeError, match="injected CPU executor fault"):
            executor.submit(*args).result()
        executor.fail_every = None
        got = executor.submit(*args).result()
        want = reference(*args)
        assert (got.double() - want).abs().max().item() <= 2e-5 * want.abs().max().item()
    finally:
        executor.shutdown()


@pytest.mark.parametrize("amx_min_tokens", [0, 1, 2], ids=["avx512-only", "amx-from-1", "amx-from-2"])
@pytest.mark.parametrize(
    "tokens, experts, top_k, hidden, inter",
    [(16, 2, 2, 96, 64), (9, 4, 2, 64, 40), (5, 1, 1, 256, 96), (3, 4, 1, 128, 32), (3, 1, 1, 76, 38),
     (4, 1, 1, 64, 96), (2, 1, 1, 96, 64), (37, 2, 2, 64, 96), (70, 1, 1, 96, 64)],
)
def test_amx_and_avx512_paths_match_reference(amx_min_tokens, tokens, experts, top_k, hidden, inter):
    """bf16 experts with 1-70 tokens each, on AMX tiles (up to four tokens in the narrow token
    tiles) or AVX-512 alone (three tokens: 8 rows at once, and the rows past the last 8 one by
    one); hidden and intermediate
    sizes that are (AMX) and are not (the AVX-512 rest) multiples of the tile's 32 elements; on
    AMX, one to five groups of 16 tokens (four meet each weight tile at once), the last one short."""
    kernels = native_kernels()
    if kernels is None or (amx_min_tokens and not kernels.isa()["amx_bf16"]):
        pytest.skip("needs the C extension, and AMX for the AMX cases (this CPU has none)")
    previous = kernels.set_amx_min_tokens(amx_min_tokens)
    executor = CpuExpertExecutor(2, native_max_tokens=128)
    try:
        args = case(tokens, experts, top_k, hidden, inter, torch.bfloat16, seed=3)
        args = (*args[:5], torch.arange(experts))  # every expert ours: up to 70 tokens per expert
        got, want = executor.submit(*args).result(), reference(*args)
        assert (got.double() - want).abs().max().item() <= TOLERANCE[torch.bfloat16] * want.abs().max().item()
    finally:
        executor.shutdown()
        kernels.set_amx_min_tokens(previous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("tokens, hidden, inter", [(1, 1040, 400), (3, 1024, 416), (20, 1024, 416)])
def test_rows_claimed_piece_by_piece_match_reference(dtype, threads, tokens, hidden, inter):
    """Experts large enough that the threads claim their gate/up rows and down columns in several
    pieces of ~512 KiB (the last one short), on AMX and AVX-512 alike; 20 tokens: two token groups
    per piece."""
    args = case(tokens, 2, 2, hidden, inter, dtype, seed=5)
    args = (*args[:5], torch.arange(2))  # both experts ours, every token in each: sliced, not whole
    executor = CpuExpertExecutor(threads, native_max_tokens=64)
    try:
        got, want = executor.submit(*args).result(), reference(*args)
        assert (got.double() - want).abs().max().item() <= TOLERANCE[dtype] * want.abs().max().item()
    finally:
        executor.shutdown()


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("words", [1, 7, 128, 1000, 4099])
def test_streaming_read_sums_every_word(words, threads):
    """The bandwidth baseline, a job of the native threads, reads the whole buffer (each thread's
    share, its sixteen prefetched streams and the words past them), not a part of it."""
    kernels = native_kernels()
    if kernels is None:
        pytest.skip("needs the C extension (daop_vllm._cpu_experts)")
    buffer = torch.arange(1, words + 1, dtype=torch.int64)
    pool = kernels.pool_create(threads)
    try:
        for _ in range(2):  # the state block is the caller's: a second job starts from a fresh one
            state = job_state()
            kernels.pool_read(pool, buffer.data_ptr(), 8 * words, state.buffer_info()[0])
            kernels.pool_wait(pool, state.buffer_info()[0])
            assert state[JOB_NEXT_EXPERT] == words * (words + 1) // 2 and state[JOB_DONE] == threads
    finally:
        kernels.pool_destroy(pool)


@pytest.mark.parametrize("threads", [1, 2])
def test_without_native_kernels_matches_reference(threads):
    """The pure-torch fallback (no C extension): torch experts, results added by index_add_."""
    args = case(9, 8, 2, 96, 40, torch.float32)
    executor = CpuExpertExecutor(threads, use_native=False)
    try:
        got, want = executor.submit(*args).result(), reference(*args)
        assert (got.double() - want).abs().max().item() <= TOLERANCE[torch.float32] * want.abs().max().item()
    finally:
        executor.shutdown()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_rows_adds_by_token_in_fp32_and_rounds_once(dtype):
    """The result assembly: rows of any token in any order, tokens with no rows zero, the sum
    kept in fp32 until the one rounding to the result's dtype."""
    kernels = native_kernels()
    if kernels is None:
        pytest.skip("needs the C extension (daop_vllm._cpu_experts)")
    gen = torch.Generator().manual_seed(11)
    tokens = torch.tensor([3, 0, 3, 5, 3, 0], dtype=torch.int64)  # 1, 2, 4 without rows
    rows = torch.randn(len(tokens), 37, generator=gen)
    # token 3 at column 0: 1 + 2 * (3/8 of a bf16 step at 1), which rounds up to 1 + 2^-7 summed
    # first, and stays 1 if rounded after each addition
    rows[0, 0], rows[2, 0], rows[4, 0] = 1.0, 3 * 2.0**-10, 3 * 2.0**-10
    out = torch.full((6, 37), float("nan"), dtype=dtype)
    kernels.sum_rows(1 if dtype == torch.bfloat16 else 0, out.data_ptr(), 6, rows.data_ptr(), tokens.data_ptr(),
                     len(tokens), 37)
    want = torch.zeros(6, 37).index_add_(0, tokens, rows).to(dtype)
    assert torch.equal(out, want)
    assert out[3, 0].item() == (1.0 + 2.0**-7 if dtype == torch.bfloat16 else 1.0 + 6 * 2.0**-10)


def test_amx_activation_matches_reference_far_from_zero():
    """Gate values of +-100 and beyond (where e^-g leaves the float range) through the AMX path's
    vector silu: silu(g) -> g above, -> 0 below, no inf or NaN."""
    kernels = native_kernels()
    if kernels is None or not kernels.isa()["amx_bf16"]:
        pytest.skip("needs the C extension on a CPU with AMX (this one has none)")
    x, topk_ids, topk_weights, w13, w2, _ = case(8, 2, 2, 64, 32, torch.bfloat16, seed=7)
    x = (x.float() * 60).to(torch.bfloat16)
    executor = CpuExpertExecutor(2, native_max_tokens=16)
    try:
        args = (x, topk_ids, topk_weights, w13, w2, torch.arange(2))
        got, want = executor.submit(*args).result(), reference(*args)
        assert torch.isfinite(got).all()
        assert (got.double() - want).abs().max().item() <= TOLERANCE[torch.bfloat16] * want.abs().max().item()
    finally:
        executor.shutdown()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_jobs_of_two_lanes_in_flight_at_once(threads):
    """A layer's own job and the next layer's pre-computation are both in flight: each lane's result
    is its own, whichever is collected first; one job's experts shared by the threads, the other's
    taken whole."""
    executor = CpuExpertExecutor(threads, native_max_tokens=64)
    shared = case(3, 4, 2, 64, 96, torch.bfloat16, seed=1)
    whole = case(6, 32, 4, 64, 32, torch.bfloat16, seed=2)
    try:
        for _ in range(20):
            first = executor.submit(*shared, lane=0)
            second = executor.submit(*whole, lane=1)
            for job, args in ((second, whole), (first, shared)):
                want = reference(*args)
                assert (job.result().double() - want).abs().max().item() <= TOLERANCE[torch.bfloat16] * want.abs().max().item()
    finally:
        executor.shutdown()


def test_native_jobs_run_while_the_caller_holds_the_gil():
    """The native threads never take the GIL: with the interpreter's switch interval raised far past
    the wait, a job still finishes while the caller runs pure Python (threads that needed the GIL
    between kernel calls would wait for the caller's switch interval)."""
    if native_kernels() is None:
        pytest.skip("needs the C extension (daop_vllm._cpu_experts)")
    executor = CpuExpertExecutor(2, native_max_tokens=64)
    args = case(2, 16, 2, 64, 64, torch.float32, seed=4)
    previous = sys.getswitchinterval()
    try:
        job = executor.submit(*args)
        done_count = ctypes.c_int64.from_buffer(job._native._state)  # read without releasing the GIL
        sys.setswitchinterval(1000.0)
        deadline, done = time.monotonic() + 30, False
        while not done and time.monotonic() < deadline:
            done = done_count.value == executor.num_threads
        sys.setswitchinterval(previous)
        assert done, "the native job made no progress while the caller held the GIL"
        want = reference(*args)
        assert (job.result().double() - want).abs().max().item() <= TOLERANCE[torch.float32] * want.abs().max().item()
    finally:
        sys.setswitchinterval(previous)
        executor.shutdown()


def _process_cpu_seconds_of_threads() -> float:
    """utime + stime of every thread of this process, from /proc."""
    ticks = 0
    for stat in Path("/proc/self/task").glob("*/stat"):
        fields = stat.read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of the whole line
    return ticks / os.sysconf("SC_CLK_TCK")


def test_native_threads_sleep_once_no_job_comes():
    """Between jobs the native threads spin for the next one only briefly (0.2 ms), then sleep: an
    idle executor takes no CPU time (threads that kept spinning would take 0.3 s each here)."""
    if native_kernels() is None or not Path("/proc/self/task").is_dir():
        pytest.skip("needs the C extension and Linux's /proc")
    executor = CpuExpertExecutor(2, native_max_tokens=64)
    try:
        args = case(3, 8, 2, 64, 64, torch.float32, seed=5)
        executor.submit(*args).result()
        time.sleep(0.05)  # torch's own OpenMP threads, too, stop spinning within this
        before = _process_cpu_seconds_of_threads()
        time.sleep(0.3)
        assert _process_cpu_seconds_of_threads() - before < 0.05
    finally:
        executor.shutdown()


def test_torch_experts_use_the_executors_threads_where_torch_was_set_to_one():
    """vLLM's GPU worker sets torch's threads to 1 for serving; the executor's torch thread, which
    starts using torch after that, still runs its matmuls (prefill-sized experts) on its own
    thread count, and the caller's thread keeps its 1."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    executor = CpuExpertExecutor(2, native_max_tokens=0)  # every expert on the torch path
    try:
        args = case(9, 8, 2, 96, 40, torch.float32)
        got, want = executor.submit(*args).result(), reference(*args)
        assert (got.double() - want).abs().max().item() <= TOLERANCE[torch.float32] * want.abs().max().item()
        assert executor._torch_thread.submit(torch.get_num_threads).result() == 2
        assert torch.get_num_threads() == 1
    finally:
        executor.shutdown()
        torch.set_num_threads(previous)


def test_slot_table_changed_in_place_is_checked_again():
    """The executor checks a slot table once per version: a table that then points past the
    weights is refused, not read out of bounds."""
    executor = CpuExpertExecutor(1)
    w13, w2, x = torch.randn(2, 8, 4), torch.randn(2, 4, 4), torch.randn(1, 4)
    table = torch.tensor([0, 1])
    ids, weights = torch.tensor([[0, 1]]), torch.ones(1, 2)
    executor.submit(x, ids, weights, w13, w2, table).result()
    executor.submit(x, ids, weights, w13, w2, table).result()
    table[1] = 2
    with pytest.raises(AssertionError, match="slot table points past 2 experts"):
        executor.submit(x, ids, weights, w13, w2, table)
    executor.shutdown()


def test_inference_mode_slot_table_is_checked_at_every_call():
    """A table made under inference mode has no version to key the check on: every call checks it."""
    executor = CpuExpertExecutor(1)
    w13, w2, x = torch.randn(2, 8, 4), torch.randn(2, 4, 4), torch.randn(1, 4)
    ids, weights = torch.tensor([[0, 1]]), torch.ones(1, 2)
    with torch.inference_mode():
        table = torch.tensor([0, 1])
        executor.submit(x, ids, weights, w13, w2, table).result()
        table[1] = 2
        with pytest.raises(AssertionError, match="slot table points past 2 experts"):
            executor.submit(x, ids, weights, w13, w2, table)
    executor.shutdown()


@pytest.mark.parametrize("native_max_tokens", [0, 64], ids=["torch", "native"])
def test_rows_added_into_other_rows_of_the_result(native_max_tokens):
    """`out_rows`: each row of x adds its experts' output into the result row it names (the
    layer's own rows, then pre-computed pairs' rows that add into theirs), in one job."""
    x, topk_ids, topk_weights, w13, w2, table = case(7, 8, 2, 64, 40, torch.float32)
    out_rows = torch.tensor([0, 1, 2, 3, 4, 2, 0])  # rows 5 and 6 add into rows 2 and 0
    executor = CpuExpertExecutor(2, native_max_tokens=native_max_tokens)
    try:
        got = executor.submit(x, topk_ids, topk_weights, w13, w2, table, out=torch.empty(5, 64),
                              out_rows=out_rows).result()
    finally:
        executor.shutdown()
    want = torch.zeros(5, 64, dtype=torch.float64).index_add_(0, out_rows, reference(x, topk_ids, topk_weights, w13,
                                                                                        w2, table))
    assert got.shape == (5, 64) and (got.double() - want).abs().max().item() <= 2e-5 * want.abs().max().item()


@pytest.mark.parametrize("tokens, top_k, with_out_rows", [(1, 2, False), (7, 2, True), (300, 6, True), (64, 8, False)])
def test_pairs_are_grouped_alike_in_the_extension_and_in_lists(tokens, top_k, with_out_rows):
    """The extension's grouping is the lists' (slots in first-appearance order, pairs by token),
    so the native plan, and the sums' order, do not depend on which one ran."""
    executor = CpuExpertExecutor(1)
    assert executor.kernels is not None, "the extension is built here (test_native_kernels_are_built_here)"
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.randint(0, 16, (tokens, top_k), generator=gen)
    ids[torch.rand(ids.shape, generator=gen) < 0.2] = -1  # pairs a call skips
    weights = torch.rand(ids.shape, generator=gen)
    table = torch.randperm(16, generator=gen)
    table[table >= 12] = -1  # experts that are not this call's
    out_rows = torch.randint(0, 3, (tokens,), generator=gen) if with_out_rows else None
    got = executor._grouped(ids, weights, table, 16, out_rows)
    want = _grouped_in_lists(ids, weights, table, out_rows)
    assert got[3] == want[3] and sum(count for _, count in got[3]) == int((ids >= 0).logical_and(
        table[ids.clamp_min(0)] >= 0).sum())
    for a, b in zip(got[:3], want[:3]):
        assert torch.equal(a, b)
    with pytest.raises(IndexError, match="past the 16 experts"):
        executor._grouped(torch.tensor([[3, 16]]), weights[:1, :2], table, 16, None)
    executor.shutdown()

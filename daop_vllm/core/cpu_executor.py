"""Computes host-resident experts on the CPU, on threads of its own.

The caller submits one layer's CPU work and goes on with the device work; `CpuJob.result()`
waits. Two paths, chosen per expert by how many tokens it got:

- native (decode-sized and short prefills: up to `native_max_tokens` tokens, or
  QUANTIZED_NATIVE_MAX_TOKENS for int8/int4 experts; fp32/bf16 activations, when the C extension
  is built): a job for the extension's own threads (csrc/cpu_pool.c), which never
  take the GIL, so the job runs from start to end whatever the caller does meanwhile. Fewer than
  `GROUP_MIN_EXPERTS_PER_THREAD` experts per thread (Mixtral's 2-8 large ones, the small ones
  of DeepSeek or Qwen-MoE at small batches): the threads share each expert's gate/up rows, wait
  at a barrier, then share the output columns of each down projection; they claim rows piece by
  piece from a counter per expert and phase, so that a thread the machine slows down does less.
  More experts (large batches of the small ones): the threads take whole experts in turn, no
  barrier. Either way each weight byte is read once per call (this path runs at memory
  bandwidth), and each expert's weighted outputs go to rows of their own (no two threads add into
  one element), which are added by token into the result at the end.
- torch (more tokens, other dtypes, or no extension): one Python thread runs these experts one
  after another with torch matmuls, which spread over the cores themselves (oneDNN/AMX where
  available), after the native job (running both at once would oversubscribe the cores).

An error in a job (the test-only injected fault, or an exception in the torch thread) fails that
job only, and the executor keeps serving.
"""

from __future__ import annotations

import array
import contextlib
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType

import torch

from daop_vllm.core.cpu_kernels import NATIVE_DTYPES, native_kernels
from daop_vllm.core.expert_math import ExpertWeights, expert_mlp
from daop_vllm.core.quantized_experts import QuantizedWeights, weight_parts
from daop_vllm.core.routing import SoftmaxTopK

# Up to this many tokens per expert the native kernel beats torch's matmul on our development
# machine (benchmarks/results/cpu_experts_*.json); beyond it torch's AMX/oneDNN path wins. With
# AMX (64 tokens meet each weight tile at once) it was 1.9x torch at 32 tokens, 1.33x at 64 and
# 0.96x at 128 (medians of three runs); AVX-512 alone is bound by its dot-product instructions
# from 3 tokens.
NATIVE_MAX_TOKENS = {True: 64, False: 4}  # by: the CPU has AMX
# Quantized experts: torch's path dequantises the whole expert first, which at 8 tokens made it
# 0.03x the native kernels (bench cpu-experts --format); the native kernels take up to this many
# tokens, in passes of 4 over rows the cache holds.
QUANTIZED_NATIVE_MAX_TOKENS = 64
# With at least this many native experts per thread, threads take whole experts instead of a
# slice of every expert. Whole experts save the barrier and the claims, but the thread that gets
# the last one can finish up to an expert's time after the others: on 2 threads (DeepSeek-V2-Lite,
# Qwen3-30B-A3B, OLMoE decode steps; medians of three runs) whole experts were 0.88-0.99x of
# slicing at 3-11 experts per thread and 0.97-1.03x from 12 to 40.
GROUP_MIN_EXPERTS_PER_THREAD = 16


def takes_whole_experts(num_experts: float, num_threads: int,
                        whole_experts_from: int = GROUP_MIN_EXPERTS_PER_THREAD) -> bool:
    """Whether a native job's threads take whole experts in turn (else they slice every expert)."""
    return num_experts >= whole_experts_from * num_threads


# Workspace lanes: the layer's own CPU work, and pre-computations for even and odd layers
# (at layer i, layer i's pre-computed results and layer i+1's pre-computation are both in flight).
NUM_LANES = 3
# Slot tables remembered as checked before the dead ones are dropped (an engine has two per layer)
_CHECKED_TABLES_KEPT = 1024


def default_cpu_threads(device_type: str, cores: Sequence[int] | None = None) -> int:
    """The executor's threads when `cpu_threads` is not given: every physical core (of `cores`,
    a tensor-parallel rank's share of the CPUs this process may use), but one left to the
    thread that launches the device's work where there is a device (the executor's threads spin
    while they wait for work, and a launch queued behind them stalls the GPU)."""
    physical = physical_core_count()
    if cores is not None:
        physical = max(1, physical * len(cores) // len(os.sched_getaffinity(0)))
    return max(1, physical - (1 if device_type == "cuda" else 0))


def rank_cores(available: Sequence[int], local_rank: int, local_ranks: int) -> tuple[int, ...]:
    """The CPUs of local rank `local_rank` of `local_ranks` sharing this machine: disjoint equal
    slices of `available` (the CPUs this process may use), so that the ranks' executors never
    contend for a core."""
    if not 0 <= local_rank < local_ranks:
        raise ValueError(f"local rank {local_rank} is not one of {local_ranks} ranks")
    share = len(available) // local_ranks
    if share < 1:
        raise ValueError(f"{local_ranks} ranks cannot share {len(available)} CPUs")
    return tuple(sorted(available)[local_rank * share:(local_rank + 1) * share])


def _pin_this_thread(cores: Sequence[int] | None) -> None:
    if cores is not None:
        os.sched_setaffinity(0, cores)  # pid 0: the calling thread only


@contextlib.contextmanager
def _threads_pinned_to(cores: Sequence[int] | None) -> Iterator[None]:
    """Threads started inside inherit affinity to `cores` (None: unchanged)."""
    before = os.sched_getaffinity(0)
    _pin_this_thread(cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def physical_core_count() -> int:
    """Physical cores usable by this process (logical CPUs when that cannot be told)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except ImportError:
        physical = logical
    return max(1, min(logical, physical))


@dataclass
class _ExpertWork:
    """The pairs routed to one expert: its host-store index, and where its token rows and
    routing weights lie in the plan's `_Pairs`."""

    expert: int
    start: int
    count: int
    act_row: int = 0  # native path: first row of this expert's activations in the workspace


@dataclass
class _Pairs:
    """A call's (token, expert) pairs grouped by expert: token rows [P] int64, weights [P] fp32;
    the result row of each native activation row (the native experts' pairs, in their order);
    and each pair's result row (its token's, unless the call maps rows: submit's `out_rows`)."""

    tokens: torch.Tensor
    weights: torch.Tensor
    native_tokens: torch.Tensor
    out_tokens: torch.Tensor

    def of(self, work: _ExpertWork) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token rows, weights, result rows) of one expert's pairs."""
        rows = slice(work.start, work.start + work.count)
        return self.tokens[rows], self.weights[rows], self.out_tokens[rows]


# Words of a native job's state block (JOB_* in csrc/cpu_pool.c): threads done, the counter of
# whole experts (a read job's sum), the barrier, the error, busy nanoseconds; then two claim
# counters per expert.
JOB_DONE, JOB_NEXT_EXPERT, JOB_BARRIER, JOB_ERROR, JOB_BUSY_NS, JOB_CLAIMS = range(6)


def job_state(num_experts: int = 0) -> array.array:
    """A zeroed state block for a native job of `num_experts` experts (a read job has none)."""
    return array.array("q", bytes(8 * (JOB_CLAIMS + 2 * num_experts)))


def _tensor_of(values: array.array, dtype: torch.dtype) -> torch.Tensor:
    """A tensor on `values`' memory: 2 us, where torch.tensor of a list takes 7."""
    return torch.frombuffer(values, dtype=dtype) if values else torch.empty(0, dtype=dtype, device="cpu")


def _as(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, contiguous (itself where it is: an attribute check costs less than a no-op to())."""
    return (tensor if tensor.dtype == dtype else tensor.to(dtype)).contiguous()


def _address(tensor: torch.Tensor | None) -> tuple[int, int]:
    """A tensor's first byte and its bytes per expert (dimension 0); zeros for none."""
    if tensor is None:
        return 0, 0
    return tensor.data_ptr(), tensor.stride(0) * tensor.element_size()


def _grouped_in_lists(topk_ids, topk_weights, slot_of_expert, out_rows) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """CpuExpertExecutor._grouped without the extension."""
    table = slot_of_expert.tolist()
    groups: dict[int, list[tuple[int, float]]] = {}
    for token, (ids, weights) in enumerate(zip(topk_ids.tolist(), topk_weights.tolist())):
        for expert, weight in zip(ids, weights):
            if expert >= 0 and table[expert] >= 0:
                groups.setdefault(table[expert], []).append((token, weight))
    grouped = [pair for pairs in groups.values() for pair in pairs]
    tokens = _tensor_of(array.array("q", [token for token, _ in grouped]), torch.int64)
    weights = _tensor_of(array.array("f", [weight for _, weight in grouped]), torch.float32)
    return tokens, weights, tokens if out_rows is None else out_rows[tokens], \
        [(slot, len(pairs)) for slot, pairs in groups.items()]


class InjectedFault(RuntimeError):
    """The test-only fault of `CpuExpertExecutor.fail_every`."""

    def __init__(self, every: int | None) -> None:
        super().__init__(f"injected CPU executor fault (every {every} jobs)")


class _Workspace:
    """Buffers of one lane, reused across calls; reallocated only when they must grow. The
    result buffer is pinned when it is copied to a CUDA device."""

    def __init__(self, pin_result: bool = False) -> None:
        self._buffers: dict[str, torch.Tensor] = {}
        self._pin_result = pin_result

    def buffer(self, name: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        buffer = self._buffers.get(name)
        needed = shape[0] * shape[1]
        if buffer is None or buffer.dtype != dtype or buffer.numel() < needed:
            grown = 2 * buffer.numel() if buffer is not None and buffer.dtype == dtype else 0
            buffer = torch.empty(max(needed, grown), dtype=dtype, device="cpu",
                                 pin_memory=self._pin_result and name == "out")
            self._buffers[name] = buffer
        return buffer[:needed].view(shape)


class _NativeJob:
    """A job on the native kernels' threads: its plan of experts (addresses, see csrc/cpu_pool.c)
    and state block, and every tensor whose memory the threads use, kept alive until it is done."""

    def __init__(self, kernels: ModuleType, pool: int, state: array.array, keep_alive: tuple,
                 on_done: Callable[[float], None]) -> None:
        self._kernels, self._pool, self._state, self._keep_alive = kernels, pool, state, keep_alive
        self._on_done = on_done  # called once with the thread-seconds the job took
        self._lock = threading.Lock()
        self._error: int | None = None

    def wait(self) -> int:
        """The job's error code once it is done (0: none); from any thread, any number of times."""
        if self._error is None:
            self._kernels.pool_wait(self._pool, self._state.buffer_info()[0])
            with self._lock:
                if self._error is None:
                    self._error = self._state[JOB_ERROR]
                    self._on_done(self._state[JOB_BUSY_NS] / 1e9)
                    self._keep_alive = ()
        return self._error


class CpuJob:
    """The pending result [T, H] (x's dtype) of one layer's CPU experts: a view of the executor's
    workspace, to be used before its lane's next `submit`."""

    def __init__(self, executor: CpuExpertExecutor, native: _NativeJob | None, torch_part: Future | None,
                 out: torch.Tensor, native_out: torch.Tensor | None, native_tokens: torch.Tensor) -> None:
        self._executor = executor
        self._native = native
        self._torch_part = torch_part
        self._out = out
        self._native_out = native_out  # a row per native pair, weighted, for the tokens native_tokens
        self._native_tokens = native_tokens
        self._released: object | None = None  # an event: the copy of the result that reads the workspace

    def wait_native(self) -> int:
        """The native job's error code once it is done (0: none, or no native job)."""
        return self._native.wait() if self._native is not None else 0

    def owns(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` is this job's result buffer (the lane's workspace)."""
        return tensor.data_ptr() == self._out.data_ptr()

    def release_after(self, event: object) -> None:
        """An asynchronous copy reads the result until `event` completes: the lane's next
        job must not overwrite it before."""
        self._released = event

    def wait_released(self) -> None:
        """Until the lane's workspace is free: the native threads and any copy of the result done."""
        self.wait_native()
        if self._released is not None:
            self._released.synchronize()
            self._released = None

    def result(self) -> torch.Tensor:
        errors, pieces = [], []
        if self.wait_native():
            errors.append(InjectedFault(self._executor.fail_every))
        elif self._native_out is not None:
            pieces.append((self._native_tokens, self._native_out))
        if self._torch_part is not None:
            try:
                pieces.extend(self._torch_part.result())
            except Exception as exc:  # noqa: BLE001 - re-raised below for this job only
                errors.append(exc)
        if errors:
            raise errors[0]
        return self._sum_rows(pieces)

    def _sum_rows(self, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """out[t] = the sum of the pieces' fp32 rows of token t: in the native kernels where they
        are, as torch's zero_, to() and index_add_ on a decode step's rows wake torch's OpenMP
        threads, which then spin on the cores for milliseconds (see csrc/cpu_experts.c)."""
        out, kernels = self._out, self._executor.kernels
        if kernels is None or out.dtype not in NATIVE_DTYPES or not pieces:
            total = torch.zeros(out.shape, dtype=torch.float32, device="cpu")
            for tokens, rows in pieces:
                total.index_add_(0, tokens, rows)
            return out.copy_(total)
        tokens = torch.cat([t for t, _ in pieces]) if len(pieces) > 1 else pieces[0][0]
        rows = torch.cat([r for _, r in pieces]) if len(pieces) > 1 else pieces[0][1]
        kernels.sum_rows(NATIVE_DTYPES[out.dtype], out.data_ptr(), out.shape[0], rows.data_ptr(), tokens.data_ptr(),
                         rows.shape[0], out.shape[1])
        return out


class CpuExpertExecutor:
    """`num_threads` threads of the native kernels' own, and one Python thread for torch
    experts, that run routed experts held in host memory."""

    def __init__(self, num_threads: int, native_max_tokens: int | None = None, use_native: bool = True,
                 whole_experts_from: int = GROUP_MIN_EXPERTS_PER_THREAD, pin_memory: bool = False,
                 fail_every: int | None = None, cores: Sequence[int] | None = None) -> None:
        """`pin_memory`: results go to a CUDA device (pinned result buffers); `fail_every`:
        tests only, every n-th job fails in a worker thread; `cores`: the CPUs the threads are
        pinned to (None: wherever the creating thread may run)."""
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.num_threads = num_threads
        self.kernels = native_kernels() if use_native else None
        self.amx = self.kernels is not None and self.kernels.isa()["amx_bf16"]  # bf16 with 3+ tokens on AMX tiles
        self.native_max_tokens = NATIVE_MAX_TOKENS[self.amx] if native_max_tokens is None else native_max_tokens
        self.whole_experts_from = whole_experts_from  # native experts per thread from which threads take whole ones
        self.cores = tuple(cores) if cores is not None else None
        with _threads_pinned_to(self.cores):
            self._native_pool = self.kernels.pool_create(num_threads) if self.kernels is not None else 0
        self._close_native_pool = weakref.finalize(self, self.kernels.pool_destroy, self._native_pool) \
            if self.kernels is not None else None
        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="daop-cpu-torch",
                                                initializer=_pin_this_thread, initargs=(self.cores,))
        self.busy_seconds = 0.0  # thread-seconds spent on expert work
        self._busy_lock = threading.Lock()
        self.fail_every = fail_every
        self.jobs_submitted = 0
        self._workspaces = [_Workspace(pin_memory) for _ in range(NUM_LANES)]
        self._pending: list[CpuJob | None] = [None] * NUM_LANES  # each lane's last job
        self._checked_tables: dict[int, tuple[weakref.ref, tuple[int, int]]] = {}

    @property
    def kernel_name(self) -> str:
        if self.kernels is None:
            return "torch"
        isa = self.kernels.isa()
        vector = "avx512-bf16" if isa["avx512_bf16"] else "avx512f" if isa["avx512f"] else "portable C"
        amx = ", bf16 with 3+ tokens on AMX" if self.amx else ""
        return f"native ({vector}{amx}) up to {self.native_max_tokens} tokens per expert, torch beyond"

    def submit(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        w13: ExpertWeights,
        w2: ExpertWeights,
        slot_of_expert: torch.Tensor,
        lane: int = 0,
        out: torch.Tensor | None = None,
        out_rows: torch.Tensor | None = None,
        routing: tuple[SoftmaxTopK, torch.Tensor] | None = None,
    ) -> CpuJob:
        """Start computing the experts that `slot_of_expert` maps, for all tokens routed to
        them (expert ids < 0 in `topk_ids` are skipped). All tensors are on the CPU; see
        `routed_experts_forward` for their layouts; w13 and w2 are tensors of x's dtype or both
        quantized (quantized_experts.py). Jobs in flight at the same time must use
        different lanes (each lane has its own workspaces); a lane's previous result must have
        been used before the lane is submitted to again, unless it goes to `out` (a [T, H] tensor
        of x's dtype the caller owns). `out_rows` [T] (with `out` [R, H]): the row of the
        result each row of x adds into, where several rows sum into one. `routing` (router,
        logits [T, E]; topk_ids and topk_weights None): the job routes the tokens itself, where
        `routes_in_job` says it can."""
        x = x.contiguous()
        tokens, hidden = x.shape
        # The native kernels trust these: check them here, in the caller's thread.
        assert w13.is_contiguous() and w2.is_contiguous(), "expert weights must be contiguous"
        assert isinstance(w13, QuantizedWeights) == isinstance(w2, QuantizedWeights), "w13 and w2 quantized alike"
        assert w13.shape[2] == hidden and w2.shape[:2] == (w13.shape[0], hidden) and w13.shape[1] == 2 * w2.shape[2], (
            f"x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} do not fit together"
        )
        self._check_slot_table(slot_of_expert, w13.shape[0])
        if self._pending[lane] is not None:
            self._pending[lane].wait_released()  # its threads or its result's copy may still use the workspace
        workspace = self._workspaces[lane]
        assert out_rows is None or out is not None, "out_rows needs `out`, which has the result's rows"
        pairs, native, by_torch = self._plan(x, topk_ids, topk_weights, w13, slot_of_expert, out_rows, routing)
        if out is None:
            out = workspace.buffer("out", (tokens, hidden), x.dtype)
        self.jobs_submitted += 1
        inject = self.fail_every is not None and self.jobs_submitted % self.fail_every == 0
        native_job = native_out = None
        if native:
            native_job, native_out = self._post_native(workspace, native, pairs, x, w13, w2, inject)
        torch_part = None
        if by_torch or (inject and native_job is None):
            torch_part = self._torch_thread.submit(self._run_torch, native_job, by_torch, pairs, x, w13, w2,
                                                   inject and native_job is None)
        job = CpuJob(self, native_job, torch_part, out, native_out, pairs.native_tokens)
        self._pending[lane] = job
        return job

    def routes_in_job(self, router: object, router_logits: torch.Tensor) -> bool:
        """Whether a job can route `router_logits` [T, E] itself as `router` would (submit's
        `routing`): a softmax top-k router, in the extension (cpu_router.cpp; the experts
        torch.topk picks, ties included), so that a layer routes in C just before its pairs are
        grouped instead of in two torch ops of more than a microsecond each."""
        return (self.kernels is not None and isinstance(router, SoftmaxTopK) and router_logits.dim() == 2
                and router_logits.dtype in NATIVE_DTYPES)

    def _check_slot_table(self, slot_of_expert: torch.Tensor, num_slots: int) -> None:
        """Every slot the table names lies in the weights; checked once per table and version
        (a table is the same from call to call, and its max costs as much as a tiny expert).
        An inference tensor has no version: it is checked at every call."""
        key = None if slot_of_expert.is_inference() else (slot_of_expert._version, num_slots)
        checked = self._checked_tables.get(id(slot_of_expert))
        if key is not None and checked is not None and checked[0]() is slot_of_expert and checked[1] == key:
            return
        assert int(slot_of_expert.max()) < num_slots, f"slot table points past {num_slots} experts"
        if key is None:
            return
        if len(self._checked_tables) >= _CHECKED_TABLES_KEPT:  # tables made per call: forget the dead ones
            self._checked_tables = {k: v for k, v in self._checked_tables.items() if v[0]() is not None}
        self._checked_tables[id(slot_of_expert)] = (weakref.ref(slot_of_expert), key)

    def _post_native(self, workspace, native, pairs, x, w13, w2, fail) -> tuple[_NativeJob, torch.Tensor]:
        """Lay the native experts out in the workspace and start them on the native threads;
        returns the job and the rows its weighted outputs go to."""
        hidden, inter, item = x.shape[1], w2.shape[2], x.element_size()
        (w13_data, w13_scales, weight_format), (w2_data, w2_scales, _) = weight_parts(w13), weight_parts(w2)
        rows = native[-1].act_row + native[-1].count
        act = workspace.buffer("act", (rows, inter), x.dtype)  # the kernels write every element of these two
        native_out = workspace.buffer("native_out", (rows, hidden), torch.float32)
        # The plan and state as arrays, not tensors made from lists (~7 us each): with the pairs
        # the same way (_plan), a tiny expert's call took 74 us instead of 141.
        state = job_state(len(native))
        tokens, weights = pairs.tokens.data_ptr(), pairs.weights.data_ptr()
        (w13_base, w13_stride), (w2_base, w2_stride) = _address(w13_data), _address(w2_data)
        (s13_base, s13_stride), (s2_base, s2_stride) = _address(w13_scales), _address(w2_scales)
        act_base, out_base = act.data_ptr(), native_out.data_ptr()
        plan = array.array("q")
        for work in native:  # PLAN_* in cpu_pool.c
            plan.extend((w13_base + work.expert * w13_stride, w2_base + work.expert * w2_stride,
                         tokens + 8 * work.start, work.count, act_base + work.act_row * inter * item,
                         out_base + work.act_row * hidden * 4, weights + 4 * work.start,
                         s13_base + work.expert * s13_stride, s2_base + work.expert * s2_stride))
        whole_experts = takes_whole_experts(len(native), self.num_threads, self.whole_experts_from)
        self.kernels.pool_post(self._native_pool, NATIVE_DTYPES[x.dtype], weight_format, inter, hidden, x.data_ptr(),
                               hidden, plan.buffer_info()[0], len(native), int(whole_experts), int(fail),
                               state.buffer_info()[0])
        job = _NativeJob(self.kernels, self._native_pool, state, (plan, x, pairs, act, native_out, w13, w2),
                         self._add_busy)
        return job, native_out

    def _plan(self, x, topk_ids, topk_weights, w13, slot_of_expert, out_rows, routing) -> tuple[
            _Pairs, list[_ExpertWork], list[_ExpertWork]]:
        """Group the pairs by host expert (each expert's token rows, in order, and weights are a
        range of tensors made once per call) and split the experts into native work (laid out in
        the activation workspace) and torch work."""
        tokens, weights, out_tokens, groups = self._grouped(topk_ids, topk_weights, slot_of_expert, w13.shape[0],
                                                            out_rows, routing)
        native_ok = self.kernels is not None and x.dtype in NATIVE_DTYPES and (
            isinstance(w13, QuantizedWeights) or w13.dtype == x.dtype)
        limit = max(self.native_max_tokens, QUANTIZED_NATIVE_MAX_TOKENS) if isinstance(w13, QuantizedWeights) \
            else self.native_max_tokens
        native, by_torch, start, act_rows = [], [], 0, 0
        for expert, count in groups:
            work = _ExpertWork(expert, start, count)
            start += count
            if native_ok and count <= limit:
                work.act_row = act_rows
                act_rows += count
                native.append(work)
            else:
                by_torch.append(work)
        native_tokens = out_tokens  # the result row of each native activation row
        if by_torch:
            native_tokens = torch.cat([out_tokens[w.start:w.start + w.count] for w in native]) if native \
                else out_tokens[:0]
        return _Pairs(tokens, weights, native_tokens, out_tokens), native, by_torch

    def _grouped(self, topk_ids, topk_weights, slot_of_expert, num_slots: int, out_rows, routing=None) -> tuple[
            torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """The pairs grouped by the slot `slot_of_expert` maps their expert to, slots in the
        order they first appear, each slot's pairs in token order: (token rows [P], weights [P]
        fp32, result rows [P] (out_rows of the tokens, or the tokens), (slot, pairs) per slot).
        In the extension (a decode step's pairs in about a microsecond, a prompt's thousands
        without a Python loop over them), routed there first with `routing`; without it, plain
        lists, which group tens to hundreds of pairs faster than tensor ops."""
        if self.kernels is None:
            return _grouped_in_lists(topk_ids, topk_weights, slot_of_expert, out_rows)
        if routing is not None:
            (ids, weights), (rows, top_k) = self._routed(*routing)
            ids_address, weights_address = ids.buffer_info()[0], weights.buffer_info()[0]
        else:
            ids, weights = _as(topk_ids, torch.int64), _as(topk_weights, torch.float32)
            (rows, top_k), ids_address, weights_address = ids.shape, ids.data_ptr(), weights.data_ptr()
        table = _as(slot_of_expert, torch.int64)
        out_rows = None if out_rows is None else _as(out_rows, torch.int64)
        pairs = rows * top_k
        tokens, pair_weights, result_rows = (array.array(code, bytes(size * pairs)) for code, size in
                                             (("q", 8), ("f", 4), ("q", 8)))
        slots, counts = array.array("q", bytes(8 * num_slots)), array.array("q", bytes(8 * num_slots))
        groups = self.kernels.group_pairs(
            ids_address, weights_address, rows, top_k, table.data_ptr(), table.numel(), num_slots,
            0 if out_rows is None else out_rows.data_ptr(),
            tokens.buffer_info()[0], pair_weights.buffer_info()[0], result_rows.buffer_info()[0],
            slots.buffer_info()[0], counts.buffer_info()[0])
        kept = sum(counts[:groups])
        for values in (tokens, pair_weights, result_rows):
            del values[kept:]  # cheaper than slicing the tensors
        return (_tensor_of(tokens, torch.int64), _tensor_of(pair_weights, torch.float32),
                _tensor_of(result_rows, torch.int64), list(zip(slots[:groups], counts[:groups])))

    def _routed(self, router: SoftmaxTopK, router_logits: torch.Tensor) -> tuple[tuple[array.array, array.array],
                                                                                tuple[int, int]]:
        """(ids, weights) of `router` on `router_logits` [T, E], as arrays [T * K], and (T, K)."""
        logits = router_logits.contiguous()
        rows, num_experts = logits.shape
        ids, weights = array.array("q", bytes(8 * rows * router.top_k)), array.array("f", bytes(4 * rows * router.top_k))
        self.kernels.route_softmax_topk(logits.data_ptr(), NATIVE_DTYPES[logits.dtype], rows, num_experts, router.top_k,
                                        router.renormalize, ids.buffer_info()[0], weights.buffer_info()[0])
        return (ids, weights), (rows, router.top_k)

    def _run_torch(self, native_job, by_torch, pairs, x, w13, w2, inject_fault) -> list:
        """The torch experts, one after another, after the native job (both at once would
        oversubscribe the cores); their weighted outputs go back as (tokens, values)."""
        if native_job is not None:
            native_job.wait()
        if torch.get_num_threads() == 1 < self.num_threads:
            # vLLM's GPU worker sets torch's threads to 1 for serving (set_torch_threads_for_runtime:
            # its own CPU ops are small), which a thread that starts using torch afterwards
            # inherits; these matmuls are the executor's prefill-sized work. Threads that already
            # use torch (the caller's) keep their count; ones that start later get this one.
            torch.set_num_threads(self.num_threads)
        start = time.perf_counter()
        try:
            if inject_fault:
                raise InjectedFault(self.fail_every)
            results = []
            for work in by_torch:
                tokens, weights, out_tokens = pairs.of(work)
                results.append((out_tokens, expert_mlp(x[tokens], w13[work.expert], w2[work.expert]).float()
                                * weights[:, None]))
            return results
        finally:
            self._add_busy(time.perf_counter() - start)

    def _add_busy(self, seconds: float) -> None:
        with self._busy_lock:
            self.busy_seconds += seconds

    def shutdown(self) -> None:
        for job in self._pending:
            if job is not None:
                job.wait_native()
        self._torch_thread.shutdown(wait=True)
        if self._close_native_pool is not None:
            self._close_native_pool()

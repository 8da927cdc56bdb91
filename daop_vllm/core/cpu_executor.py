"""Computes host-resident experts on the CPU, on threads of its own.

The caller submits one layer's CPU work and goes on with the device work; `CpuJob.result()`
waits. Two paths, chosen per expert by how many tokens it got:

- native (decode-sized and short prefills: up to `native_max_tokens` tokens, fp32/bf16, when the
  C extension is built), in one of two layouts. Few experts (fewer than `GROUP_MIN_EXPERTS_PER_THREAD` per
  thread: Mixtral's 2-8 large ones): the threads share each expert's gate/up rows, wait at a
  barrier, then share the output columns of each down projection; they claim rows piece by
  piece from a counter per expert and phase, so that a thread the machine slows down does less.
  Many experts (Qwen-MoE's and DeepSeek's dozens of small ones): the threads take whole experts
  in turn from one list, no barrier: two native calls per expert instead of two per expert and
  thread. Either way each weight byte is read once per call (this path runs at memory
  bandwidth), and each expert's weighted outputs go to rows of their own (no two threads add
  into one element), which the caller adds into the result by token.
- torch (more tokens, other dtypes, or no extension): the first thread runs these experts one
  after another with torch matmuls, which spread over the cores themselves (oneDNN/AMX where
  available); more threads calling torch at once would oversubscribe the cores.

The C kernels release the GIL, so the threads run in parallel with each other and the caller.
An exception in any thread fails that job only (the barrier is broken so no thread waits
forever) and the executor keeps serving.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType

import torch

from daop_vllm.core.cpu_kernels import NATIVE_DTYPES, native_kernels
from daop_vllm.core.expert_math import expert_mlp

# Up to this many tokens per expert the native kernel beats torch's matmul on our development
# machine (benchmarks/results/cpu_experts_*.json); beyond it torch's AMX/oneDNN path wins. With
# AMX (64 tokens meet each weight tile at once) it was 1.9x torch at 32 tokens, 1.33x at 64 and
# 0.96x at 128 (medians of three runs); AVX-512 alone is bound by its dot-product instructions
# from 3 tokens.
NATIVE_MAX_TOKENS = {True: 64, False: 4}  # by: the CPU has AMX
# With at least this many native experts per thread, threads take whole experts instead of a
# slice of every expert. Decode-sized experts cost their weight bytes, the same for all of an
# engine's experts, so handing them out in turn balances the threads.
GROUP_MIN_EXPERTS_PER_THREAD = 2
# Workspace lanes: the layer's own CPU work, and pre-computations for even and odd layers
# (at layer i, layer i's pre-computed results and layer i+1's pre-computation are both in flight).
NUM_LANES = 3


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
    and the token of each native activation row (the native experts' pairs, in their order)."""

    tokens: torch.Tensor
    weights: torch.Tensor
    native_tokens: torch.Tensor

    def of(self, work: _ExpertWork) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(work.start, work.start + work.count)
        return self.tokens[rows], self.weights[rows]


class InjectedFault(RuntimeError):
    """The test-only fault of `CpuExpertExecutor.fail_every`."""


class _Workspace:
    """Buffers of one lane, reused across calls; reallocated only when they must grow."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        buffer = self._buffers.get(name, torch.empty(0, dtype=dtype))
        needed = shape[0] * shape[1]
        if buffer.dtype != dtype or buffer.numel() < needed:
            buffer = torch.empty(max(needed, 2 * buffer.numel() if buffer.dtype == dtype else needed), dtype=dtype)
            self._buffers[name] = buffer
        return buffer[:needed].view(shape)


class CpuJob:
    """The pending result [T, H] (x's dtype) of one layer's CPU experts: a view of the executor's
    workspace, to be used before its lane's next `submit`."""

    def __init__(self, parts: list[Future], out: torch.Tensor, native_out: torch.Tensor | None,
                 native_tokens: torch.Tensor, kernels: ModuleType | None) -> None:
        self._parts = parts
        self._out = out
        self._native_out = native_out  # a row per native pair, weighted, for the tokens native_tokens
        self._native_tokens = native_tokens
        self._kernels = kernels

    def result(self) -> torch.Tensor:
        errors, pieces = [], []
        if self._native_out is not None:
            pieces.append((self._native_tokens, self._native_out))
        for part in self._parts:
            try:
                pieces.extend(part.result())
            except threading.BrokenBarrierError:
                pass  # a consequence of another thread's error, which is reported instead
            except Exception as exc:  # noqa: BLE001 - re-raised below for this job only
                errors.append(exc)
        if errors:
            raise errors[0]
        return self._sum_rows(pieces)

    def _sum_rows(self, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """out[t] = the sum of the pieces' fp32 rows of token t: in the native kernels where they
        are, as torch's zero_, to() and index_add_ on a decode step's rows wake torch's OpenMP
        threads, which then spin on the cores for milliseconds (see csrc/cpu_experts.c)."""
        out = self._out
        if self._kernels is None or out.dtype not in NATIVE_DTYPES or not pieces:
            total = torch.zeros(out.shape, dtype=torch.float32)
            for tokens, rows in pieces:
                total.index_add_(0, tokens, rows)
            return out.copy_(total)
        tokens = torch.cat([t for t, _ in pieces]) if len(pieces) > 1 else pieces[0][0]
        rows = torch.cat([r for _, r in pieces]) if len(pieces) > 1 else pieces[0][1]
        self._kernels.sum_rows(NATIVE_DTYPES[out.dtype], out.data_ptr(), out.shape[0], rows.data_ptr(),
                               tokens.data_ptr(), rows.shape[0], out.shape[1])
        return out


class CpuExpertExecutor:
    """A pool of `num_threads` threads that run routed experts held in host memory."""

    def __init__(self, num_threads: int, native_max_tokens: int | None = None, use_native: bool = True,
                 whole_experts_from: int = GROUP_MIN_EXPERTS_PER_THREAD) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        self.num_threads = num_threads
        self.kernels = native_kernels() if use_native else None
        self.amx = self.kernels is not None and self.kernels.isa()["amx_bf16"]  # bf16 with 3+ tokens on AMX tiles
        self.native_max_tokens = NATIVE_MAX_TOKENS[self.amx] if native_max_tokens is None else native_max_tokens
        self.whole_experts_from = whole_experts_from  # native experts per thread from which threads take whole ones
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="daop-cpu")
        self.busy_seconds = 0.0  # thread-seconds spent on expert work (each thread adds its own)
        self._busy_lock = threading.Lock()
        self.fail_every: int | None = None  # tests only: every n-th job raises in a worker thread
        self._jobs = 0
        self._workspaces = [_Workspace() for _ in range(NUM_LANES)]

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
        w13: torch.Tensor,
        w2: torch.Tensor,
        slot_of_expert: torch.Tensor,
        lane: int = 0,
    ) -> CpuJob:
        """Start computing the experts that `slot_of_expert` maps, for all tokens routed to
        them (expert ids < 0 in `topk_ids` are skipped). All tensors are on the CPU; see
        `routed_experts_forward` for their layouts. Jobs in flight at the same time must use
        different lanes (each lane has its own workspaces); a lane's previous result must have
        been used before the lane is submitted to again."""
        x = x.contiguous()
        tokens, hidden = x.shape
        # The native kernels trust these: check them here, in the caller's thread.
        assert w13.is_contiguous() and w2.is_contiguous(), "expert weights must be contiguous"
        assert w13.shape[2] == hidden and w2.shape[:2] == (w13.shape[0], hidden) and w13.shape[1] == 2 * w2.shape[2], (
            f"x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} do not fit together"
        )
        assert int(slot_of_expert.max()) < w13.shape[0], f"slot table points past {w13.shape[0]} experts"
        workspace = self._workspaces[lane]
        pairs, native, by_torch = self._plan(x, topk_ids, topk_weights, w13, slot_of_expert)
        whole_experts = len(native) >= self.whole_experts_from * self.num_threads
        out = workspace.buffer("out", (tokens, hidden), x.dtype)
        act = native_out = None
        if native:  # the kernels write every element of these
            native_rows = native[-1].act_row + native[-1].count
            act = workspace.buffer("act", (native_rows, w2.shape[2]), x.dtype)
            native_out = workspace.buffer("native_out", (native_rows, hidden), torch.float32)
        barrier = threading.Barrier(self.num_threads) if native and not whole_experts else None
        # Row counters, gate/up and down of each expert, which the threads claim rows from.
        claims = workspace.buffer("claims", (len(native), 2), torch.int64).zero_() if barrier else None
        shared_experts = iter(native)  # whole experts: each thread takes the next one left
        self._jobs += 1
        inject = self.fail_every is not None and self._jobs % self.fail_every == 0
        parts = []
        for part in range(self.num_threads):
            if whole_experts:
                run_native = functools.partial(self._whole_experts, shared_experts, native_out)
            elif native:
                run_native = functools.partial(self._expert_slices, barrier, claims, native, native_out)
            else:
                run_native = None
            parts.append(self._pool.submit(self._run_part, run_native, barrier, by_torch if part == 0 else [], pairs,
                                           x, w13, w2, act, inject and part == 0))
        return CpuJob(parts, out, native_out, pairs.native_tokens, self.kernels)

    def _plan(self, x, topk_ids, topk_weights, w13, slot_of_expert) -> tuple[_Pairs, list[_ExpertWork],
                                                                             list[_ExpertWork]]:
        """Group the pairs by host expert (each expert's token rows, in order, and weights are a
        range of two tensors made once per call: a decode step has tens to hundreds of pairs,
        which plain lists group faster than tensor ops), and split the experts into native work
        (laid out in the activation workspace) and torch work."""
        table = slot_of_expert.tolist()
        groups: dict[int, list[tuple[int, float]]] = {}
        for token, (ids, weights) in enumerate(zip(topk_ids.tolist(), topk_weights.tolist())):
            for expert, weight in zip(ids, weights):
                if expert >= 0 and table[expert] >= 0:
                    groups.setdefault(table[expert], []).append((token, weight))
        grouped = [pair for pairs in groups.values() for pair in pairs]
        tokens = torch.tensor([token for token, _ in grouped], dtype=torch.int64)
        weights = torch.tensor([weight for _, weight in grouped], dtype=torch.float32)
        native_ok = self.kernels is not None and x.dtype in NATIVE_DTYPES and w13.dtype == x.dtype
        native, by_torch, native_tokens, start = [], [], [], 0
        for expert, expert_pairs in groups.items():
            work = _ExpertWork(expert, start, len(expert_pairs))
            start += work.count
            if native_ok and work.count <= self.native_max_tokens:
                work.act_row = len(native_tokens)
                native_tokens.extend(token for token, _ in expert_pairs)
                native.append(work)
            else:
                by_torch.append(work)
        return _Pairs(tokens, weights, torch.tensor(native_tokens, dtype=torch.int64)), native, by_torch

    def _run_part(self, run_native, barrier, torch_share, pairs, x, w13, w2, act, inject_fault=False) -> list:
        """One thread's share: its part of the native work, then (first thread) the torch
        experts, whose weighted outputs go back as (tokens, values) for the caller to add."""
        start = time.perf_counter()
        try:
            if inject_fault:
                raise InjectedFault(f"injected CPU executor fault (every {self.fail_every} jobs)")
            if run_native is not None:
                run_native(pairs, x, w13, w2, act)
            results = []
            for work in torch_share:
                tokens, weights = pairs.of(work)
                results.append((tokens, expert_mlp(x[tokens], w13[work.expert], w2[work.expert]).float()
                                * weights[:, None]))
            return results
        except threading.BrokenBarrierError:
            raise
        except BaseException:
            if barrier is not None:
                barrier.abort()
            raise
        finally:
            with self._busy_lock:
                self.busy_seconds += time.perf_counter() - start

    def _expert_slices(self, barrier, claims, native, native_out, pairs, x, w13, w2, act) -> None:
        """Rows of every expert's gate/up, then columns of every down projection, claimed from
        the experts' counters."""
        counters = claims.data_ptr()
        for k, work in enumerate(native):
            self._gate_up(work, pairs, x, w13, act, counters + 16 * k)
        barrier.wait()  # the down projection needs every row of the activations
        for k, work in enumerate(native):
            self._down(work, pairs, w2, act, native_out, counters + 16 * k + 8)

    def _whole_experts(self, shared_experts, native_out, pairs, x, w13, w2, act) -> None:
        """Whole experts, taken in turn from the list the threads share."""
        for work in shared_experts:
            self._gate_up(work, pairs, x, w13, act)
            self._down(work, pairs, w2, act, native_out)

    # Addresses by arithmetic rather than indexing: a tensor view per expert and thread costs
    # microseconds, and steps of DeepSeek or Qwen-MoE have dozens of experts. `claim`: the address
    # of the counter the threads claim rows from, or 0 for all rows.
    def _gate_up(self, work, pairs, x, w13, act, claim=0) -> None:
        hidden, inter, item = x.shape[1], w13.shape[1] // 2, x.element_size()
        self.kernels.gate_up_act(NATIVE_DTYPES[x.dtype], w13.data_ptr() + work.expert * w13.stride(0) * item, inter,
                                  hidden, x.data_ptr(), hidden, pairs.tokens.data_ptr() + 8 * work.start, work.count,
                                  act.data_ptr() + work.act_row * inter * item, inter, claim)

    def _down(self, work, pairs, w2, act, native_out, claim=0) -> None:
        """Into the expert's own rows of `native_out` (those of its activations)."""
        hidden, inter, item = w2.shape[1], w2.shape[2], act.element_size()
        self.kernels.down_weighted(NATIVE_DTYPES[act.dtype], w2.data_ptr() + work.expert * w2.stride(0) * item,
                                    inter, hidden, act.data_ptr() + work.act_row * inter * item, inter,
                                    pairs.weights.data_ptr() + 4 * work.start, work.count,
                                    native_out.data_ptr() + work.act_row * hidden * 4, hidden, claim)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)

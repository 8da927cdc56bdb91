"""A trace-driven simulator: real routing replayed through the engine's own placement,
re-allocation, prediction and degradation code, with a cost model of a GPU machine.

Time per step comes from two clocks, as the engine overlaps work: the device (attention and
resident experts, layer after layer) and the CPU executor (a FIFO queue of jobs: a layer's own
CPU experts, then the pre-computation for the next layer). A layer ends when its device work,
its own CPU job and the pre-computed job it consumes are all done. PCIe copies (LRU and
on-demand misses) delay the device work that needs them; re-allocation copies overlap (the
engine copies on a side stream) and only count as bytes.

Under tensor parallelism over N GPUs the clocks are one GPU's (rank's): every rank routes alike and
holds the same experts, each as 1/N of its intermediate rows, so all ranks do the same work at once
and wait for each other in two all-reduces per layer (after attention and after the MoE layer).

Legend: L layers, E experts, K top-k, B sequences in flight.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from daop_vllm.core.batch import StepBatch
from daop_vllm.core.engine import DaopEngine
from daop_vllm.core.hardware import FORMAT_READ_SHARE, OUR_CPU_EFFICIENCY, TORCH_CPU_EFFICIENCY, Hardware
from daop_vllm.core.placement import plan_residency, rank_pairs
from daop_vllm.core.prediction import Fidelity, degrade
from daop_vllm.core.routing import SoftmaxTopK
from daop_vllm.core.streaming import expert_costs, layer_timeline, plan_early_staging, plan_streaming
from daop_vllm.offline.model_shapes import MoEShape
from daop_vllm.offline.trace_analysis import calibrate_profile, split_sequence
from daop_vllm.offline.traces import TraceSequence

# The paper's Mixtral figure (../shared/reference/daop.md).
PAPER_PREDICTION_ACCURACY = 0.8411
# An all-reduce's cost beside its bytes (launch and synchronisation): about NCCL's latency for
# small messages between two GPUs, NVLink or PCIe alike (not measured here).
ALLREDUCE_LATENCY_S = 10e-6


@dataclass(frozen=True)
class Policy:
    name: str
    placement: str  # "all" (every expert resident), "profile", "none"
    misses: str  # host-resident experts: "cpu" (computed there), "lru" (copied, cached), "copy" (copied, dropped)
    realloc: str = "off"
    mode: str = "exact"
    cpu_efficiency: float = OUR_CPU_EFFICIENCY
    description: str = ""
    stream: str = "off"  # misses computed on the CPU ("cpu"): streamed through staging slots (streaming.py)

    def resident(self, profile_placement: list[list[int]], num_experts: int) -> list[list[int]]:
        """This policy's initial resident experts per layer, given the profile's placement."""
        if self.placement == "all":
            return [list(range(num_experts)) for _ in profile_placement]
        if self.placement == "none":
            return [[] for _ in profile_placement]
        return profile_placement


_POLICIES = (
    Policy("gpu", "all", "cpu", description="every expert resident (the memory-unlimited bound)"),
    Policy("static", "profile", "cpu", cpu_efficiency=TORCH_CPU_EFFICIENCY,
           description="Fiddler: profile placement, misses computed on the CPU with PyTorch"),
    Policy("lru", "profile", "lru", description="mixtral-offloading: per-layer LRU cache, misses copied"),
    Policy("ondemand", "profile", "copy", description="every miss copied to the device, not kept"),
    Policy("all-cpu", "none", "cpu", description="llama.cpp --cpu-moe: every expert on the CPU"),
    Policy("daop", "profile", "cpu", "paper", "daop", TORCH_CPU_EFFICIENCY,
           description="the paper: re-allocation after prefill, predicted routing, degradation, PyTorch CPU"),
    Policy("auto-exact", "profile", "cpu", "auto", "exact", description="ours: realloc auto, exact"),
    Policy("auto-verified", "profile", "cpu", "auto", "verified", description="ours: realloc auto, verified"),
    Policy("auto-daop", "profile", "cpu", "auto", "daop", description="ours: realloc auto, predicted routing"),
)
POLICIES = {
    p.name: p
    for p in (
        *_POLICIES,
        *(dataclasses.replace(p, name=f"{p.name}+stream", stream="auto",
                              description=f"{p.description}; each miss on the CPU or streamed, whichever ends the "
                                          "layer sooner")
          for p in _POLICIES if p.name.startswith("auto-")),
        Policy("stream-all", "profile", "cpu", stream="all",
               description="vLLM's prefetch offloader: every miss copied through the staging slots, overlapped; "
                           "CPU idle"),
    )
}
BASE_POLICIES = [p.name for p in _POLICIES]  # without streaming (the paper's comparison and our first results)
# Experts a layer may have in flight to the device at once (streaming.py), the same for every
# policy that streams (the engine's option `staging_slots`: rows shared by the layers).
DEFAULT_STAGING_SLOTS = 4


@dataclass
class _Row:
    """One sequence in flight: its routing per phase, [layer][token][k], and its position."""

    index: int
    prefill: list[list[list[int]]]
    decode: list[list[list[int]]]
    position: int = 0  # next decode token

    @property
    def prompt_len(self) -> int:
        return len(self.prefill[0]) if self.prefill else 0

    @property
    def decode_len(self) -> int:
        return max(map(len, self.decode)) if self.decode else 0

    def decode_ids(self, layer: int) -> list[int]:
        rows = self.decode[layer]
        # unaligned traces have fewer rows in some layers: map positions proportionally
        return rows[self.position * len(rows) // self.decode_len]


@dataclass
class _Prompt:
    """A sequence whose prompt is being computed: tokens done, and when its first step began."""

    row: _Row
    done: int = 0
    started: float | None = None


@dataclass
class SimResult:
    output_tokens: int = 0
    seconds: float = 0.0
    hits: dict[str, list[int]] = field(default_factory=lambda: {"prefill": [0, 0], "decode": [0, 0]})
    cpu_expert_tokens: int = 0  # decode (token, expert) pairs computed by the CPU
    streamed: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0})  # experts streamed
    staged_early: int = 0  # decode: experts staged a layer early from the prediction
    staged_early_used: int = 0  # ... of them routed to at their layer
    prefill_step_seconds: float = 0.0  # steps that hold prompt tokens
    prefill_tokens: int = 0
    prompts: int = 0
    time_to_first_token: float = 0.0  # summed over the prompts: their first step's start to their last's end
    precomputed_used: int = 0  # ... of them taken pre-computed
    pcie_bytes: int = 0
    allreduce_seconds: float = 0.0  # tensor parallelism: the ranks' all-reduces, on every step's clock
    predictions: int = 0
    predictions_correct: int = 0

    def summary(self) -> dict[str, float | None]:
        def rate(phase: str) -> float | None:
            device, total = self.hits[phase]
            return device / total if total else None

        tokens = max(1, self.output_tokens)
        return {
            "decode_hit_rate": rate("decode"),
            "prefill_hit_rate": rate("prefill"),
            "tokens_per_s": self.output_tokens / self.seconds if self.seconds else None,
            "cpu_expert_tokens_per_token": self.cpu_expert_tokens / tokens,
            "pcie_bytes_per_token": self.pcie_bytes / tokens,
            "allreduce_s_per_token": self.allreduce_seconds / tokens,
            "prediction_accuracy": self.predictions_correct / self.predictions if self.predictions else None,
            "precomputed_share": self.precomputed_used / self.cpu_expert_tokens if self.cpu_expert_tokens else None,
            "prefill_streamed_experts": self.streamed["prefill"],
            "decode_streamed_experts": self.streamed["decode"],
            "decode_staged_early": self.staged_early,
            "decode_staged_early_used": self.staged_early_used,
            # time to first token, and prompt tokens per second of the steps that hold them
            "mean_prefill_s": self.time_to_first_token / self.prompts if self.prompts else None,
            "prefill_tokens_per_s": (self.prefill_tokens / self.prefill_step_seconds
                                     if self.prefill_step_seconds else None),
        }


def rank_hardware(hardware: Hardware, tensor_parallel: int) -> Hardware:
    """What one of `tensor_parallel` GPUs of a machine has: its own device memory, device rates
    and PCIe link, and its share of the host's memory bandwidth and CPU cores, which the ranks'
    CPU executors divide between them."""
    return dataclasses.replace(hardware, cpu_gbps=hardware.cpu_gbps / tensor_parallel,
                               cpu_tflops=hardware.cpu_tflops / tensor_parallel)


class Simulator:
    """Replays sequences for one policy on one machine model."""

    def __init__(self, policy: Policy, shape: MoEShape, hardware: Hardware, placement: list[list[int]],
                 prediction_accuracy: float = PAPER_PREDICTION_ACCURACY, first_predicted_layer: int = 4,
                 batch: int = 1, seed: int = 0, expert_format: str = "bf16", precomputed_kept: float = 1.0,
                 degrades: bool | None = None, staging_slots: int = DEFAULT_STAGING_SLOTS,
                 max_batched_tokens: int | None = None, tensor_parallel: int = 1,
                 device_expert_format: str | None = None) -> None:
        """`expert_format`: the experts' storage (quantized_experts.py) in host memory: its bytes
        per expert are what the CPU reads; `device_expert_format` (default the same): the
        device's, whose bytes the device reads and every copy moves.
        `precomputed_kept`: the share of predicted rows the staleness gate lets use their
        pre-computed results (and in daop mode their predicted routing); the others' results
        were computed all the same, and the consuming layer computes their experts again.
        `degrades`: the `degrade` option (None: the mode's default). `staging_slots`: experts a
        layer may have in flight to the device when its policy streams. `max_batched_tokens`:
        vLLM's token budget per step (run); None: each prompt whole, in a step of its own.
        `tensor_parallel`: GPUs N of one machine; `shape`, `hardware` and `placement` are the
        whole model's and machine's, and the clocks, bytes and engine are one GPU's."""
        if max_batched_tokens is not None and max_batched_tokens < batch:
            raise ValueError(f"max_batched_tokens {max_batched_tokens} is below the batch ({batch}): every step "
                             "gives each decoding sequence a token")
        self.max_batched_tokens = max_batched_tokens
        self.tensor_parallel = tensor_parallel
        self.policy, self.shape = policy, shape.tensor_parallel_rank(tensor_parallel)
        self.hw = rank_hardware(hardware, tensor_parallel)
        self.staging_slots = staging_slots
        self.precomputed_kept = precomputed_kept
        self.accuracy, self.batch, self.seed = prediction_accuracy, batch, seed
        self.expert_bytes = self.shape.expert_bytes(expert_format=expert_format)
        self.device_expert_bytes = self.shape.expert_bytes(expert_format=device_expert_format or expert_format)
        self.flops_per_token = 6 * shape.hidden_size * self.shape.intermediate_size
        # attention per layer (GQA 4:1, as Mixtral): q and o H x H, k and v H x H/4, in bf16;
        # vLLM splits its heads across the GPUs
        self.attention_bytes = int(2.5 * shape.hidden_size ** 2 * 2) // tensor_parallel
        L, E = shape.num_layers, shape.num_experts
        placement = policy.resident(placement, E)
        # The engine's own placement, re-allocation and bookkeeping, on 1x1 stand-in experts; one
        # GPU's engine, whose `auto` re-allocation weighs that GPU's share of the CPU.
        fidelity = Fidelity(policy.mode, first_predicted_layer if policy.mode != "exact" else None,
                            degrades if policy.mode != "exact" else None)
        self.engine = DaopEngine(torch.device("cpu"), cpu_threads=1, fidelity=fidelity,
                                 realloc=policy.realloc, hardware=self.hw)
        for _ in range(L):
            self.engine.add_layer(E, 1, 1, torch.float32, SoftmaxTopK(shape.top_k))
        for index in range(L):
            self.engine.set_router(index, lambda x: x)
        self.engine.place(placement)
        # predicted layers: pre-computed in verified and daop mode; staged a layer early where the policy streams
        self.first_predicted = first_predicted_layer if policy.mode != "exact" or policy.stream == "auto" else L
        self.link_free = 0.0  # when PCIe is done with the copies issued so far in this step
        self.lru = [OrderedDict((e, None) for e in experts) for experts in placement]
        self.slots = [len(experts) for experts in placement]
        self.result = SimResult()
        self.miss_costs = expert_costs(self.hw, self.expert_bytes, self.flops_per_token, policy.cpu_efficiency,
                                       FORMAT_READ_SHARE[expert_format], self.device_expert_bytes)
        self._device_expert_s, self._cpu_expert_s = self.miss_costs.device_s, self.miss_costs.cpu_s

    # --- costs -------------------------------------------------------------------------------
    def _attention_s(self, tokens: int = 1) -> float:
        """Attention projections of one layer (KV-cache reads left out: short contexts)."""
        return self._device_weights_s(self.attention_bytes, tokens)

    def _layer_fixed_s(self, tokens: int = 1) -> float:
        """A layer's device work outside the routed experts: attention (and under tensor
        parallelism its all-reduce), and the shared experts (always resident)."""
        return (self._attention_s(tokens) + self._allreduce_s(tokens)
                + self._device_weights_s(self.shape.shared_expert_bytes(), tokens))

    def _allreduce_s(self, tokens: int) -> float:
        """One all-reduce of `tokens` rows of bf16 hidden states across the GPUs: a ring moves
        2 (N - 1) / N of them in and out of each GPU; nothing on one GPU."""
        n = self.tensor_parallel
        if n == 1:
            return 0.0
        moved = 2 * (n - 1) / n * tokens * self.shape.hidden_size * 2
        return ALLREDUCE_LATENCY_S + moved / (self.hw.interconnect_gbps * 1e9)

    def _device_weights_s(self, weight_bytes: int, tokens: int) -> float:
        """bf16 weights read once for `tokens` tokens: 2 bytes and 2 FLOPs per weight and token."""
        return max(weight_bytes / (self.hw.device_gbps * 1e9), tokens * weight_bytes / (self.hw.device_tflops * 1e12))

    def _copy_s(self) -> float:
        return self.miss_costs.copy_s

    # --- routing -----------------------------------------------------------------------------
    def _predict(self, row: _Row, layer: int, true_ids: list[int]) -> list[int]:
        """A prediction right with probability `accuracy` per expert, else another expert,
        drawn from a generator keyed by (row, layer, token) so every policy sees the same."""
        rng = random.Random(hash((self.seed, row.index, layer, row.position)))
        others = [e for e in range(self.shape.num_experts) if e not in true_ids]
        rng.shuffle(others)
        return [e if rng.random() < self.accuracy else others.pop() for e in true_ids]

    def _scores(self, row: _Row, layer: int, ids: list[int]) -> torch.Tensor:
        """Router probabilities: the listed order stands for descending probability; the other
        experts get small seeded scores (traces hold no gate weights beyond the top-k)."""
        rng = random.Random(hash((self.seed, row.index, layer, row.position, 1)))
        scores = torch.tensor([rng.random() * 0.01 for _ in range(self.shape.num_experts)])
        for rank, expert in enumerate(ids):
            scores[expert] = 1.0 - 0.1 * rank
        return scores / scores.sum()

    # --- steps -------------------------------------------------------------------------------
    def _step(self, decoding: list[_Row], chunks: list[tuple[_Row, int, int]]) -> float:
        """One engine step: a generated token of every row in `decoding` and, per chunk (row,
        start, end), that piece of its prompt, as vLLM's scheduler mixes them. Per layer the
        resident experts run on the device and the others where the policy puts misses; decode
        rows' next layers are predicted (pre-computed on the CPU, or staged a layer early when
        the policy streams)."""
        engine, K = self.engine, self.shape.top_k
        engine.begin_step(StepBatch(
            tuple(str(r.index) for r in (*decoding, *(c[0] for c in chunks))),
            (1,) * len(decoding) + tuple(end - start for _, start, end in chunks),
            (False,) * len(decoding) + (True,) * len(chunks),
            (False,) * len(decoding) + tuple(end == r.prompt_len for r, _, end in chunks),
            tuple(r.decode_len - r.position for r in decoding) + tuple(r.decode_len for r, _, _ in chunks)))
        routing = [[r.decode_ids(layer) for r in decoding] for layer in range(self.shape.num_layers)]
        prompt_ids = [self._prompt_ids(layer, chunks) for layer in range(self.shape.num_layers)]
        step_ids = torch.tensor(routing, dtype=torch.int64).reshape(len(routing), len(decoding), K)
        engine.requests.record_layers(torch.cat([step_ids, torch.stack(prompt_ids)], 1) if chunks else step_ids)
        tokens = len(decoding) + sum(end - start for _, start, end in chunks)
        allreduce_s = self._allreduce_s(tokens)  # each layer's two: attention's, and the MoE layer's
        self.result.allreduce_seconds += 2 * self.shape.num_layers * allreduce_s
        now = cpu_free = self.link_free = 0.0
        precomputed_done = 0.0  # when the CPU finishes the pre-computation this layer consumes
        precomputed: set[tuple[int, int]] = set()  # (row, expert) pairs pre-computed for this layer
        routing_next: list[list[int] | None] | None = None  # daop: this layer's routing, predicted at the one before
        staged_next: dict[int, float] = {}  # experts staged a layer early for this layer: when each copy lands
        for layer, true in enumerate(routing):
            cache = engine.layers[layer].cache
            used = true
            if routing_next is not None and self.policy.mode == "daop":  # rows the gate turned away: their own
                used = [ids if ids is not None else own for ids, own in zip(routing_next, true)]
            resident = cache.is_resident.tolist()  # at the start of the layer, for the prompt rows
            now += self._layer_fixed_s(tokens)
            device_tokens: dict[int, int] = {}
            cpu_now: dict[int, int] = {}
            staged_tokens: dict[int, int] = {}
            copied: set[int] = set()  # a missing expert is copied once per step, for all its rows
            for r, ids in enumerate(used):
                for expert in ids:
                    hit = bool(cache.is_resident[expert]) or expert in copied
                    self.result.hits["decode"][1] += 1
                    if hit or self.policy.misses != "cpu":
                        if not hit:
                            self._miss(layer, expert)
                            copied.add(expert)
                        elif self.policy.misses == "lru" and expert in self.lru[layer]:
                            self.lru[layer].move_to_end(expert)
                        self.result.hits["decode"][0] += hit
                        device_tokens[expert] = device_tokens.get(expert, 0) + 1
                    elif expert in staged_next:
                        staged_tokens[expert] = staged_tokens.get(expert, 0) + 1
                    else:
                        self.result.cpu_expert_tokens += 1
                        if (r, expert) in precomputed:
                            self.result.precomputed_used += 1
                        else:
                            cpu_now[expert] = cpu_now.get(expert, 0) + 1
            decode_now = dict(cpu_now)
            for expert, count in enumerate(torch.bincount(prompt_ids[layer].flatten(),
                                                          minlength=self.shape.num_experts).tolist()):
                if not count:
                    continue
                self.result.hits["prefill"][1] += count
                if resident[expert] or expert in copied:
                    self.result.hits["prefill"][0] += count if resident[expert] else 0
                    device_tokens[expert] = device_tokens.get(expert, 0) + count
                elif self.policy.misses == "cpu":
                    target = staged_tokens if expert in staged_next else cpu_now
                    target[expert] = target.get(expert, 0) + count
                else:
                    self._miss(layer, expert)
                    copied.add(expert)
                    device_tokens[expert] = device_tokens.get(expert, 0) + count
            self.result.staged_early_used += len(staged_tokens)
            device_s = len(copied) * self._copy_s() + sum(map(self._device_expert_s, device_tokens.values()))
            staged = [(staged_tokens[e], staged_next[e] - now) for e in sorted(staged_next, key=staged_next.get)
                      if e in staged_tokens]
            host = list(cpu_now)  # decode pairs first in each count, then the prompt rows'
            device_s, cpu_s, copies = self._place_misses([cpu_now[e] for e in host],
                                                         [decode_now.get(e, 0) for e in host], device_s,
                                                         max(0.0, cpu_free - now), staged,
                                                         max(0.0, self.link_free - now))
            device_end, own_end = now + device_s, now + cpu_s
            self.link_free = max(self.link_free, now) + copies * self._copy_s()
            cpu_free = own_end
            consumed_done = precomputed_done
            next_start = max(device_end, own_end, consumed_done) + allreduce_s
            # predict the next layer from this layer's input: pre-compute its host experts, or stage them
            precomputed, routing_next, staged_next = set(), None, {}
            if decoding and layer + 1 < self.shape.num_layers and layer + 1 >= self.first_predicted:
                routing_next, jobs, precomputed = self._predict_next(decoding, layer + 1)
                start_next = next_start + self._layer_fixed_s(tokens)
                # where the CPU would pre-compute the predicted pairs it starts once it is free, as
                # the copies start before the layer: both head starts count; exact waits for the routing
                cpu_busy = cpu_free - start_next if self.policy.mode != "exact" else max(0.0, cpu_free - next_start)
                staged_next = self._stage_early(layer + 1, routing_next, jobs, start_next, cpu_busy)
                jobs = [(r, e) for r, e in jobs if e not in staged_next]
                precomputed = {pair for pair in precomputed if pair[1] not in staged_next}
                if self.policy.mode == "exact":  # the prediction stages, and is never computed on
                    jobs, precomputed, routing_next = [], set(), None
                per_expert: dict[int, int] = {}
                for _, expert in jobs:
                    per_expert[expert] = per_expert.get(expert, 0) + 1
                cpu_free = max(now, cpu_free) + sum(map(self._cpu_expert_s, per_expert.values()))
                precomputed_done = cpu_free
            now = next_start
        for row in decoding:
            row.position += 1
        self._end_step()
        samples = bool(decoding) or any(end == row.prompt_len for row, _, end in chunks)
        return now + (self._attention_s() if samples else 0.0)  # stands in for the final norm and lm_head

    def _prompt_ids(self, layer: int, chunks: list[tuple[_Row, int, int]]) -> torch.Tensor:
        """[tokens, K] the chunks' experts at `layer`: unaligned traces have fewer rows in some
        layers, mapped proportionally (the engine's batch wants every row)."""
        parts = []
        for row, start, end in chunks:
            rows = row.prefill[layer]
            ids = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), -1)
            parts.append(ids[torch.arange(start, end) * len(rows) // row.prompt_len])
        return torch.cat(parts) if parts else torch.zeros(0, self.shape.top_k, dtype=torch.int64)

    def _place_misses(self, host: list[int], decode: list[int], device_busy_s: float, cpu_busy_s: float,
                      staged: list[tuple[int, float]], copy_start_s: float) -> tuple[float, float, int]:
        """(device end, CPU end, experts copied) of a layer whose host experts have `host` tokens
        each (`decode` of them decode rows'), after the device's `device_busy_s` and the CPU's
        `cpu_busy_s`, streaming those the policy's plan sends to the device; `staged` (tokens,
        landing) were staged a layer early. A streamed expert counts in each phase it serves."""
        streamed = plan_streaming(host, self.miss_costs, device_busy_s, self.staging_slots, self.policy.stream,
                                  cpu_busy_s, staged, copy_start_s)
        count = sum(streamed)
        self.result.streamed["decode"] += sum(1 for d, s in zip(decode, streamed) if s and d)
        self.result.streamed["prefill"] += sum(1 for t, d, s in zip(host, decode, streamed) if s and t > d)
        self.result.pcie_bytes += count * self.device_expert_bytes
        self.result.cpu_expert_tokens -= sum(d for d, s in zip(decode, streamed) if s)
        return (*layer_timeline(host, streamed, self.miss_costs, device_busy_s, self.staging_slots, cpu_busy_s,
                                staged, copy_start_s), count)

    def _stage_early(self, layer: int, routing: list[list[int] | None], jobs: list[tuple[int, int]], start_s: float,
                     cpu_busy_s: float) -> dict[int, float]:
        """Our streaming policies: the predicted host experts of `layer` (its predicted `routing`
        per row, its (row, expert) `jobs` on host experts) the plan streams, copied from now into
        that layer's staging rows (one set per layer parity, at most `staging_slots`), heaviest
        first, as long as a copy starts before the layer's experts do at `start_s` (one that would
        not gain a head start waits for the layer's own routing, which a prediction may have got
        wrong); returns when each lands. The plan sees the device busy with the layer's predicted
        resident pairs and the CPU busy for `cpu_busy_s` (negative: free that long before the
        layer starts). `stream-all` (vLLM's prefetch offloader) predicts nothing."""
        if self.policy.stream != "auto" or not jobs:
            return {}
        per_expert: dict[int, int] = {}
        for _, expert in jobs:
            per_expert[expert] = per_expert.get(expert, 0) + 1
        is_resident = self.engine.layers[layer].cache.is_resident.tolist()
        resident_tokens: dict[int, int] = {}
        for ids in routing:
            for expert in ids or ():
                if is_resident[expert]:
                    resident_tokens[expert] = resident_tokens.get(expert, 0) + 1
        device_busy_s = sum(map(self._device_expert_s, resident_tokens.values()))
        landed: dict[int, float] = {}
        for expert in plan_early_staging(per_expert, self.miss_costs, device_busy_s, self.staging_slots, cpu_busy_s,
                                         self.link_free - start_s):
            if self.link_free >= start_s:
                break
            self.link_free += self._copy_s()
            landed[expert] = self.link_free
        self.result.staged_early += len(landed)
        self.result.streamed["decode"] += len(landed)
        self.result.pcie_bytes += len(landed) * self.device_expert_bytes
        return landed

    def _predict_next(self, rows: list[_Row], layer: int
                      ) -> tuple[list[list[int] | None], list[tuple[int, int]], set[tuple[int, int]]]:
        """Per row: the predicted experts of `layer` (degraded in daop mode, through the engine's
        `degrade`; None for a row the staleness gate will turn away), the (row, expert) pairs the
        CPU pre-computes for it, and those of them the gate will let `layer` use."""
        is_resident = self.engine.layers[layer].cache.is_resident
        routing, jobs, kept = [], [], set()
        for r, row in enumerate(rows):
            true = row.decode_ids(layer)
            predicted = self._predict(row, layer, true)
            self.result.predictions += len(predicted)
            self.result.predictions_correct += len(set(predicted) & set(true))
            if self.policy.mode == "daop" and self.engine.fidelity.degrades:
                ids = torch.tensor([predicted])
                weights = torch.full((1, len(predicted)), 1.0 / len(predicted))
                ids, _, _ = degrade(ids, weights, self._scores(row, layer, predicted)[None], is_resident)
                predicted = ids[0].tolist()
            row_jobs = [(r, e) for e in predicted if not bool(is_resident[e])]
            jobs += row_jobs
            if self.precomputed_kept >= 1 or self._gate_keeps(row, layer):
                routing.append(predicted)
                kept.update(row_jobs)
            else:
                routing.append(None)
        return routing, jobs, kept

    def _gate_keeps(self, row: _Row, layer: int) -> bool:
        """Whether the staleness gate lets this row use its prediction at `layer`: a draw with
        probability `precomputed_kept`, keyed like the prediction, independent of its accuracy."""
        return random.Random(hash((self.seed, row.index, layer, row.position, 2))).random() < self.precomputed_kept

    def _miss(self, layer: int, expert: int) -> None:
        """LRU / on-demand: copy a missing expert (LRU keeps it in place of the least recent)."""
        self.result.pcie_bytes += self.device_expert_bytes
        if self.policy.misses == "lru" and self.slots[layer]:
            cache = self.lru[layer]
            cache.popitem(last=False)
            cache[expert] = None
            self.engine.layers[layer].cache.fill(list(cache))

    def _end_step(self) -> None:
        swaps = self.engine.stats.values["swaps"]  # per layer, updated in place
        swaps_before = sum(swaps)
        self.engine.end_step()
        self.result.pcie_bytes += (sum(swaps) - swaps_before) * self.device_expert_bytes

    def run(self, sequences: list[TraceSequence]) -> dict[str, float | None]:
        """Continuous batching of `batch` sequences, a finished one making room for the next.
        With `max_batched_tokens` unset a prompt is one step of its own; set, every step has a
        token of each decoding row and, within that token budget, pieces of the prompts in
        flight, oldest first (vLLM's chunked prefill)."""
        waiting = [_Row(i, s.prefill, s.decode) for i, s in enumerate(sequences)]
        waiting.reverse()
        running: list[_Row] = []
        prompts: list[_Prompt] = []
        while waiting or running or prompts:
            while waiting and len(running) + len(prompts) < self.batch:
                row = waiting.pop()
                if row.prompt_len:
                    prompts.append(_Prompt(row))
                else:
                    self._start_decoding(row, running)
            if self.max_batched_tokens is None:
                for prompt in prompts:
                    self._timed_step([], [(prompt, prompt.row.prompt_len)])
            elif running or prompts:
                budget, chunks = self.max_batched_tokens - len(running), []
                for prompt in prompts:
                    take = min(prompt.row.prompt_len - prompt.done, budget)
                    if take > 0:
                        chunks.append((prompt, take))
                        budget -= take
                self._timed_step(running, chunks)
            for prompt in [p for p in prompts if p.done == p.row.prompt_len]:
                prompts.remove(prompt)
                self._start_decoding(prompt.row, running)
            if self.max_batched_tokens is None and running:
                self._timed_step(running, [])
            for row in [r for r in running if r.position >= r.decode_len]:
                running.remove(row)
                self.engine.drop_request(str(row.index))
        self.engine.close()
        summary = self.result.summary()
        # if every CPU (token, expert) were one expert read at the CPU's full streaming rate
        cpu_s = summary["cpu_expert_tokens_per_token"] * self.expert_bytes / (self.hw.cpu_gbps * 1e9)
        summary["cpu_bandwidth_bound_tokens_per_s"] = 1 / cpu_s if cpu_s else None
        return summary

    def _start_decoding(self, row: _Row, running: list[_Row]) -> None:
        if row.decode_len:
            running.append(row)
        else:
            self.engine.drop_request(str(row.index))

    def _timed_step(self, decoding: list[_Row], chunks: list[tuple[_Prompt, int]]) -> None:
        """A step of `decoding` and (prompt, tokens) `chunks`, on the clock; a prompt's time to
        first token runs from the start of its first step to the end of its last."""
        started = self.result.seconds
        seconds = self._step(decoding, [(p.row, p.done, p.done + n) for p, n in chunks])
        self.result.seconds += seconds
        self.result.output_tokens += len(decoding)
        if chunks:
            self.result.prefill_step_seconds += seconds
        for prompt, tokens in chunks:
            prompt.started = started if prompt.started is None else prompt.started
            prompt.done += tokens
            self.result.prefill_tokens += tokens
            if prompt.done == prompt.row.prompt_len:
                self.result.prompts += 1
                self.result.time_to_first_token += self.result.seconds - prompt.started

def split_for_simulation(seq: TraceSequence, split: float | None) -> TraceSequence:
    """`split_sequence` for prefill-only sequences; a decode-only one gives its first `split`
    rows to a prompt the same way (a causal model routes a token the same in either phase)."""
    if split is None or any(seq.prefill):
        return split_sequence(seq, split)
    cut = [int(len(rows) * split) for rows in seq.decode]
    return dataclasses.replace(seq, prefill=[rows[:c] for rows, c in zip(seq.decode, cut)],
                               decode=[rows[c:] for rows, c in zip(seq.decode, cut)])


def simulate(sequences: list[TraceSequence], policies: list[str], shape: MoEShape, hardware: Hardware,
             resident_fraction: float, calibrate_on: float = 0.2, split: float | None = None,
             prediction_accuracy: float = PAPER_PREDICTION_ACCURACY, batch: int = 1,
             first_predicted_layer: int = 4, progress=None, profile: list[tuple[int, int]] | None = None,
             expert_format: str = "bf16", precomputed_kept: float = 1.0, degrades: bool | None = None,
             staging_slots: int = DEFAULT_STAGING_SLOTS, max_batched_tokens: int | None = None,
             tensor_parallel: int = 1, device_expert_format: str | None = None) -> dict:
    """Every policy on the same sequences: the first `calibrate_on` of them build the static
    profile (their prefill counts, as `daop-vllm calibrate`) and are not scored; with
    calibrate_on 0, `profile` (if any) places the experts. Under `tensor_parallel` N, each GPU
    holds `resident_fraction` of the experts as 1/N shards, and the results are one GPU's."""
    rank_shape = shape.tensor_parallel_rank(tensor_parallel)  # refuses a size that does not divide the experts
    seqs = [split_for_simulation(s, split) for s in sequences]
    calibration_count = int(calibrate_on * len(seqs))
    calibration, scored = seqs[:calibration_count], seqs[calibration_count:]
    if not scored:
        raise ValueError(f"--calibrate-on {calibrate_on} leaves none of the {len(seqs)} sequences to score")
    first = seqs[0]
    if (first.num_layers, first.num_experts, first.top_k) != (shape.num_layers, shape.num_experts, shape.top_k):
        raise ValueError(f"the trace has {first.num_layers} layers, top-{first.top_k} of {first.num_experts} "
                         f"experts; model shape {shape.name} has {shape.num_layers}, top-{shape.top_k} of "
                         f"{shape.num_experts}")
    if calibration:
        profile = calibrate_profile(calibration)
    slots = math.floor(resident_fraction * shape.num_layers * shape.num_experts)
    placement = plan_residency(slots, shape.num_layers, shape.num_experts,
                               rank_pairs(shape.num_layers, shape.num_experts, profile))
    device_format = device_expert_format or expert_format
    results = {}
    for name in policies:
        sim = Simulator(POLICIES[name], shape, hardware, placement, prediction_accuracy, first_predicted_layer, batch,
                        expert_format=expert_format, precomputed_kept=precomputed_kept, degrades=degrades,
                        staging_slots=staging_slots, max_batched_tokens=max_batched_tokens,
                        tensor_parallel=tensor_parallel, device_expert_format=device_expert_format)
        results[name] = sim.run(scored)
        if progress is not None:
            progress.update()
    return {
        "policies": results,
        "settings": {
            "hardware": hardware.to_dict(), "model_shape": shape.name, "resident_fraction": resident_fraction,
            "resident_experts": slots, "split": split, "calibrate_on": calibrate_on,
            "calibration_sequences": len(calibration), "scored_sequences": len(scored),
            "prediction_accuracy": prediction_accuracy, "batch": batch,
            "first_predicted_layer": first_predicted_layer, "expert_format": expert_format,
            "device_expert_format": device_format,
            "precomputed_kept": precomputed_kept, "staging_slots": staging_slots,
            "max_batched_tokens": max_batched_tokens,
            "expert_bytes": shape.expert_bytes(expert_format=expert_format),
            # one GPU's: a shard of each expert, and the resident experts' shards at this fraction
            "tensor_parallel_size": tensor_parallel,
            "expert_bytes_per_gpu": rank_shape.expert_bytes(expert_format=expert_format),
            "device_expert_bytes": shape.expert_bytes(expert_format=device_format),
            "resident_expert_bytes_per_gpu": slots * rank_shape.expert_bytes(expert_format=device_format),
            "allreduce": {"latency_s": ALLREDUCE_LATENCY_S, "per_layer": 2 if tensor_parallel > 1 else 0},
            "cpu_efficiency": {"ours": OUR_CPU_EFFICIENCY, "pytorch (paper, static)": TORCH_CPU_EFFICIENCY},
            "policies": {name: POLICIES[name].description for name in policies},
        },
    }

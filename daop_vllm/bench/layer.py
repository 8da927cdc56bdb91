"""`daop-vllm bench layer`: what DAOP's machinery costs per MoE layer, on this machine.

The DAOP op (DaopMoE.forward inside an engine step: routing, placement lookups, transfers,
prediction, counters) against the expert kernels it ends in, called directly on the same
routing computed beforehand (`direct`), and against the router and those kernels (`routed`:
what a layer costs with no DAOP machinery at all, the router being work every MoE layer does).
Tiny experts, so that the difference is the machinery. Settings (batch, resident fraction,
mode) are interleaved in each round; medians over the rounds.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from daop_vllm.core.batch import StepBatch
from daop_vllm.core.engine import DaopEngine
from daop_vllm.core.prediction import Fidelity
from daop_vllm.core.routing import SoftmaxTopK

# Mixtral's layer count (what a step's fixed costs are shared by), tiny experts
LAYERS, EXPERTS, TOP_K, HIDDEN, INTERMEDIATE = 32, 8, 2, 64, 128
BATCHES = (1, 16, 64)
FRACTIONS = (1.0, 0.5, 0.0)
MODES = ("exact", "daop")


class LayerCase:
    """One setting: an engine of LAYERS tiny layers, its placement, and one step's inputs."""

    def __init__(self, batch: int, fraction: float, mode: str, threads: int, seed: int = 0) -> None:
        fidelity = Fidelity(mode, first_predicted_layer=1 if mode != "exact" else None)
        self.engine = DaopEngine(torch.device("cpu"), cpu_threads=threads, fidelity=fidelity)
        # Every expert on the native kernels, whatever its tokens (the op and the direct calls
        # alike): past NATIVE_MAX_TOKENS the torch path's thread handoff and torch's own threads,
        # on the cores the native threads use, swung the same setting by 2x from round to round.
        self.engine.executor.native_max_tokens = batch * TOP_K
        gen = torch.Generator().manual_seed(seed)
        self.gates = []
        for layer_index in range(LAYERS):
            layer = self.engine.add_layer(EXPERTS, HIDDEN, INTERMEDIATE, torch.float32, SoftmaxTopK(TOP_K))
            layer.store.w13.copy_(torch.randn(layer.store.w13.shape, generator=gen) * 0.1)
            layer.store.w2.copy_(torch.randn(layer.store.w2.shape, generator=gen) * 0.1)
            gate = torch.randn(EXPERTS, HIDDEN, generator=gen)
            self.gates.append(gate)
            self.engine.set_router(layer_index, lambda h, gate=gate: h @ gate.t())
        resident = list(range(int(fraction * EXPERTS)))
        self.engine.place([resident] * LAYERS)
        self.x = torch.randn(batch, HIDDEN, generator=gen)
        self.logits = [self.x @ gate.t() for gate in self.gates]
        self.routing = [layer.route(logits) for layer, logits in zip(self.engine.layers, self.logits)]
        # decode rows: what predictions act on
        self.batch = StepBatch(tuple(f"r{i}" for i in range(batch)), (1,) * batch, (False,) * batch,
                               (False,) * batch, (64,) * batch)
        self._every_expert = torch.arange(EXPERTS)

    def daop_step(self) -> None:
        self.engine.begin_step(self.batch)
        for layer, logits in zip(self.engine.layers, self.logits):
            layer.forward(self.x, logits)
        self.engine.end_step()

    def direct_step(self) -> None:
        """The same experts through the same kernels, on routing computed beforehand: on the CPU,
        where device and host are one memory, the executor's one job per layer."""
        executor = self.engine.executor
        for layer, (weights, ids) in zip(self.engine.layers, self.routing):
            executor.submit(self.x, ids, weights, layer.store.w13, layer.store.w2, self._every_expert).result()

    def routed_step(self) -> None:
        """The layers' own router, then the same kernels as `direct_step`."""
        executor = self.engine.executor
        for layer, logits in zip(self.engine.layers, self.logits):
            weights, ids = layer.route(logits)
            executor.submit(self.x, ids, weights, layer.store.w13, layer.store.w2, self._every_expert).result()

    def close(self) -> None:
        self.engine.close()


def _microseconds_per_layer(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps / LAYERS * 1e6


def run(rounds: int = 5, steps: int = 50, threads: int = 1, progress=None) -> dict[str, Any]:
    # torch's own ops on `threads` threads too, as in vLLM's GPU workers (one): with more, each
    # small op of a step could wake torch's OpenMP threads, which then spin on the cores the
    # native threads run on (router and kernels took up to 1.6x the kernels alone at batch 64)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _timed(rounds, steps, threads, progress)
    finally:
        torch.set_num_threads(torch_threads)


def _timed(rounds: int, steps: int, threads: int, progress) -> dict[str, Any]:
    cases = {(b, f, m): LayerCase(b, f, m, threads) for b in BATCHES for f in FRACTIONS for m in MODES}
    steps_of = {"daop": LayerCase.daop_step, "direct": LayerCase.direct_step, "routed": LayerCase.routed_step}
    samples: dict[tuple, dict[str, list[float]]] = {key: {name: [] for name in steps_of} for key in cases}
    try:
        names = list(steps_of)
        for round_index in range(rounds):
            # an untimed step of each kind first (in the first round: workspaces, native threads,
            # torch's first calls; later: the setting before left its own weights and buffers in
            # the caches, and 32 layers of this one's weights are 25 MB), and the kinds in turn in a
            # rotating order, or whichever kind ran first paid for it (1.12x against 1.08x)
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for key, case in cases.items():
                for name in order:
                    steps_of[name](case)
                for name in order:
                    step = steps_of[name]
                    samples[key][name].append(_microseconds_per_layer(lambda: step(case), steps))
                if progress is not None:
                    progress.update(1)
    finally:
        for case in cases.values():
            case.close()
    rows = []
    for (batch, fraction, mode), times in samples.items():
        daop_us, direct_us, routed_us = (statistics.median(times[name]) for name in ("daop", "direct", "routed"))
        rows.append({"batch": batch, "fraction": fraction, "mode": mode, "daop_us": round(daop_us, 1),
                     "direct_us": round(direct_us, 1), "routed_us": round(routed_us, 1),
                     "machinery_us": round(daop_us - direct_us, 1), "router_us": round(routed_us - direct_us, 1),
                     "daop_over_direct": round(daop_us / direct_us, 3),
                     "daop_over_routed": round(daop_us / routed_us, 3),
                     "machinery_share": round(max(0.0, daop_us - direct_us) / daop_us, 3),
                     "machinery_share_past_router": round(max(0.0, daop_us - routed_us) / daop_us, 3)})
    return {"shape": {"layers": LAYERS, "experts": EXPERTS, "top_k": TOP_K, "hidden": HIDDEN,
                      "intermediate": INTERMEDIATE, "dtype": "fp32"},
            "threads": threads, "rounds": rounds, "steps_per_round": steps, "rows": rows}

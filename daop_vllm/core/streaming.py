"""Where each of a layer's host-resident experts runs in a step: on the CPU, or copied over PCIe
into a staging slot on the device and run there (DAOP's mechanism 2: whichever finishes the layer
sooner). The engine and the simulator both plan with `plan_streaming`.

Timeline of one layer: the device first runs the resident experts (`device_busy_s`), then each
streamed expert once its copy has landed; copies go one after the other, and with S staging
slots the copy of the i-th streamed expert waits until the (i-S)-th has run and freed its slot.
The CPU runs its experts meanwhile. The layer ends when both sides are done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from daop_vllm.core.hardware import OUR_CPU_EFFICIENCY, Hardware

STREAM_MODES = ("auto", "off", "all")


@dataclass(frozen=True)
class MissCosts:
    """Seconds for one expert: on the CPU and on the device for n tokens, and its copy."""

    cpu_s: Callable[[int], float]
    device_s: Callable[[int], float]
    copy_s: float


def expert_costs(hardware: Hardware, expert_bytes: int, flops_per_token: int,
                 cpu_efficiency: float = OUR_CPU_EFFICIENCY, cpu_read_share: float = 1.0,
                 device_bytes: int | None = None) -> MissCosts:
    """One expert's costs on `hardware`: each side memory-bound (the expert read once for all its
    tokens) or compute-bound, whichever is slower; the CPU reads `expert_bytes` at
    `cpu_efficiency` of its streaming rate, times `cpu_read_share` for quantized experts
    (hardware.FORMAT_READ_SHARE); the device reads and a copy moves `device_bytes` (default the
    same: the device's format may differ)."""
    device_bytes = expert_bytes if device_bytes is None else device_bytes
    cpu_read = hardware.cpu_gbps * 1e9 * cpu_efficiency * cpu_read_share
    return MissCosts(
        cpu_s=lambda n: max(expert_bytes / cpu_read, n * flops_per_token / (hardware.cpu_tflops * 1e12)),
        device_s=lambda n: max(device_bytes / (hardware.device_gbps * 1e9),
                               n * flops_per_token / (hardware.device_tflops * 1e12)),
        copy_s=hardware.swap_seconds(device_bytes))


def layer_timeline(tokens: Sequence[int], streamed: Sequence[bool], costs: MissCosts, device_busy_s: float,
                   staging_slots: int, cpu_busy_s: float = 0.0, staged: Sequence[tuple[int, float]] = (),
                   copy_start_s: float = 0.0) -> tuple[float, float]:
    """(device end, CPU end) of the layer with the host experts of `tokens` (tokens per expert)
    split as `streamed`, the device busy for `device_busy_s` and the CPU for `cpu_busy_s` first.
    `staged`: (tokens, when its copy lands) of experts staged a layer early, run first; the
    others' copies start at `copy_start_s` (when the link is free), heaviest first (the device's
    longest jobs start first, the rule that minimises a two-stage pipeline with equal first
    stages)."""
    on_device = [*(t for t, _ in staged), *sorted((t for t, s in zip(tokens, streamed) if s), reverse=True)]
    if on_device and staging_slots < 1:
        raise ValueError("streaming needs at least one staging slot")
    device_end = device_busy_s
    for device_end in _device_pipeline(on_device, costs, device_busy_s, staging_slots, [r for _, r in staged],
                                       copy_start_s):
        pass
    return device_end, cpu_busy_s + sum(costs.cpu_s(t) for t, s in zip(tokens, streamed) if not s)


def _device_pipeline(counts: Sequence[int], costs: MissCosts, device_busy_s: float, staging_slots: int,
                     landed: Sequence[float] = (), copy_start_s: float = 0.0) -> Iterator[float]:
    """The device's end after each streamed expert of `counts` (tokens, in copy order): the first
    len(landed) already copied (landing at those times), the others copied one after the other
    from `copy_start_s`, the i-th waiting for the (i-S)-th to have run and freed its slot."""
    copy_free, device_free, ends = copy_start_s, device_busy_s, []
    for i, count in enumerate(counts):
        if i < len(landed):
            ready = landed[i]
        else:
            start = copy_free if i < staging_slots else max(copy_free, ends[i - staging_slots])
            copy_free = ready = start + costs.copy_s
        device_free = max(device_free, ready) + costs.device_s(count)
        ends.append(device_free)
        yield device_free


def layer_seconds(tokens: Sequence[int], streamed: Sequence[bool], costs: MissCosts, device_busy_s: float,
                  staging_slots: int, cpu_busy_s: float = 0.0) -> float:
    """When the layer ends (layer_timeline)."""
    return max(layer_timeline(tokens, streamed, costs, device_busy_s, staging_slots, cpu_busy_s))


def plan_streaming(tokens: Sequence[int], costs: MissCosts, device_busy_s: float, staging_slots: int,
                   mode: str = "auto", cpu_busy_s: float = 0.0, staged: Sequence[tuple[int, float]] = (),
                   copy_start_s: float = 0.0) -> list[bool]:
    """Per host expert (tokens per expert this step), whether it is streamed. `auto`: a greedy
    that streams the heaviest experts, one more at a time while that ends the layer sooner (an
    expert's copy costs the same whatever its tokens, so the heaviest take the most CPU time off
    per copy), or every one where that ends it sooner still (so never slower than either side
    alone); `all`: every one (through the staging slots); `off`: none. `staged` and
    `copy_start_s` as in layer_timeline (a negative start: copies issued a layer early). O(n log n)."""
    if mode not in STREAM_MODES:
        raise ValueError(f"stream mode {mode!r}; known: {', '.join(STREAM_MODES)}")
    if mode == "off" or staging_slots < 1:
        return [False] * len(tokens)
    if mode == "all":
        return [True] * len(tokens)
    order = sorted(range(len(tokens)), key=lambda e: -tokens[e])
    cpu = cpu_busy_s + sum(costs.cpu_s(t) for t in tokens)
    device_free = device_busy_s
    pipeline = _device_pipeline([*(t for t, _ in staged), *(tokens[e] for e in order)], costs, device_busy_s,
                                staging_slots, [r for _, r in staged], copy_start_s)
    for _, device_free in zip(staged, pipeline):  # staged a layer early: on the device whatever the plan
        pass
    best, chosen = max(device_free, cpu), 0
    for i, (expert, device_free) in enumerate(zip(order, pipeline)):  # one expert more each time
        cpu -= costs.cpu_s(tokens[expert])
        if chosen == i and max(device_free, cpu) < best:
            best, chosen = max(device_free, cpu), i + 1
    if max(device_free, cpu) < best:  # every expert streamed
        chosen = len(order)
    streamed = [False] * len(tokens)
    for expert in order[:chosen]:
        streamed[expert] = True
    return streamed


def plan_early_staging(tokens: dict[int, int], costs: MissCosts, device_busy_s: float, staging_slots: int,
                       cpu_busy_s: float, copy_start_s: float) -> list[int]:
    """The predicted host experts of the next layer (`tokens`: predicted tokens per expert)
    worth copying to staging rows a layer early, heaviest first, at most `staging_slots`: those
    plan_streaming streams when their copies start at `copy_start_s` (negative: before the layer
    does, the head start). The engine and the simulator both stage with it."""
    experts = sorted(tokens, key=lambda e: -tokens[e])
    plan = plan_streaming([tokens[e] for e in experts], costs, device_busy_s, staging_slots, "auto", cpu_busy_s,
                          copy_start_s=copy_start_s)
    return [e for e, streamed in zip(experts, plan) if streamed][:staging_slots]

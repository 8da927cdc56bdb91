"""Counters of what the engine did, per MoE layer."""

from __future__ import annotations

from typing import Any

# Expert-token counters count (token, expert) assignments: a token routed to k experts counts k.
COUNTERS = (
    "device_expert_tokens",  # computed by the device (resident experts)
    "cpu_expert_tokens",  # computed by the CPU executor
    "prefill_device_expert_tokens",  # the same two, for prompt rows only ...
    "prefill_cpu_expert_tokens",
    "decode_device_expert_tokens",  # ... and for generated rows only
    "decode_cpu_expert_tokens",
    "predictions",  # (row, expert) pairs predicted for this layer at the layer before (before degradation)
    "predictions_correct",  # ... of which this layer's own router chose the expert too
    "precomputed_used",  # pre-computed (row, expert) results this layer's routing used
    "precomputed_rejected",  # ... and those of rows whose input had moved too far (staleness_tolerance)
    "precomputed_wasted",  # ... and the rest: results the routing did not use (computed for nothing)
    "degraded",  # decode rows whose host-resident experts degradation replaced (all but one)
    "faults_recovered",  # CPU jobs or swaps that failed and were recovered inside the layer
    "streamed_experts",  # host experts a step copied to a staging slot and ran on the device (streaming.py)
    "stream_bytes",  # bytes copied for that (0 where device and host share memory)
    "prefill_streamed_experts",  # ... streamed for prompt rows (an expert streamed for both phases counts in both)
    "decode_streamed_experts",  # ... and for generated rows
    "staged_early",  # host experts of this layer copied to a staging slot a layer early, from the prediction
    "staged_early_used",  # ... of them this layer's routing chose (counted in streamed_experts too)
    "swaps",  # experts brought onto the device by re-allocation
    "swap_bytes",  # bytes copied to the device for those swaps (0 where device and host share memory)
)


class DaopStats:
    """The counters of COUNTERS, one value per layer. Written by the forward thread, read by
    anyone (the stats file's thread, RPCs)."""

    def __init__(self, num_layers: int = 0) -> None:
        self.values: dict[str, list[int]] = {name: [0] * num_layers for name in COUNTERS}

    def add_layer(self) -> None:
        for values in self.values.values():
            values.append(0)

    def add(self, layer: int, **counts: int) -> None:
        for name, count in counts.items():
            self.values[name][layer] += count

    def add_per_layer(self, layers: list[int], **counts: list[int]) -> None:
        """counts[name][i] added to layer layers[i]'s counter `name`, for many layers at once."""
        for name, per_layer in counts.items():
            values = self.values[name]
            for layer, count in zip(layers, per_layer):
                values[layer] += count

    def layer(self, layer: int) -> dict[str, int]:
        return {name: values[layer] for name, values in self.values.items()}

    def totals(self) -> dict[str, int]:
        return {name: sum(values) for name, values in self.values.items()}

    def reset(self) -> None:
        for values in self.values.values():
            values[:] = [0] * len(values)


def with_hit_rates(counts: dict[str, int]) -> dict[str, int | float | None]:
    """`counts` plus the device hit rate of prompt and generated rows: the share of their
    (token, expert) work done by resident experts (None before any such row)."""
    rates: dict[str, float | None] = {}
    for phase in ("prefill", "decode"):
        device, cpu = counts[f"{phase}_device_expert_tokens"], counts[f"{phase}_cpu_expert_tokens"]
        rates[f"{phase}_hit_rate"] = device / (device + cpu) if device + cpu else None
    return {**counts, **rates}


# Report fields that add up over tensor-parallel ranks (each holds its shards of every expert)
SUMMED_OVER_RANKS = ("cpu_threads", "cpu_jobs", "cpu_busy_seconds", "host_expert_bytes", "host_expert_bytes_pinned",
                     "staging_bytes")


def summed_over_ranks(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Tensor-parallel ranks' reports (rank 0 first) as one: counters, bytes, threads and CPU time
    summed (a rank counts the (token, expert) pairs it computed its shard of, so a pair counts
    once per rank) and hit rates recomputed; placement and settings as rank 0's, which every
    rank shares; `ranks`: each rank's own report. One report is returned as it is."""
    if len(reports) == 1:
        return reports[0]

    def summed(rows: list[dict[str, Any]]) -> dict[str, Any]:
        return with_hit_rates({name: sum(row[name] for row in rows) for name in COUNTERS})

    layers = [{"resident": rows[0]["resident"], **summed(list(rows))}
              for rows in zip(*(report["layers"] for report in reports))]
    return {**reports[0], **{key: sum(report[key] for report in reports) for key in SUMMED_OVER_RANKS},
            "layers": layers, "totals": summed([report["totals"] for report in reports]), "ranks": reports}

"""DAOP's counters on vLLM's own `/metrics` endpoint, as `daop_*` Prometheus metrics.

The process that owns the MoE layers (the worker, also under vLLM's multi-process engine)
writes its report to a stats file every second; a collector registered in the front end's
Prometheus registry turns the newest file into metric families at each scrape. So the values
come from the owning process, and nothing in the forward pass touches Prometheus. Under tensor
parallelism every rank writes its own file (stats_file.rank_stats_path): the families are summed
over the ranks, and `daop_rank_*` gives each rank's totals.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily, Metric

from daop_vllm.core.stats import summed_over_ranks
from daop_vllm.core.stats_file import rank_stats_paths

# stats counter -> help text; exported per layer as daop_<name>_total{layer="i"}
LAYER_COUNTERS = {
    "device_expert_tokens": "(token, expert) assignments computed by device-resident experts",
    "cpu_expert_tokens": "(token, expert) assignments computed by the CPU executor",
    "predictions": "(row, expert) pairs predicted for this layer at the layer before",
    "predictions_correct": "predicted pairs that the layer's own router chose too",
    "precomputed_used": "pre-computed (row, expert) results the layer used",
    "precomputed_rejected": "pre-computed (row, expert) results of rows whose input had moved too far to use them",
    "precomputed_wasted": "pre-computed (row, expert) results the layer's routing did not use",
    "degraded": "decode rows whose host-resident experts degradation replaced",
    "streamed_experts": "host experts copied to a staging slot and run on the device for a step",
    "stream_bytes": "bytes copied to the device for streamed experts",
    "staged_early": "host experts copied to a staging slot a layer early, from the prediction",
    "staged_early_used": "experts staged a layer early that the layer's routing chose",
    "swaps": "experts brought onto the device by re-allocation",
    "swap_bytes": "bytes copied to the device by re-allocation",
    "faults_recovered": "CPU executor or swap failures recovered inside the layer",
}


class DaopCollector:
    """Reads the stats file of the current DAOP engine at each scrape."""

    def __init__(self) -> None:
        self.stats_path: Path | None = None

    def collect(self) -> Iterator[Metric]:
        if self.stats_path is None:
            return
        try:
            reports = [json.loads(path.read_text()) for path in rank_stats_paths(self.stats_path)]
        except (OSError, json.JSONDecodeError):
            return  # not written yet (the engine is loading)
        report = summed_over_ranks(reports)
        if len(reports) > 1:
            yield from _per_rank(reports)
        layers = report["layers"]
        for name, help_text in LAYER_COUNTERS.items():
            family = CounterMetricFamily(f"daop_{name}", help_text, labels=["layer"])
            for index, layer in enumerate(layers):
                family.add_metric([str(index)], layer[name])
            yield family
        hit_rate = GaugeMetricFamily("daop_device_hit_rate", "share of a phase's expert work done on the device",
                                     labels=["phase"])
        for phase in ("prefill", "decode"):
            value = report["totals"][f"{phase}_hit_rate"]
            if value is not None:
                hit_rate.add_metric([phase], value)
        yield hit_rate
        resident = GaugeMetricFamily("daop_resident_experts", "device-resident experts", labels=["layer"])
        for index, layer in enumerate(layers):
            resident.add_metric([str(index)], len(layer["resident"]))
        yield resident
        yield CounterMetricFamily("daop_cpu_busy_seconds", "thread-seconds the CPU executor spent on experts",
                                  value=report["cpu_busy_seconds"])
        yield GaugeMetricFamily("daop_requests_tracked", "requests with per-request DAOP state",
                                value=report["requests_tracked"])


def _per_rank(reports: list[dict]) -> Iterator[Metric]:
    """Under tensor parallelism each rank's totals, labelled by rank (the other families are
    summed over the ranks)."""
    for name, help_text in LAYER_COUNTERS.items():
        family = CounterMetricFamily(f"daop_rank_{name}", f"{help_text}, per tensor-parallel rank", labels=["rank"])
        for rank, report in enumerate(reports):
            family.add_metric([str(rank)], report["totals"][name])
        yield family
    busy = CounterMetricFamily("daop_rank_cpu_busy_seconds", "thread-seconds the rank's CPU executor spent on experts",
                               labels=["rank"])
    for rank, report in enumerate(reports):
        busy.add_metric([str(rank)], report["cpu_busy_seconds"])
    yield busy


_collector: DaopCollector | None = None


def expose_metrics(stats_path: str) -> None:
    """Serve the engine writing `stats_path` on this process's `/metrics` (the newest engine,
    where one process starts several)."""
    global _collector
    if _collector is None:
        _collector = DaopCollector()
        REGISTRY.register(_collector)
    _collector.stats_path = Path(stats_path)

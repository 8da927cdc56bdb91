"""Worker methods reachable through `LLM.collective_rpc("daop_...")`, in-process or across
vLLM's worker processes (plain arguments and results only, so no pickling is needed).
The plugin installs this class as `worker_extension_cls` for `daop` engines."""

from __future__ import annotations

from typing import Any

from daop_vllm.vllm_adapter.engine_access import engine_report, place_fraction, reset_counters, set_staleness_tolerance


class DaopWorkerExtension:
    def daop_report(self) -> dict[str, Any]:
        """Resident experts per layer and the engine's counters."""
        return engine_report(self.model_runner.get_model())

    def daop_reset_counters(self) -> None:
        reset_counters(self.model_runner.get_model())

    def daop_place_fraction(self, fraction: float) -> list[list[int]]:
        """Re-place the experts as `resident_fraction=fraction` would at load."""
        return place_fraction(self.model_runner.get_model(), fraction,
                              self.vllm_config.cache_config.gpu_memory_utilization)

    def daop_set_staleness_tolerance(self, tolerance: float | None) -> None:
        """Gate pre-computed results and predicted routing on staleness from the next step on."""
        set_staleness_tolerance(self.model_runner.get_model(), tolerance)


# The dotted path vLLM's `worker_extension_cls` takes.
WORKER_EXTENSION = f"{DaopWorkerExtension.__module__}.{DaopWorkerExtension.__qualname__}"

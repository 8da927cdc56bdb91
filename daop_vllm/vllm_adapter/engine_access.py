"""Functions to run on a model inside vLLM's workers with `LLM.apply_model`, for tests, the
demo and tools. Module-level so that they pickle to worker processes."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from daop_vllm.core.device_budget import DeviceMemory, check_slot_growth
from daop_vllm.core.engine import DaopEngine
from daop_vllm.core.errors import DaopConfigError
from daop_vllm.core.placement import Budget, plan_for_budget


def _engine(model: nn.Module) -> DaopEngine:
    engine = getattr(model, "daop_engine", None)
    if engine is None:
        raise ValueError("this model was not loaded with load_format='daop'")
    return engine


def engine_report(model: nn.Module) -> dict[str, Any]:
    """The engine's report: budget, resident experts and counters per layer, totals."""
    return _engine(model).report()


def reset_counters(model: nn.Module) -> None:
    _engine(model).stats.reset()


def place_fraction(model: nn.Module, fraction: float, gpu_memory_utilization: float) -> list[list[int]]:
    """Re-place the experts as `resident_fraction=fraction` would at load (index ranking);
    refused (DaopConfigError) where the slots it adds do not fit in the device memory left."""
    engine = _engine(model)
    if not 0 <= fraction <= 1:
        raise DaopConfigError(f"daop_place_fraction takes a fraction in [0, 1], got {fraction!r}")
    resident = plan_for_budget(Budget("resident_fraction", fraction), len(engine.layers), engine.num_experts,
                               engine.expert_bytes, None)
    added = engine.slot_bytes_added(resident)
    if added:  # vLLM sized its KV cache at start: new slots must fit in what it left
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(engine.device)
        check_slot_growth(added, DeviceMemory(free, total, gpu_memory_utilization))
    engine.place(resident)
    return engine.resident_experts()


def set_staleness_tolerance(model: nn.Module, tolerance: float | None) -> None:
    """Set the `staleness_tolerance` option between steps (None: no gate)."""
    engine = _engine(model)
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance)
                                      and tolerance >= 0):
        raise DaopConfigError(f"daop_set_staleness_tolerance takes a number >= 0 or None, got {tolerance!r}")
    if engine.mode == "exact":
        raise DaopConfigError('daop option \'staleness_tolerance\' applies to mode "verified" or "daop" only, '
                              'and the mode is "exact"')
    engine.set_fidelity(dataclasses.replace(engine.fidelity, staleness_tolerance=tolerance))

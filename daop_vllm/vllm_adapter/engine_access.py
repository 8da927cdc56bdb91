"""Functions to run on a model inside vLLM's workers with `LLM.apply_model`, for tests, the
demo and tools. Module-level so that they pickle to worker processes."""

from __future__ import annotations

from typing import Any

from torch import nn

from daop_vllm.core.engine import DaopEngine
from daop_vllm.core.options import DaopOptions
from daop_vllm.core.placement import plan_for_options


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


def place_fraction(model: nn.Module, fraction: float) -> list[list[int]]:
    """Re-place the experts as `resident_fraction=fraction` would at load (index ranking)."""
    engine = _engine(model)
    options = DaopOptions.parse({"resident_fraction": fraction})
    engine.place(plan_for_options(options, len(engine.layers), engine.num_experts, engine.expert_bytes, None))
    return engine.resident_experts()

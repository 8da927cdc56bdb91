"""DAOP's options (`model_loader_extra_config`), parsed and checked before anything loads."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

from daop_vllm.core.errors import DaopConfigError
from daop_vllm.core.hardware import HARDWARE_PRESETS, load_hardware
from daop_vllm.core.placement import Budget
from daop_vllm.core.prediction import MODES, Fidelity
from daop_vllm.core.quantized_experts import FORMATS, check_format
from daop_vllm.core.realloc import REALLOC_POLICIES
from daop_vllm.core.streaming import STREAM_MODES

# Re-allocation copies started per engine step, at most (they run beside the steps).
DEFAULT_MAX_SWAP_BYTES_PER_STEP = 1 << 30
BUDGET_KEYS = ("resident_experts", "resident_fraction", "expert_memory_gib")
PREDICTION_KEYS = ("first_predicted_layer", "degrade", "staleness_tolerance")  # knobs of the verified and daop modes


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_path_in_existing_dir(value: Any) -> bool:
    return isinstance(value, str) and value != "" and os.path.isdir(os.path.dirname(os.path.abspath(value)))


# key -> (check, what is accepted)
_CHECKS: dict[str, tuple[Any, str]] = {
    "resident_experts": (lambda v: _is_int(v) and v >= 0, "an integer n with 0 <= n <= E (experts per layer)"),
    "resident_fraction": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "expert_memory_gib": (lambda v: _is_number(v) and v >= 0, "a number of GiB >= 0"),
    "mode": (lambda v: v in MODES, "one of " + ", ".join(f'"{m}"' for m in MODES)),
    "first_predicted_layer": (lambda v: _is_int(v) and v >= 1,
                              ("an integer i with 1 <= i <= L-1 (0-based index of the first MoE layer whose "
                               "experts are predicted)")),
    "degrade": (lambda v: isinstance(v, bool), "true or false"),
    "staleness_tolerance": (lambda v: _is_number(v) and v >= 0,
                            "a number >= 0 (a decode row uses its pre-computed results and predicted routing only "
                            "where 1 - cosine between its inputs at the two layers is below it; 0: never)"),
    "cpu_threads": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "profile": (lambda v: isinstance(v, str) and v != "", "a path to a JSON file of [layer, expert] pairs"),
    "realloc": (lambda v: v in REALLOC_POLICIES, "one of " + ", ".join(f'"{p}"' for p in REALLOC_POLICIES)),
    "hardware": (lambda v: isinstance(v, str) and v != "",
                 "\"auto\" (measured at start; on a CPU-only machine the a6000 preset stands in), a preset ("
                 + ", ".join(HARDWARE_PRESETS) + "), or a JSON file with pcie_gbps, device_gbps, cpu_gbps"),
    "max_swap_bytes_per_step": (lambda v: _is_int(v) and v >= 0, "an integer number of bytes >= 0"),
    "test_cpu_fault_every": (lambda v: _is_int(v) and v >= 1,
                             "an integer n >= 1 (tests only: every n-th CPU expert job fails, to exercise recovery)"),
    "swap_threshold": (lambda v: _is_number(v) and v > 0, "a number > 0 (a swap needs count[hot] > it * count[cold])"),
    "kv_reserve_tokens": (lambda v: _is_int(v) and v >= 1,
                          "an integer number of tokens >= 1 (the auto budget keeps KV cache for max_num_seqs "
                          "sequences of this many tokens before it gives device memory to experts)"),
    "stream": (lambda v: v in STREAM_MODES,
               "one of " + ", ".join(f'"{m}"' for m in STREAM_MODES) + " (host experts a step runs on the device "
               "instead, copied: where the plan finds that faster, never, or every one)"),
    "staging_slots": (lambda v: _is_int(v) and v >= 1,
                      "an integer n >= 1 (device rows for streamed experts, shared by the layers; default top-k)"),
    "expert_format": (lambda v: v in FORMATS,
                      "one of " + ", ".join(f'"{f}"' for f in FORMATS) + " (how host experts are stored: bf16 as "
                      "loaded, or quantized once at load)"),
    "device_expert_format": (lambda v: v in FORMATS,
                             "one of " + ", ".join(f'"{f}"' for f in FORMATS) + " (how device experts are stored; "
                             "default: as expert_format)"),
    "trace_path": (_is_path_in_existing_dir, "a file path in an existing directory (finished requests' routing is appended to it)"),
    "stats_path": (_is_path_in_existing_dir, "a file path in an existing directory (written with the engine's counters)"),
}
ACCEPTED_KEYS = tuple(_CHECKS)


@dataclass(frozen=True)
class DaopOptions:
    """Validated options. `budget_key` None means auto: as many experts as fit on the device."""

    budget_key: str | None = None
    budget_value: float | None = None
    mode: str = "exact"
    first_predicted_layer: int | None = None
    degrade: bool | None = None
    staleness_tolerance: float | None = None
    cpu_threads: int | None = None
    profile: str | None = None
    stats_path: str | None = None
    trace_path: str | None = None
    realloc: str = "auto"
    swap_threshold: float = 1.05
    hardware: str = "auto"
    max_swap_bytes_per_step: int = DEFAULT_MAX_SWAP_BYTES_PER_STEP
    test_cpu_fault_every: int | None = None
    kv_reserve_tokens: int | None = None
    expert_format: str = "bf16"
    device_expert_format: str | None = None  # None: as expert_format
    stream: str = "auto"
    staging_slots: int | None = None

    @classmethod
    def parse(cls, raw: dict[str, Any] | str | None) -> DaopOptions:
        """Parse `model_loader_extra_config` (a dict, or the JSON text the CLI may pass on)."""
        if raw is None or raw == "":
            raw = {}
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DaopConfigError(
                    f"model_loader_extra_config is not valid JSON ({exc.msg} at char {exc.pos}); "
                    'expected a JSON object such as {"resident_fraction": 0.5}'
                ) from None
        if not isinstance(raw, dict):
            raise DaopConfigError(
                f"model_loader_extra_config must be a JSON object (dict), got {type(raw).__name__}; "
                'for example {"resident_fraction": 0.5}'
            )
        for key, value in raw.items():
            if key not in _CHECKS:
                raise DaopConfigError(
                    f"unknown daop option {key!r}; accepted keys: {', '.join(ACCEPTED_KEYS)}"
                )
            check, accepted = _CHECKS[key]
            if not check(value):
                raise DaopConfigError(f"daop option {key!r} must be {accepted}, got {value!r}")
        budgets = [k for k in BUDGET_KEYS if k in raw]
        if len(budgets) > 1:
            raise DaopConfigError(
                f"daop options {' and '.join(map(repr, budgets))} are given together; "
                f"set at most one of {', '.join(BUDGET_KEYS)} (none: as many experts as fit)"
            )
        budget_key = budgets[0] if budgets else None
        if budget_key is not None and "kv_reserve_tokens" in raw:
            raise DaopConfigError(
                f"daop option 'kv_reserve_tokens' applies to the auto budget only, and {budget_key!r} sets the budget; "
                "drop one of them"
            )
        mode = raw.get("mode", "exact")
        knobs = [k for k in PREDICTION_KEYS if k in raw]
        if mode == "exact" and knobs:
            raise DaopConfigError(
                f"daop option {knobs[0]!r} applies to mode \"verified\" or \"daop\" only, and the mode is "
                '"exact"; set "mode" too, or drop the option'
            )
        realloc = raw.get("realloc", "auto")
        for key, policies in (("swap_threshold", ("paper",)), ("hardware", ("auto",)),
                              ("max_swap_bytes_per_step", ("paper", "auto"))):
            if key in raw and realloc not in policies:
                raise DaopConfigError(
                    f"daop option {key!r} applies to realloc {' or '.join(map(repr, policies))} only, and realloc "
                    f"is {realloc!r}; set \"realloc\" too, or drop the option"
                )
        if raw.get("stream", "auto") == "off" and "staging_slots" in raw:
            raise DaopConfigError('daop option \'staging_slots\' applies to stream "auto" or "all" only, and stream '
                                  'is "off"; drop one of them')
        if raw.get("hardware", "auto") != "auto":
            load_hardware(raw["hardware"])
        return cls(
            budget_key=budget_key,
            budget_value=raw[budget_key] if budget_key else None,
            mode=mode,
            first_predicted_layer=raw.get("first_predicted_layer"),
            degrade=raw.get("degrade"),
            staleness_tolerance=raw.get("staleness_tolerance"),
            cpu_threads=raw.get("cpu_threads"),
            profile=raw.get("profile"),
            stats_path=raw.get("stats_path"),
            trace_path=raw.get("trace_path"),
            realloc=realloc,
            swap_threshold=raw.get("swap_threshold", 1.05),
            hardware=raw.get("hardware", "auto"),
            max_swap_bytes_per_step=raw.get("max_swap_bytes_per_step", DEFAULT_MAX_SWAP_BYTES_PER_STEP),
            test_cpu_fault_every=raw.get("test_cpu_fault_every"),
            kv_reserve_tokens=raw.get("kv_reserve_tokens"),
            expert_format=raw.get("expert_format", "bf16"),
            device_expert_format=raw.get("device_expert_format"),
            stream=raw.get("stream", "auto"),
            staging_slots=raw.get("staging_slots"),
        )

    @property
    def fidelity(self) -> Fidelity:
        return Fidelity(self.mode, self.first_predicted_layer, self.degrade, self.staleness_tolerance)

    @property
    def budget(self) -> Budget:
        return Budget(self.budget_key, self.budget_value)

    @property
    def budget_asked(self) -> dict[str, Any]:
        return {self.budget_key: self.budget_value} if self.budget_key else {}

    def check_model(self, num_layers: int, num_experts: int, expert_sizes: tuple[int, int] | None = None) -> None:
        """Checks that need the model's shape (`expert_sizes`: hidden and intermediate size)."""
        for size in expert_sizes or ():
            check_format(self.expert_format, size, what="experts (daop option 'expert_format')")
            if self.device_expert_format is not None:
                check_format(self.device_expert_format, size, what="experts (daop option 'device_expert_format')")
        if self.budget_key == "resident_experts" and self.budget_value > num_experts:
            raise DaopConfigError(
                f"daop option 'resident_experts' must be an integer n with 0 <= n <= {num_experts} "
                f"(the model has {num_experts} experts per layer), got {self.budget_value}"
            )
        if self.mode != "exact" and num_layers < 2:
            raise DaopConfigError(
                f"daop mode {self.mode!r} predicts each layer's experts at the layer before, and this model has "
                f"{num_layers} MoE layer; use mode \"exact\""
            )
        first = self.first_predicted_layer
        if first is not None and not 1 <= first <= num_layers - 1:
            raise DaopConfigError(
                f"daop option 'first_predicted_layer' must be an integer i with 1 <= i <= {num_layers - 1} "
                f"(the model has {num_layers} MoE layers), got {first}"
            )

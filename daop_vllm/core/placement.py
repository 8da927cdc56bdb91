"""Which experts are device-resident: budgets turned into slots, and slots filled by rank."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from daop_vllm.core.errors import DaopConfigError

Pair = tuple[int, int]  # (layer, expert)


@dataclass(frozen=True)
class Budget:
    """How many experts are device-resident: `resident_experts` (per layer), `resident_fraction`
    (of all), `expert_memory_gib` (of device memory), or, with no kind, auto (what fits)."""

    kind: str | None = None
    value: float | None = None


def load_profile(path: str | Path, num_layers: int, num_experts: int) -> list[Pair]:
    """Read a calibration profile: a JSON list of [layer, expert] pairs, most popular first."""
    accepted = f"a JSON list of distinct [layer, expert] pairs with 0 <= layer < {num_layers}, 0 <= expert < {num_experts}"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DaopConfigError(f"daop option 'profile': file {str(path)!r} does not exist; expected {accepted}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DaopConfigError(f"daop option 'profile': cannot read {str(path)!r} ({exc}); expected {accepted}") from None
    if not isinstance(data, list):
        raise DaopConfigError(f"daop option 'profile': {str(path)!r} holds a {type(data).__name__}; expected {accepted}")
    pairs: list[Pair] = []
    for item in data:
        ok = (
            isinstance(item, list)
            and len(item) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in item)
            and 0 <= item[0] < num_layers
            and 0 <= item[1] < num_experts
        )
        if not ok:
            raise DaopConfigError(f"daop option 'profile': {str(path)!r} has entry {item!r}; expected {accepted}")
        pairs.append((item[0], item[1]))
    if len(set(pairs)) != len(pairs):
        raise DaopConfigError(f"daop option 'profile': {str(path)!r} lists a pair twice; expected {accepted}")
    return pairs


def rank_pairs(num_layers: int, num_experts: int, profile: list[Pair] | None = None) -> list[Pair]:
    """Every (layer, expert) pair, most preferred first: the profile's order, then unlisted
    pairs by expert index (layer breaking ties)."""
    listed = list(profile or [])
    seen = set(listed)
    rest = [(layer, e) for e in range(num_experts) for layer in range(num_layers) if (layer, e) not in seen]
    return listed + rest


def total_slots(
    budget: Budget,
    num_layers: int,
    num_experts: int,
    expert_bytes: int,
    auto_bytes: int | None,
) -> int:
    """Resident experts over all layers for the budget. `auto_bytes` is the device memory left
    for experts (None: device and host share one memory, so all are resident)."""
    all_experts = num_layers * num_experts
    if budget.kind == "resident_experts":
        return int(budget.value) * num_layers
    if budget.kind == "resident_fraction":
        return math.floor(budget.value * all_experts)
    budget_bytes = budget.value * 2**30 if budget.kind == "expert_memory_gib" else auto_bytes
    if budget_bytes is None:
        return all_experts
    return min(all_experts, int(budget_bytes // expert_bytes))


def plan_residency(slots: int, num_layers: int, num_experts: int, ranking: list[Pair]) -> list[list[int]]:
    """Resident experts per layer: floor(slots / L) each, taken by rank within the layer; the
    leftover slots go to the best-ranked pairs not yet resident."""
    per_layer = min(num_experts, slots // num_layers)
    resident: list[list[int]] = [[] for _ in range(num_layers)]
    for layer, expert in ranking:
        if len(resident[layer]) < per_layer:
            resident[layer].append(expert)
    leftover = min(slots, num_layers * num_experts) - per_layer * num_layers
    for layer, expert in ranking:
        if leftover == 0:
            break
        if expert not in resident[layer]:
            resident[layer].append(expert)
            leftover -= 1
    return [sorted(experts) for experts in resident]


def plan_for_budget(
    budget: Budget, num_layers: int, num_experts: int, expert_bytes: int, auto_bytes: int | None,
    profile: list[Pair] | None = None,
) -> list[list[int]]:
    """Resident experts per layer for the budget, ranked by the profile (see rank_pairs)."""
    slots = total_slots(budget, num_layers, num_experts, expert_bytes, auto_bytes)
    return plan_residency(slots, num_layers, num_experts, rank_pairs(num_layers, num_experts, profile))

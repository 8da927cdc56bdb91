import json
import math

import pytest

from daop_vllm.core.errors import DaopConfigError
from daop_vllm.core.placement import Budget, load_profile, plan_for_budget, plan_residency, rank_pairs, total_slots


def test_rank_without_profile_is_by_expert_index():
    assert rank_pairs(2, 3) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]


def test_rank_puts_profile_first_then_the_rest():
    ranking = rank_pairs(2, 3, [(1, 2), (0, 1)])
    assert ranking[:2] == [(1, 2), (0, 1)]
    assert sorted(ranking) == sorted(rank_pairs(2, 3)) and len(ranking) == 6


@pytest.mark.parametrize("fraction", [0, 0.1, 0.25, 0.3, 0.469, 0.5, 0.77, 1])
def test_fraction_gives_floor_per_layer_plus_leftovers_by_rank(fraction):
    layers, experts = 32, 8
    profile = [(layer, (layer * 3 + i) % experts) for i in range(experts) for layer in reversed(range(layers))]
    plan = plan_for_budget(Budget("resident_fraction", fraction), layers, experts, expert_bytes=1, auto_bytes=None)
    per_layer = math.floor(fraction * experts)
    assert sum(map(len, plan)) == math.floor(fraction * layers * experts)
    assert all(per_layer <= len(r) <= per_layer + 1 for r in plan)
    ranking = rank_pairs(layers, experts, profile)
    resident = plan_residency(math.floor(fraction * layers * experts), layers, experts, ranking)
    # Each layer's base slots hold its best-ranked experts; leftovers go to the best remaining pairs.
    for layer in range(layers):
        own = [e for l, e in ranking if l == layer]
        assert set(own[:per_layer]) <= set(resident[layer])
    extra = [(l, e) for l, e in ranking if e in resident[l] and e not in [x for m, x in ranking if m == l][:per_layer]]
    remaining = [(l, e) for l, e in ranking if e not in [x for m, x in ranking if m == l][:per_layer]]
    assert extra == remaining[: len(extra)]


def test_budgets_in_experts_and_memory():
    assert total_slots(Budget("resident_experts", 3), 4, 8, 100, None) == 12
    assert total_slots(Budget("expert_memory_gib", 1), 4, 8, 2**30 // 10, None) == 10
    assert total_slots(Budget("expert_memory_gib", 100), 4, 8, 2**20, None) == 32
    auto = Budget()
    assert total_slots(auto, 4, 8, 100, None) == 32, "shared memory: everything resident"
    assert total_slots(auto, 4, 8, 100, 750) == 7


def test_profile_round_trip(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps([[1, 2], [0, 0]]))
    assert load_profile(path, 2, 4) == [(1, 2), (0, 0)]


@pytest.mark.parametrize(
    "content, words",
    [
        (None, "does not exist"),
        ("{not json", "cannot read"),
        ('{"a": 1}', "holds a dict"),
        ("[[0, 1, 2]]", "has entry [0, 1, 2]"),
        ("[[0, 9]]", "has entry [0, 9]"),
        ("[[5, 0]]", "has entry [5, 0]"),
        ('[["0", 1]]', "has entry"),
        ("[[0, 1], [0, 1]]", "lists a pair twice"),
    ],
)
def test_bad_profiles_are_rejected(tmp_path, content, words):
    path = tmp_path / "profile.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DaopConfigError) as info:
        load_profile(path, 2, 4)
    assert words in str(info.value) and "'profile'" in str(info.value)
    assert "[layer, expert]" in str(info.value)

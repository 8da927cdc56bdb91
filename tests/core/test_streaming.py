"""The streaming plan: CPU or staging slot for each host expert, by hand and against the
exhaustive optimum."""

import itertools
import random

import pytest

from daop_vllm.core.hardware import HARDWARE_PRESETS
from daop_vllm.core.streaming import MissCosts, expert_costs, layer_seconds, layer_timeline, plan_streaming

# round numbers: a CPU expert costs 1 s a token, a copy 3 s, a device expert 0.5 s whatever its tokens
HAND = MissCosts(cpu_s=lambda n: 1.0 * n, device_s=lambda n: 0.5, copy_s=3.0)


def test_one_expert_streams_only_when_that_ends_sooner():
    assert plan_streaming([2], HAND, 0.0, 1) == [False]  # CPU 2 s < copy 3 + 0.5
    assert plan_streaming([5], HAND, 0.0, 1) == [True]  # CPU 5 s > 3.5
    assert layer_seconds([5], [True], HAND, 0.0, 1) == 3.5
    assert layer_seconds([5], [True], HAND, 4.0, 1) == 4.5  # the copy hides behind resident work


def test_a_tie_stays_on_the_cpu():
    assert plan_streaming([3.5], HAND, 0.0, 1) == [False]  # 3.5 s either way: nothing to gain


def test_off_all_and_no_slots():
    tokens = [10, 8, 1]
    assert plan_streaming(tokens, HAND, 0.0, 2, "off") == [False] * 3
    assert plan_streaming(tokens, HAND, 0.0, 2, "all") == [True] * 3
    assert plan_streaming(tokens, HAND, 0.0, 0, "all") == [False] * 3, "no staging slot: nothing can stream"
    with pytest.raises(ValueError, match="stream mode 'some'"):
        plan_streaming(tokens, HAND, 0.0, 2, "some")


def test_both_sides_share_the_work():
    # CPU alone 19 s; streaming the two heaviest: copies end at 3 and 6, device at 3.5 and 6.5; CPU 1 s
    assert plan_streaming([10, 8, 1], HAND, 0.0, 2) == [True, True, False]
    assert layer_seconds([10, 8, 1], [True, True, False], HAND, 0.0, 2) == 6.5


def test_a_busy_cpu_pushes_work_to_the_device():
    assert plan_streaming([2], HAND, 0.0, 1, cpu_busy_s=0.0) == [False]
    assert plan_streaming([2], HAND, 0.0, 1, cpu_busy_s=5.0) == [True]  # 7 s on the CPU against 3.5


def test_auto_is_never_slower_than_either_side_alone():
    rng = random.Random(3)
    for _ in range(300):
        tokens = [rng.randint(1, 12) for _ in range(rng.randint(1, 10))]
        busy, slots, cpu_busy = rng.uniform(0, 5), rng.randint(1, 3), rng.uniform(0, 5)
        plan = layer_seconds(tokens, plan_streaming(tokens, HAND, busy, slots, cpu_busy_s=cpu_busy), HAND, busy,
                             slots, cpu_busy)
        for alone in ([False] * len(tokens), [True] * len(tokens)):
            assert plan <= layer_seconds(tokens, alone, HAND, busy, slots, cpu_busy)


def test_experts_staged_a_layer_early_run_first_and_a_busy_link_delays_the_rest():
    # staged, landed at -1 (before the layer): it runs [0, 0.5]; the link is free from 2: the next copy [2, 5]
    assert layer_timeline([5], [True], HAND, 0.0, 2, staged=[(4, -1.0)], copy_start_s=2.0) == (5.5, 0.0)
    assert layer_timeline([], [], HAND, 1.0, 1, staged=[(4, 2.0)]) == (2.5, 0.0)  # waits for its copy to land
    # a head start (copies issued a layer early, from -3) makes a copy worth it that would not be otherwise
    assert plan_streaming([2], HAND, 0.0, 1) == [False]
    assert plan_streaming([2], HAND, 0.0, 1, copy_start_s=-3.0) == [True]  # lands at 0, runs [0, 0.5]
    # the staged expert holds the only slot until it has run: the next copy starts then
    assert layer_timeline([5], [True], HAND, 0.0, 1, staged=[(4, 1.0)], copy_start_s=0.0) == (5.0, 0.0)


def test_a_full_staging_budget_makes_copies_wait_for_a_free_slot():
    slow_device = MissCosts(cpu_s=lambda n: 1.0 * n, device_s=lambda n: 4.0, copy_s=1.0)
    # one slot: copy 1 [0, 1], run [1, 5]; copy 2 waits for the slot [5, 6], run [6, 10]
    assert layer_seconds([20, 20], [True, True], slow_device, 0.0, 1) == 10.0
    # two slots: copy 2 [1, 2] while expert 1 runs; it runs [5, 9]
    assert layer_seconds([20, 20], [True, True], slow_device, 0.0, 2) == 9.0


def exhaustive(tokens, costs, busy, slots) -> float:
    return min(layer_seconds(tokens, list(split), costs, busy, slots)
               for split in itertools.product([False, True], repeat=len(tokens)))


def preset_costs(name: str, expert_bytes: int, flops_per_token: int) -> MissCosts:
    return expert_costs(HARDWARE_PRESETS[name], expert_bytes, flops_per_token)


MIXTRAL = (3 * 4096 * 14336 * 2, 6 * 4096 * 14336)  # expert bytes in bf16, FLOPs per token
DEEPSEEK_V2_LITE = (3 * 2048 * 1408 * 2, 6 * 2048 * 1408)


@pytest.mark.parametrize("preset", ["a6000", "h200"])
def test_greedy_is_within_5_percent_of_the_optimum(preset):
    costs = preset_costs(preset, *MIXTRAL)
    rng = random.Random(0)
    worst = 0.0
    for _ in range(150):
        experts = rng.randint(1, 12)
        tokens = [max(1, int(rng.paretovariate(1.2) * rng.choice([1, 4, 32, 256]))) for _ in range(experts)]
        busy = rng.choice([0.0, 0.2, 1.0]) * costs.copy_s
        slots = rng.choice([1, 2, 4])
        greedy = layer_seconds(tokens, plan_streaming(tokens, costs, busy, slots), costs, busy, slots)
        worst = max(worst, greedy / exhaustive(tokens, costs, busy, slots))
    assert worst <= 1.05, worst


@pytest.mark.parametrize("preset", ["a6000", "h200"])
def test_greedy_is_within_5_percent_of_the_optimum_on_trace_layers(preset):
    """Prefill layers of the DeepSeek-V2-Lite trace, 12 of their host experts at a time (every
    16th expert resident), the resident experts' device time first."""
    from daop_vllm.offline.traces import read_traces

    from ..shared_traces import trace_path

    costs = preset_costs(preset, *DEEPSEEK_V2_LITE)
    rng = random.Random(1)
    worst, layers, streamed = 0.0, 0, 0
    for seq in list(read_traces(trace_path("deepseek-v2-lite-puffin.dev.jsonl.gz")))[:4]:
        for rows in seq.prefill:
            counts = [0] * seq.num_experts
            for row in rows:
                for expert in row:
                    counts[expert] += 1
            busy = sum(costs.device_s(counts[e]) for e in range(0, seq.num_experts, 16) if counts[e])
            host = [counts[e] for e in range(seq.num_experts) if e % 16 and counts[e]]
            tokens = rng.sample(host, min(12, len(host)))
            plan = plan_streaming(tokens, costs, busy, 4)
            greedy = layer_seconds(tokens, plan, costs, busy, 4)
            worst = max(worst, greedy / exhaustive(tokens, costs, busy, 4))
            layers, streamed = layers + 1, streamed + any(plan)
    assert layers >= 50 and streamed > 0
    assert worst <= 1.05, worst

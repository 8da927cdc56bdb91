"""Re-allocation: the paper's rule by hand, at batch 1 through the engine, and its effect on
real routing (DeepSeek-V2-Lite traces, split into prefill and decode halves)."""

import torch

from daop_vllm.core.batch import StepBatch
from daop_vllm.core.engine import DaopEngine
from daop_vllm.core.placement import plan_residency, rank_pairs
from daop_vllm.core.realloc import paper_swaps
from daop_vllm.core.routing import SoftmaxTopK
from daop_vllm.core.traces import read_traces

from .traces import trace_path


def test_paper_rule_by_hand():
    counts = torch.tensor([5, 0, 3, 9, 1, 0, 2, 7], dtype=torch.float32)
    # host experts 4..7 by tokens: 7 (7), 6 (2), 4 (1), 5 (0); device 0..3 fewest first: 1 (0), 2 (3), 0 (5), 3 (9)
    assert paper_swaps(counts, [0, 1, 2, 3]) == [(7, 1)]
    assert paper_swaps(counts, [0, 1, 2, 3], swap_threshold=0.1) == [(7, 1), (6, 2), (4, 0)]
    assert paper_swaps(torch.ones(8), [0, 1, 2, 3]) == [], "equal counts never swap (1 > 1.05 is false)"
    assert paper_swaps(counts, list(range(8))) == [] and paper_swaps(counts, []) == []


def published_rule(counts: list[int], resident: set[int], threshold: float = 1.05) -> set[int]:
    """The rule as the paper states it, written out plainly."""
    e = len(counts)
    hot = sorted([x for x in range(e) if x not in resident], key=lambda x: (-counts[x], x))[: e // 2]
    cold = sorted(resident, key=lambda x: (counts[x], x))[: e // 2]
    new = set(resident)
    for h, c in zip(hot, cold):
        if counts[h] > threshold * counts[c]:
            new.remove(c)
            new.add(h)
    return new


def make_engine(layers: int, experts: int, top_k: int, realloc: str) -> DaopEngine:
    engine = DaopEngine(torch.device("cpu"), cpu_threads=2, realloc=realloc)
    for _ in range(layers):
        layer = engine.add_layer(experts, 16, 16, torch.float32, SoftmaxTopK(top_k))
        layer.store.w13.normal_()
        layer.store.w2.normal_()
    return engine


def logits_choosing(choices: list[list[int]], experts: int) -> torch.Tensor:
    """Router logits whose top-k are exactly `choices` [T][K], in that order."""
    logits = torch.zeros(len(choices), experts)
    for t, row in enumerate(choices):
        for rank, expert in enumerate(row):
            logits[t, expert] = 10.0 - rank
    return logits


def run_step(engine: DaopEngine, rows_per_layer: list[list[list[int]]], prefill: bool) -> None:
    tokens = len(rows_per_layer[0])
    engine.begin_step(StepBatch(("seq",), (tokens,), (prefill,), (prefill,)))
    for layer, rows in zip(engine.layers, rows_per_layer):
        layer.forward(torch.zeros(tokens, 16), logits_choosing(rows, engine.num_experts))
    engine.end_step()
    engine.drop_request("seq")


def deepseek(limit: int):
    seqs = list(read_traces(trace_path("deepseek-v2-lite-puffin.dev.jsonl.gz")))
    return [s for s in seqs if len(s.prefill[0]) >= 8][:limit]


def test_paper_at_batch_one_is_the_published_rule_and_keeps_quotas():
    seqs = deepseek(8)
    shape = seqs[0]
    engine = make_engine(shape.num_layers, shape.num_experts, shape.top_k, "paper")
    slots = shape.num_layers * shape.num_experts // 4
    engine.place(plan_residency(slots, shape.num_layers, shape.num_experts, rank_pairs(shape.num_layers, shape.num_experts)))
    expected = [set(r) for r in engine.resident_experts()]
    for seq in seqs:
        run_step(engine, seq.prefill, prefill=True)
        for layer in range(seq.num_layers):
            counts = torch.bincount(torch.tensor(seq.prefill[layer]).flatten(), minlength=seq.num_experts).tolist()
            expected[layer] = published_rule(counts, expected[layer])
        assert [set(r) for r in engine.resident_experts()] == expected
        assert [len(r) for r in engine.resident_experts()] == [shape.num_experts // 4] * shape.num_layers
    assert engine.report()["totals"]["swaps"] > 0 and len(engine.requests) == 0
    engine.close()


def test_paper_beats_static_profile_on_decode_hit_rate():
    seqs = deepseek(45)
    calibration, scored = seqs[:15], seqs[15:]
    shape = seqs[0]
    counts = torch.zeros(shape.num_layers, shape.num_experts)
    for seq in calibration:
        for layer in range(seq.num_layers):
            counts[layer] += torch.bincount(torch.tensor(seq.prefill[layer]).flatten(), minlength=seq.num_experts)
    order = torch.argsort(counts.flatten(), descending=True, stable=True).tolist()
    profile = [(i // shape.num_experts, i % shape.num_experts) for i in order]
    slots = shape.num_layers * shape.num_experts // 4
    hit_rates = {}
    for realloc in ("off", "paper"):
        engine = make_engine(shape.num_layers, shape.num_experts, shape.top_k, realloc)
        engine.place(plan_residency(slots, shape.num_layers, shape.num_experts, rank_pairs(shape.num_layers, shape.num_experts, profile)))
        for seq in scored:
            half = len(seq.prefill[0]) // 2
            run_step(engine, [rows[:half] for rows in seq.prefill], prefill=True)
            run_step(engine, [rows[half:] for rows in seq.prefill], prefill=False)
        totals = engine.report()["totals"]
        hit_rates[realloc] = totals["decode_device_expert_tokens"] / (
            totals["decode_device_expert_tokens"] + totals["decode_cpu_expert_tokens"])
        engine.close()
    assert hit_rates["paper"] > hit_rates["off"], hit_rates

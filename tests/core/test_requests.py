"""Per-request state: rows to requests, phases, decay, and dropping."""

import torch

from daop_vllm.core.batch import StepBatch
from daop_vllm.core.requests import RequestTracker
from daop_vllm.core.stats import DaopStats
from daop_vllm.core.step_counts import PredictionOutcome, add_predictions_to_stats


def test_rows_map_to_requests_and_phases_with_padding():
    batch = StepBatch(("a", "b", "c"), (3, 1, 2), (True, False, True), (True, False, False))
    assert batch.row_request(8).tolist() == [0, 0, 0, 1, 2, 2, -1, -1]
    assert batch.row_is_prefill(8).tolist() == [True, True, True, False, True, True, False, False]


def test_counts_go_to_their_request_and_phase_then_decay_and_drop():
    tracker = RequestTracker(num_layers=2, num_experts=4, decode_decay=0.5)
    tracker.begin_step(StepBatch(("a", "b"), (2, 1), (True, False), (True, False)))
    tracker.record(0, torch.tensor([[0, 1], [0, 2], [3, 1]]))
    assert tracker.prefill_counts["a"][0].tolist() == [2, 1, 1, 0]
    assert tracker.decode_counts["b"][0].tolist() == [0, 1, 0, 1]
    assert tracker.prefill_counts["b"].sum() == 0 and tracker.decode_counts["a"].sum() == 0
    tracker.end_step()
    tracker.begin_step(StepBatch(("b",), (1,), (False,), (False,)))
    assert tracker.decode_counts["b"][0].tolist() == [0, 0.5, 0, 0.5], "decode counts decay each step"
    tracker.record(1, torch.tensor([[2, 3]]))
    assert tracker.decode_counts["b"][1].tolist() == [0, 0, 1, 1]
    tracker.end_step()
    tracker.drop("a")
    tracker.drop("b")
    tracker.drop("never-seen")
    assert len(tracker) == 0 and not tracker.decode_counts


def test_requests_past_the_first_rows_and_rows_freed_by_dropped_ones_keep_their_own_counts():
    """Each request's counts are a row of one tensor, which grows; a dropped request's row goes
    to a later request zeroed, and each request's counts read the same through the dicts."""
    tracker = RequestTracker(num_layers=1, num_experts=20, decode_decay=0.5)
    names = [f"r{i}" for i in range(20)]
    for step in range(3):  # 20 requests: past the first 8 rows and the next 8
        tracker.begin_step(StepBatch(tuple(names), (1,) * 20, (step == 0,) * 20, (step == 0,) * 20))
        tracker.record(0, torch.arange(20)[:, None])  # request i routes to expert i
        tracker.end_step()
    for i, name in enumerate(names):
        assert tracker.prefill_counts[name][0].tolist() == [float(e == i) for e in range(20)]
        assert tracker.decode_counts[name][0].tolist() == [1.5 * (e == i) for e in range(20)]  # 1 * 0.5 + 1
    demand = tracker.expected_demand(top_k=1)
    assert torch.allclose(demand, torch.ones(1, 20)), "each request expects one token on its expert"
    tracker.drop("r3")
    tracker.begin_step(StepBatch(("new",), (1,), (True,), (False,)))
    assert tracker.prefill_counts["new"].sum() == 0 and tracker.decode_counts["new"].sum() == 0
    tracker.record(0, torch.tensor([[7]]))
    tracker.end_step()
    assert tracker.prefill_counts["new"][0, 7] == 1 and tracker.prefill_counts["r7"][0].sum() == 1
    assert len(tracker) == 20


def test_rows_that_do_not_match_the_batch_are_not_attributed():
    tracker = RequestTracker(num_layers=1, num_experts=4)
    tracker.begin_step(StepBatch(("a",), (4,), (True,), (True,)))
    tracker.record(0, torch.tensor([[0, 1]]))  # fewer rows than the batch: a dummy run
    assert tracker.prefill_counts["a"].sum() == 0
    tracker.end_step()
    tracker.record(0, torch.tensor([[0, 1]]))  # outside a step
    assert tracker.prefill_counts["a"].sum() == 0



def test_a_steps_prediction_outcomes_are_counted_per_layer_at_its_end():
    """Layers sharing the step's rows are counted in one stack, others one by one; either way
    each layer gets its own counts (worked out pair by pair in the comments)."""
    rows = torch.tensor([0, 2])
    own = torch.tensor([[1, 2], [0, 3], [4, 5]])  # [T, K]: the layer's own routing
    outcomes = [
        # row 0 chose [1, 2]: 2 and 1 right; row 2 chose [4, 5]: 4 right, 0 wrong
        PredictionOutcome(3, torch.tensor([[2, 1], [4, 0]]), rows, own, torch.tensor([True, False, True]), None),
        # row 0 chose [2, 3]: 7 and 6 wrong; row 2 chose [5, 6]: 5 right, 4 wrong
        PredictionOutcome(5, torch.tensor([[7, 6], [5, 4]]), rows, own + 1, torch.tensor([False]),
                          torch.tensor([True])),
        # rows of its own: row 1 chose [0, 3]: 0 right, 2 wrong
        PredictionOutcome(6, torch.tensor([[0, 2]]), torch.tensor([1]), own, torch.tensor([True, True]),
                          torch.tensor([False, False])),
    ]
    stats = DaopStats(7)
    add_predictions_to_stats(stats, outcomes, [(3, torch.tensor([True, True])), (4, torch.tensor([False, True]))])
    expected = {  # layer: predictions, correct, used, rejected, wasted, degraded
        3: (4, 3, 2, 0, 1, 2),
        4: (0, 0, 0, 0, 0, 1),
        5: (4, 1, 0, 1, 0, 0),
        6: (2, 1, 2, 0, 0, 0),
    }
    for layer, counts in expected.items():
        got = stats.layer(layer)
        assert tuple(got[name] for name in ("predictions", "predictions_correct", "precomputed_used",
                                            "precomputed_rejected", "precomputed_wasted", "degraded")) == counts, layer

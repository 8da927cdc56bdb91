"""Per-request state: rows to requests, phases, decay, and dropping."""

import torch

from daop_vllm.core.batch import StepBatch
from daop_vllm.core.requests import RequestTracker


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


def test_rows_that_do_not_match_the_batch_are_not_attributed():
    tracker = RequestTracker(num_layers=1, num_experts=4)
    tracker.begin_step(StepBatch(("a",), (4,), (True,), (True,)))
    tracker.record(0, torch.tensor([[0, 1]]))  # fewer rows than the batch: a dummy run
    assert tracker.prefill_counts["a"].sum() == 0
    tracker.end_step()
    tracker.record(0, torch.tensor([[0, 1]]))  # outside a step
    assert tracker.prefill_counts["a"].sum() == 0

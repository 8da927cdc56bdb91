"""Modes `verified` and `daop` through the real vLLM engine: prediction at every decode row of
batched requests, at fractions 1, 0.5, 0.25 and 0 (one engine per mode, re-placed at run time)."""

import pytest

from .engines import MAX_TOKENS, PROMPTS, run_counted, running_llm, runs_at_fractions

FRACTIONS = [1, 0.5, 0.25, 0]


def check_prediction_counters(report: dict, mode: str, fraction: float) -> None:
    layers, totals = report["layers"], report["totals"]
    assert report["mode"] == mode and report["first_predicted_layer"] == 1
    assert layers[0]["predictions"] == 0, "layer 0 is never predicted"
    # every predicted layer sees each decode row's K predictions (2 per row in the tiny model)
    decode_pairs = layers[1]["decode_device_expert_tokens"] + layers[1]["decode_cpu_expert_tokens"]
    assert all(layer["predictions"] == decode_pairs > 0 for layer in layers[1:])
    assert 0 < totals["predictions_correct"] <= totals["predictions"]
    precomputed = totals["precomputed_used"] + totals["precomputed_rejected"] + totals["precomputed_wasted"]
    if fraction == 1:
        assert precomputed == 0 and totals["cpu_expert_tokens"] == 0
    else:
        assert totals["precomputed_used"] > 0
    if mode == "daop":
        assert totals["precomputed_wasted"] == 0, "daop routes by the prediction: every pre-computed result is used"
        if fraction in (0.5, 0.25):
            assert totals["degraded"] > 0
            for layer in layers[1:]:  # at most one CPU expert per decode row in predicted layers
                assert layer["decode_cpu_expert_tokens"] <= decode_pairs // 2
    if mode == "verified" or fraction in (0, 1):
        assert totals["degraded"] == 0


@pytest.mark.parametrize("mode", ["verified", "daop"])
def test_mode_runs_batches_at_every_fraction(tiny_mixtral, stock_ids, mode):
    options = {"resident_fraction": 1, "mode": mode, "first_predicted_layer": 1}
    with running_llm(tiny_mixtral, enforce_eager=True, load_format="daop", model_loader_extra_config=options) as llm:
        for fraction, ids, report in runs_at_fractions(llm, FRACTIONS):
            assert len(ids) == len(PROMPTS) and all(len(i) == MAX_TOKENS for i in ids)
            check_prediction_counters(report, mode, fraction)
            if mode == "verified" and fraction == 1:
                assert ids == stock_ids, "verified with every expert resident is exact"


def test_staleness_tolerance_spans_exact_to_verified(tiny_mixtral, stock_ids):
    """Verified at 0.25: tolerance 0 is exact (stock's tokens), a huge one today's verified."""
    options = {"resident_fraction": 0.25, "mode": "verified", "first_predicted_layer": 1}
    with running_llm(tiny_mixtral, enforce_eager=True, load_format="daop", model_loader_extra_config=options) as llm:
        verified_ids, _ = run_counted(llm)
        assert verified_ids != stock_ids, "the check needs a verified run that differs from exact"
        runs = {}
        for tolerance in (0.0, 1e9, None):
            llm.collective_rpc("daop_set_staleness_tolerance", args=(tolerance,))
            runs[tolerance] = run_counted(llm)
        assert runs[0.0][0] == stock_ids
        assert runs[1e9][0] == verified_ids and runs[None][0] == verified_ids
        zero, huge = runs[0.0][1]["totals"], runs[1e9][1]["totals"]
        assert runs[0.0][1]["staleness_tolerance"] == 0.0
        assert zero["precomputed_used"] == zero["precomputed_wasted"] == 0 and zero["precomputed_rejected"] > 0
        assert huge["precomputed_rejected"] == 0 and huge["precomputed_used"] > 0

"""Streaming forced (`stream: "all"`) through the real vLLM engine: every host expert of a step
goes the streaming path and the greedy tokens stay stock's. On this CPU-only machine host and
device are one memory, so the path is its plan and bookkeeping (nothing is copied); the copies
themselves are tested in the core (tests/core/test_streamed_experts.py)."""

import pytest

from .engines import running_llm, runs_at_fractions
from .test_matches_stock import FAMILIES, close_llm, greedy_ids, make_llm


def check_streamed(report: dict, fraction: float) -> None:
    totals = report["totals"]
    assert report["stream"] == "all" and report["staging_bytes"] == 0, "one memory: no staging rows"
    assert totals["cpu_expert_tokens"] == 0, "every host expert streamed"
    if fraction == 1:
        assert totals["streamed_experts"] == 0
    else:
        assert totals["streamed_experts"] > 0 and totals["stream_bytes"] == 0
        assert totals["prefill_streamed_experts"] > 0 and totals["decode_streamed_experts"] > 0


@pytest.mark.parametrize("mode", ["exact", "verified"])
def test_streaming_every_miss_gives_stock_tokens_at_every_fraction(tiny_mixtral, stock_ids, mode):
    options = {"resident_fraction": 0.25, "realloc": "off", "stream": "all", "staging_slots": 2}
    if mode != "exact":
        options.update(mode=mode, first_predicted_layer=1, staleness_tolerance=0.0)  # verified run as exact
    with running_llm(tiny_mixtral, enforce_eager=True, load_format="daop", model_loader_extra_config=options) as llm:
        for fraction, ids, report in runs_at_fractions(llm, [0.25, 1, 0.5, 0]):
            assert ids == stock_ids, f"fraction {fraction}"
            check_streamed(report, fraction)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_streaming_every_miss_matches_stock_in_every_family(family, tmp_path):
    from daop_vllm.cli.model_builder import build_tiny_mixtral

    spec = FAMILIES[family]
    model = str(build_tiny_mixtral(tmp_path, spec.shape, family=family, init_std=0.2))
    stock = make_llm(model, enforce_eager=True, **spec.engine_args)
    expected = greedy_ids(stock)
    close_llm(stock)
    options = {"resident_fraction": 0.25, "realloc": "off", "stream": "all"}
    with running_llm(model, enforce_eager=True, load_format="daop", **spec.engine_args,
                     model_loader_extra_config=options) as llm:
        for fraction, ids, report in runs_at_fractions(llm, [0.25, 0.5]):
            assert ids == expected, f"fraction {fraction}"
            check_streamed(report, fraction)

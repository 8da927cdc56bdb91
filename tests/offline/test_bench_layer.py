"""`daop-vllm bench layer`'s rows: every setting timed three ways, the shares derived from them."""

import pytest

from daop_vllm.bench.layer import BATCHES, FRACTIONS, MODES, run


def test_bench_layer_times_every_setting_three_ways():
    rows = run(rounds=1, steps=1)["rows"]
    assert {(r["batch"], r["fraction"], r["mode"]) for r in rows} == {
        (b, f, m) for b in BATCHES for f in FRACTIONS for m in MODES}
    for row in rows:
        assert min(row["daop_us"], row["direct_us"], row["routed_us"]) > 0
        assert row["daop_over_direct"] == pytest.approx(row["daop_us"] / row["direct_us"], rel=0.05)
        assert row["daop_over_routed"] == pytest.approx(row["daop_us"] / row["routed_us"], rel=0.05)
        assert row["machinery_share"] == pytest.approx(max(0, 1 - row["direct_us"] / row["daop_us"]), abs=0.01)
        assert row["machinery_share_past_router"] == pytest.approx(max(0, 1 - row["routed_us"] / row["daop_us"]),
                                                                   abs=0.01)
        assert row["machinery_us"] == pytest.approx(row["daop_us"] - row["direct_us"], abs=0.2)
        assert row["router_us"] == pytest.approx(row["routed_us"] - row["direct_us"], abs=0.2)

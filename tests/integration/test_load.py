"""Load: 64 concurrent streaming clients, 1,000 requests of mixed prompt and output lengths,
`exact` at fraction 0.25 against the stock server in the same run."""

import pytest

pytest.importorskip("openai", reason="the openai client is installed by `make test`")


@pytest.mark.slow
def test_thousand_streaming_requests_match_stock_with_bounded_memory(tiny_mixtral, tmp_path):
    from daop_vllm.bench.serve_load import compare

    result = compare(tiny_mixtral, 1000, 64, '{"resident_fraction": 0.25, "mode": "exact"}', tmp_path)
    assert result["answered"] == {"stock": 1000, "daop": 1000}, "every request answered in full"
    assert result["outputs_equal_stock"] == 1000
    for name in ("stock", "daop"):
        half, end = result[name]["rss_half_mib"], result[name]["rss_end_mib"]
        assert end <= 1.05 * half + 64, f"{name} server memory grew over the second half: {half:.0f} -> {end:.0f} MiB"

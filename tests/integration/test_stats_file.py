"""`stats_path`: written by the process that owns the layers, agreeing with the work done."""

import json

from .engines import close_llm, make_llm


def test_stats_file_and_trace_at_fraction_zero(tiny_mixtral, tmp_path):
    from vllm import SamplingParams

    from daop_vllm.offline.traces import read_traces

    stats_path, trace_path = tmp_path / "stats.json", tmp_path / "trace.jsonl.gz"
    llm = make_llm(tiny_mixtral, enforce_eager=True, load_format="daop",
                   model_loader_extra_config={"resident_fraction": 0, "stats_path": str(stats_path),
                                              "trace_path": str(trace_path)})
    assert stats_path.exists(), "written as soon as the engine is placed"
    llm.collective_rpc("daop_reset_counters")
    outputs = llm.generate(["Hello world", "The quick brown fox"], SamplingParams(temperature=0, max_tokens=8),
                           use_tqdm=False)
    report = llm.collective_rpc("daop_report")[0]
    close_llm(llm)
    written = json.loads(stats_path.read_text())
    assert written["totals"] == report["totals"], "the last write happens at shutdown"
    assert written["totals"]["device_expert_tokens"] == 0
    tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outputs)
    top_k = 2
    for layer in written["layers"]:
        assert layer["resident"] == [] and layer["device_expert_tokens"] == 0
        assert layer["cpu_expert_tokens"] == tokens * top_k
    assert written["mode"] == "exact" and written["budget"]["asked"] == {"resident_fraction": 0}
    assert not list(tmp_path.glob(".*.tmp")), "no temporary files left behind"

    # The trace: one sequence per request, a row per prompt token and per generated token fed
    # back (the last one is sampled, never fed), the same expert counts as the counters.
    # ids are vLLM's internal request ids: the caller's id, a dash and a suffix vLLM adds
    sequences = {s.id.rsplit("-", 1)[0]: s for s in read_traces(trace_path)}
    assert len(sequences) == len(outputs), list(sequences)
    for output in outputs:
        seq = sequences[output.request_id]
        assert (seq.num_layers, seq.num_experts, seq.top_k) == (4, 8, 2)
        assert all(len(rows) == len(output.prompt_token_ids) for rows in seq.prefill)
        assert all(len(rows) == len(output.outputs[0].token_ids) - 1 for rows in seq.decode)
        assert all(abs(sum(w) - 1) < 1e-4 for rows in seq.prefill_probs for w in rows)
    for layer, counts in enumerate(written["layers"]):
        recorded = sum(len(s.prefill[layer]) + len(s.decode[layer]) for s in sequences.values()) * top_k
        assert recorded == counts["cpu_expert_tokens"]

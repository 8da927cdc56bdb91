"""`stats_path`: written by the process that owns the layers, agreeing with the work done."""

import json

from .engines import close_llm, make_llm


def test_stats_file_at_fraction_zero(tiny_mixtral, tmp_path):
    from vllm import SamplingParams

    stats_path = tmp_path / "stats.json"
    llm = make_llm(tiny_mixtral, enforce_eager=True, load_format="daop",
                   model_loader_extra_config={"resident_fraction": 0, "stats_path": str(stats_path)})
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

"""`load_format="daop"` generates the same greedy tokens as stock vLLM on Mixtral: compiled, with
re-allocation, and stock engines after it (eager, per family: test_matches_stock)."""

import pytest

from .engines import close_llm, greedy_ids, make_llm, run_counted, running_llm, runs_at_fractions


def check_counters(report: dict, fraction: float) -> None:
    device = [layer["device_expert_tokens"] for layer in report["layers"]]
    cpu = [layer["cpu_expert_tokens"] for layer in report["layers"]]
    totals = [d + c for d, c in zip(device, cpu)]
    assert totals[0] > 0 and len(set(totals)) == 1, f"every layer sees the same expert-token work: {totals}"
    assert (report["totals"]["device_expert_tokens"], report["totals"]["cpu_expert_tokens"]) == (sum(device), sum(cpu))
    resident = [len(layer["resident"]) for layer in report["layers"]]
    num_experts = report["budget"]["total_experts"] // len(resident)
    if fraction == 0:
        assert sum(device) == 0 and resident == [0] * len(resident)
    elif fraction == 1:
        assert sum(cpu) == 0 and resident == [num_experts] * len(resident)
    else:
        assert sum(device) > 0 and sum(cpu) > 0
        assert sum(resident) == int(fraction * len(resident) * num_experts)


def test_compiled_matches_stock(tiny_mixtral, stock_ids):
    """One compiled engine (compiling costs most of a minute on CPU), started at 0.25 through the
    option, then re-placed: the DAOP op is opaque to the compiled graph, so placement can change.
    Its warm-up runs vLLM's profile run, outside engine steps: no CPU expert work there."""
    with running_llm(tiny_mixtral, enforce_eager=False, load_format="daop",
                     model_loader_extra_config={"resident_fraction": 0.25}) as llm:
        started = llm.collective_rpc("daop_report")[0]
        # the warm-up's profile run (max_num_batched_tokens rows) ran no CPU experts and counted nothing
        assert started["cpu_jobs"] == 0 and started["totals"]["cpu_expert_tokens"] == 0, started["totals"]
        for fraction, ids, report in runs_at_fractions(llm, [0.25, 1, 0.5, 0]):
            assert ids == stock_ids, f"compiled, fraction {fraction}"
            check_counters(report, fraction)


@pytest.mark.parametrize("realloc", ["paper", "auto"])
def test_realloc_keeps_exact_outputs_and_drops_request_state(tiny_mixtral, stock_ids, realloc):
    """Re-allocation under continuous batching (the paper's rule after each prompt; `auto` on
    the demand of the requests in flight): experts move, greedy outputs stay the stock ones,
    and finished requests leave no state behind."""
    with running_llm(tiny_mixtral, enforce_eager=True, load_format="daop",
                     model_loader_extra_config={"resident_fraction": 0.25, "realloc": realloc}) as llm:
        ids, report = run_counted(llm)
        assert ids == stock_ids
        totals = report["totals"]
        assert totals["swaps"] > 0 and totals["swap_bytes"] == 0, "on CPU a swap only flips the slot table"
        assert [len(layer["resident"]) for layer in report["layers"]] == [2, 2, 2, 2], "quotas unchanged"
        prompt_rows = totals["prefill_device_expert_tokens"] + totals["prefill_cpu_expert_tokens"]
        decode_rows = totals["decode_device_expert_tokens"] + totals["decode_cpu_expert_tokens"]
        assert prompt_rows > 0 and decode_rows > 0
        assert prompt_rows + decode_rows == totals["device_expert_tokens"] + totals["cpu_expert_tokens"]
        # vLLM tells the worker about finished requests at its next step: after one more
        # request, only that one may still be tracked.
        greedy_ids(llm)
        llm.generate(["one more"], use_tqdm=False)
        assert llm.collective_rpc("daop_report")[0]["requests_tracked"] <= 1


def test_stock_engine_still_works_after_daop(tiny_mixtral, stock_ids):
    """The MoE replacement is scoped to the daop loader: a later stock LLM in the same process
    builds vLLM's own MoE layers again."""
    daop = make_llm(tiny_mixtral, enforce_eager=True, load_format="daop",
                    model_loader_extra_config={"resident_experts": 3})
    close_llm(daop)
    with running_llm(tiny_mixtral, enforce_eager=True) as llm:
        assert not llm.apply_model(lambda model: hasattr(model, "daop_engine"))[0]
        assert greedy_ids(llm) == stock_ids


@pytest.mark.slow
def test_a_thousand_requests_with_aborts_leave_no_state(tiny_mixtral):
    """1,000 requests through the engine's own step loop, one aborted every other step while in
    flight (some mid-prefill, some mid-decode): afterwards no per-request DAOP state is left."""
    from vllm import SamplingParams

    llm = make_llm(tiny_mixtral, enforce_eager=True, load_format="daop",
                   model_loader_extra_config={"resident_fraction": 0.25})
    engine = llm.llm_engine
    try:
        finished, aborted, in_flight, next_id, steps = set(), set(), set(), 0, 0
        while next_id < 1000 or engine.has_unfinished_requests():
            while next_id < 1000 and len(in_flight) < 16:
                params = SamplingParams(temperature=0.0, max_tokens=1 + next_id % 7, ignore_eos=True)
                engine.add_request(str(next_id), f"request {next_id} " + "word " * (next_id % 11), params)
                in_flight.add(str(next_id))
                next_id += 1
            for output in engine.step():
                if output.finished:
                    finished.add(output.request_id)
                    in_flight.discard(output.request_id)
            steps += 1
            if steps % 2 == 0 and in_flight:
                victim = max(in_flight, key=int)  # the newest: often still in its prompt
                engine.abort_request([victim])
                aborted.add(victim)
                in_flight.discard(victim)
        assert len(finished) + len(aborted) == 1000 and len(aborted) >= 150
        assert llm.collective_rpc("daop_report")[0]["requests_tracked"] <= 16
        llm.generate(["one more"], use_tqdm=False)  # the worker hears of the last ones at this step
        assert llm.collective_rpc("daop_report")[0]["requests_tracked"] <= 1
    finally:
        close_llm(llm)

"""The trace-driven simulator: its cost model by hand, its synthetic predictor, and the paper's
ordering of policies on the Mixtral trace."""

from pathlib import Path

import pytest

from daop_vllm.core.hardware import FORMAT_READ_SHARE, HARDWARE_PRESETS, Hardware
from daop_vllm.offline.model_shapes import MoEShape
from daop_vllm.offline.simulator import POLICIES, Simulator, simulate
from daop_vllm.offline.traces import TraceSequence, read_traces

from ..shared_traces import trace_path

SHAPE = MoEShape("toy", num_layers=2, num_experts=4, top_k=1, hidden_size=1024, intermediate_size=2048)
HW = Hardware("toy", pcie_gbps=10.0, device_gbps=1000.0, cpu_gbps=50.0, device_tflops=100.0, cpu_tflops=1.0)


def toy_sequence(decode_experts: list[int], tokens: int) -> TraceSequence:
    decode = [[[e]] * tokens for e in decode_experts]
    return TraceSequence("toy", 2, 4, 1, True, [[] for _ in decode_experts], decode)


def test_static_decode_time_is_attention_plus_the_cpu_expert_per_layer():
    sim = Simulator(POLICIES["static"], SHAPE, HW, [[0], [0]])
    result = sim.run([toy_sequence([1, 2], tokens=5)])  # both layers miss: one CPU expert each
    expert_bytes = 3 * 1024 * 2048 * 2
    attention = 2.5 * 1024**2 * 2 / 1000e9
    cpu_expert = expert_bytes / (50e9 * POLICIES["static"].cpu_efficiency)
    per_token = 2 * (attention + cpu_expert) + attention  # + the final norm / lm_head stand-in
    assert result["tokens_per_s"] == pytest.approx(1 / per_token)
    assert result["decode_hit_rate"] == 0 and result["cpu_expert_tokens_per_token"] == 2


@pytest.mark.parametrize("fmt, bytes_per_weight", [("int8", 1.0), ("int4", 0.515625)])
def test_expert_format_sets_the_bytes_every_read_and_copy_moves(fmt, bytes_per_weight):
    read_share = FORMAT_READ_SHARE[fmt]  # the executor's measured read rate on the format, over bf16's
    assert 0.5 < read_share < 1.5
    expert_bytes = 3 * 1024 * 2048 * bytes_per_weight
    static = Simulator(POLICIES["static"], SHAPE, HW, [[0], [0]], expert_format=fmt)
    result = static.run([toy_sequence([1, 2], tokens=5)])
    attention = 2.5 * 1024**2 * 2 / 1000e9
    cpu_expert = expert_bytes / (50e9 * POLICIES["static"].cpu_efficiency * read_share)
    assert result["tokens_per_s"] == pytest.approx(1 / (2 * (attention + cpu_expert) + attention))
    ondemand = Simulator(POLICIES["ondemand"], SHAPE, HW, [[0], [0]], expert_format=fmt)
    assert ondemand.run([toy_sequence([1, 2], tokens=4)])["pcie_bytes_per_token"] == pytest.approx(2 * expert_bytes)


def test_device_expert_format_sets_what_the_device_reads_and_copies_move_and_the_host_format_what_the_cpu_reads():
    bf16_bytes, int8_bytes = 3 * 1024 * 2048 * 2, 3 * 1024 * 2048
    static = Simulator(POLICIES["static"], SHAPE, HW, [[0], [0]], device_expert_format="int8")
    attention = 2.5 * 1024**2 * 2 / 1000e9
    cpu_expert = bf16_bytes / (50e9 * POLICIES["static"].cpu_efficiency)  # the host's bf16 experts
    assert static.run([toy_sequence([1, 2], tokens=5)])["tokens_per_s"] == pytest.approx(
        1 / (2 * (attention + cpu_expert) + attention))
    ondemand = Simulator(POLICIES["ondemand"], SHAPE, HW, [[0], [0]], device_expert_format="int8")
    result = ondemand.run([toy_sequence([1, 2], tokens=4)])
    assert result["pcie_bytes_per_token"] == pytest.approx(2 * int8_bytes)
    gpu = Simulator(POLICIES["gpu"], SHAPE, HW, [[0], [0]], device_expert_format="int8")
    assert 1 / result["tokens_per_s"] - 1 / gpu.run([toy_sequence([1, 2], tokens=4)])["tokens_per_s"] == \
        pytest.approx(2 * int8_bytes / 10e9)


def test_gpu_and_ondemand_costs():
    gpu = Simulator(POLICIES["gpu"], SHAPE, HW, [[0], [0]]).run([toy_sequence([1, 2], tokens=4)])
    ondemand = Simulator(POLICIES["ondemand"], SHAPE, HW, [[0], [0]]).run([toy_sequence([1, 2], tokens=4)])
    expert_bytes = 3 * 1024 * 2048 * 2
    assert gpu["decode_hit_rate"] == 1 and gpu["pcie_bytes_per_token"] == 0
    assert ondemand["pcie_bytes_per_token"] == 2 * expert_bytes  # a copy per layer per token
    copy = expert_bytes / 10e9
    assert 1 / ondemand["tokens_per_s"] - 1 / gpu["tokens_per_s"] == pytest.approx(2 * copy)


def test_shared_experts_cost_device_time_in_every_layer_whatever_the_placement():
    from dataclasses import replace

    shared = replace(SHAPE, shared_intermediate_size=4096)
    shared_read = 3 * 1024 * 4096 * 2 / 1000e9  # memory-bound at one token
    for policy in ("gpu", "static"):
        plain = Simulator(POLICIES[policy], SHAPE, HW, [[0], [0]]).run([toy_sequence([1, 2], tokens=4)])
        with_shared = Simulator(POLICIES[policy], shared, HW, [[0], [0]]).run([toy_sequence([1, 2], tokens=4)])
        assert 1 / with_shared["tokens_per_s"] - 1 / plain["tokens_per_s"] == pytest.approx(2 * shared_read)
        assert with_shared["decode_hit_rate"] == plain["decode_hit_rate"], "shared experts are not routed"


def test_lru_keeps_what_it_copied():
    lru = Simulator(POLICIES["lru"], SHAPE, HW, [[0], [0]]).run([toy_sequence([1, 2], tokens=10)])
    assert lru["pcie_bytes_per_token"] == pytest.approx(2 * 3 * 1024 * 2048 * 2 / 10)  # first token only
    assert lru["decode_hit_rate"] == pytest.approx(0.9)


@pytest.mark.parametrize("accuracy", [0.5, 0.9])
def test_the_synthetic_predictor_is_right_as_often_as_asked(accuracy):
    seqs = list(read_traces(trace_path("deepseek-v2-lite-puffin.dev.jsonl.gz")))[:12]
    from daop_vllm.offline.model_shapes import model_shape

    result = simulate(seqs, ["auto-daop"], model_shape("deepseek-v2-lite"), HARDWARE_PRESETS["a6000"], 0.25,
                      calibrate_on=0.25, split=0.5, prediction_accuracy=accuracy, first_predicted_layer=1)
    assert result["policies"]["auto-daop"]["prediction_accuracy"] == pytest.approx(accuracy, abs=0.02)


@pytest.mark.parametrize("policy", ["auto-verified", "auto-daop"])
def test_the_staleness_gate_keeps_the_share_asked_and_its_rejected_rows_cost_cpu_time(policy):
    from dataclasses import replace

    no_realloc = replace(POLICIES[policy], realloc="off")  # the misses stay misses
    seq = toy_sequence([1, 2], tokens=400)
    runs = {kept: Simulator(no_realloc, SHAPE, HW, [[0], [0]], prediction_accuracy=1.0, first_predicted_layer=1,
                            precomputed_kept=kept).run([seq]) for kept in (1.0, 0.5, 0.0)}
    # layer 1's CPU expert of every token is pre-computed; layer 0 is never predicted
    assert runs[1.0]["precomputed_share"] == pytest.approx(0.5)
    assert runs[0.5]["precomputed_share"] == pytest.approx(0.25, abs=0.03)
    assert runs[0.0]["precomputed_share"] == 0
    # a turned-away row's pre-computation ran all the same, and its expert runs again
    assert runs[0.0]["tokens_per_s"] < runs[0.5]["tokens_per_s"] < runs[1.0]["tokens_per_s"]
    assert all(r["cpu_expert_tokens_per_token"] == 2 for r in runs.values())


def prompt_sequence(expert: int, tokens: int, decode_experts: list[list[int]] | None = None) -> TraceSequence:
    """A prompt of `tokens` rows all routed to `expert` in both layers; decode rows as given."""
    decode = decode_experts or [[], []]
    return TraceSequence("prompt", 2, 4, 1, True, [[[expert]] * tokens] * 2, [[[e] for e in d] for d in decode])


def test_a_long_prompt_streams_its_host_expert_where_the_cpu_is_slower():
    from dataclasses import replace

    expert_bytes, flops = 3 * 1024 * 2048 * 2, 6 * 1024 * 2048
    cpu = max(expert_bytes / (50e9 * 0.92), 1000 * flops / 1e12)  # 12.6 ms: compute-bound
    streamed = expert_bytes / 10e9 + max(expert_bytes / 1000e9, 1000 * flops / 100e12)  # copy 1.26 ms, then run
    runs = {}
    for name in ("auto-exact", "auto-exact+stream", "stream-all"):
        sim = Simulator(replace(POLICIES[name], realloc="off"), SHAPE, HW, [[0], [0]])
        runs[name] = sim.run([prompt_sequence(1, 1000)])
        fixed = sim._layer_fixed_s(1000)
    lm_head = sim._attention_s()  # the first token's
    assert runs["auto-exact"]["mean_prefill_s"] == pytest.approx(2 * (fixed + cpu) + lm_head)
    for name in ("auto-exact+stream", "stream-all"):
        assert runs[name]["mean_prefill_s"] == pytest.approx(2 * (fixed + streamed) + lm_head)
        assert runs[name]["prefill_streamed_experts"] == 2 and runs[name]["decode_streamed_experts"] == 0
    assert runs["auto-exact"]["prefill_streamed_experts"] == 0
    assert runs["auto-exact"]["prefill_tokens_per_s"] == pytest.approx(1000 / runs["auto-exact"]["mean_prefill_s"])


def test_decode_streams_the_misses_that_end_the_layer_sooner_and_the_cpu_takes_the_rest():
    from dataclasses import replace

    fast_pcie = Hardware("toy", pcie_gbps=100.0, device_gbps=1000.0, cpu_gbps=50.0, device_tflops=100.0, cpu_tflops=1.0)
    seq_rows = [[1, 2, 3] * 4] * 2  # three rows per step in flight, each on another host expert
    seqs = [TraceSequence(f"s{i}", 2, 4, 1, True, [[], []], [[[rows[j]] for j in range(i, 12, 3)] for rows in seq_rows])
            for i in range(3)]
    runs = {name: Simulator(replace(POLICIES[name], realloc="off"), SHAPE, fast_pcie, [[0], [0]], batch=3).run(seqs)
            for name in ("auto-exact", "auto-exact+stream", "stream-all")}
    # CPU 0.27 ms an expert, a copy 0.13: two of the three streamed, one on the CPU, per layer and step
    assert runs["auto-exact+stream"]["decode_streamed_experts"] == 2 * 2 * 4
    assert runs["auto-exact+stream"]["cpu_expert_tokens_per_token"] == pytest.approx(2 / 3)
    assert runs["stream-all"]["decode_streamed_experts"] == 3 * 2 * 4
    assert runs["stream-all"]["cpu_expert_tokens_per_token"] == 0
    assert runs["auto-exact"]["cpu_expert_tokens_per_token"] == 2
    speed = {name: r["tokens_per_s"] for name, r in runs.items()}
    assert speed["auto-exact+stream"] > max(speed["auto-exact"], speed["stream-all"]), speed


def test_paper_ordering_on_the_mixtral_trace():
    """The paper's machine and model at its full-memory point (46.9% resident): everything
    resident beats DAOP, which beats Fiddler's static placement, which beats copying misses."""
    from daop_vllm.offline.model_shapes import model_shape

    seqs = list(read_traces(trace_path("mixtral-8x7b-vllm.jsonl.gz")))
    result = simulate(seqs, ["gpu", "daop", "static", "ondemand"], model_shape("mixtral-8x7b"),
                      HARDWARE_PRESETS["a6000"], 0.469, calibrate_on=0.34, split=0.3)
    speed = {name: r["tokens_per_s"] for name, r in result["policies"].items()}
    assert speed["gpu"] > speed["daop"] > speed["static"] > speed["ondemand"], speed
    assert result["settings"]["scored_sequences"] == 2


def test_simulate_command_prints_json_and_refuses_bad_input():
    import json
    import subprocess
    import sys

    trace = str(Path(__file__).resolve().parents[1] / "data" / "tiny-mixtral.jsonl.gz")  # our own trace_path's
    command = [sys.executable, "-m", "daop_vllm.cli", "simulate", "--trace", trace, "--calibrate-on", "0.34",
               "--resident-fraction", "0.25"]
    ok = subprocess.run([*command, "--policies", "static", "gpu", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    result = json.loads(ok.stdout)
    assert set(result["policies"]) == {"static", "gpu"} and result["settings"]["hardware"]["name"] == "a6000"
    assert set(result["policies"]["static"]) >= {"decode_hit_rate", "prefill_hit_rate", "tokens_per_s",
                                                  "cpu_expert_tokens_per_token", "pcie_bytes_per_token"}
    bad = subprocess.run([*command, "--policies", "fiddler"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "unknown policy 'fiddler'" in bad.stderr and "static" in bad.stderr
    shape = subprocess.run([*command, "--model-shape", "deepseek-v2-lite"], capture_output=True, text=True)
    assert shape.returncode == 2 and "model shape deepseek-v2-lite has 26" in shape.stderr


def test_long_prompts_repeat_the_trace_rows_of_every_sequence():
    from daop_vllm.bench.simulation import long_prompt

    trace = Path(__file__).resolve().parents[1] / "data" / "tiny-mixtral.jsonl.gz"
    seqs = list(read_traces(trace))
    prompt = long_prompt(seqs, 1000)
    rows = [row for seq in seqs for phase in (seq.prefill, seq.decode) for row in phase[0]]
    assert len(rows) < 1000, "the check needs a prompt longer than the trace"
    assert all(len(layer) == 1000 for layer in prompt.prefill) and not any(prompt.decode)
    assert prompt.prefill[0][:len(rows)] == rows and prompt.prefill[0][len(rows)] == rows[0]


def test_decode_stages_the_predicted_next_layers_expert_a_layer_early():
    from dataclasses import replace

    pcie = Hardware("toy", pcie_gbps=31.5, device_gbps=1000.0, cpu_gbps=50.0, device_tflops=100.0, cpu_tflops=1.0)
    expert_bytes = 3 * 1024 * 2048 * 2
    copy, cpu, device = expert_bytes / 31.5e9, expert_bytes / (50e9 * 0.92), expert_bytes / 1000e9
    attention = 2.5 * 1024**2 * 2 / 1000e9
    assert copy + device > cpu > copy + device - cpu, "a copy loses to the CPU, unless it starts a layer early"
    policy = replace(POLICIES["auto-exact+stream"], realloc="off")
    runs = {first: Simulator(policy, SHAPE, pcie, [[0], [0]], prediction_accuracy=1.0, first_predicted_layer=first)
            .run([toy_sequence([1, 2], tokens=5)]) for first in (1, 2)}  # layer 2: nothing predicted
    # not predicted: the CPU takes both layers' experts
    assert runs[2]["tokens_per_s"] == pytest.approx(1 / (2 * (attention + cpu) + attention))
    assert runs[2]["decode_staged_early"] == runs[2]["decode_streamed_experts"] == 0
    # layer 1's expert, predicted at layer 0, is copied while the CPU runs layer 0's: the copy lands
    # `copy` after layer 0's experts started, and layer 1's expert runs then
    assert runs[1]["tokens_per_s"] == pytest.approx(1 / (attention + copy + device + attention))
    assert runs[1]["decode_staged_early"] == runs[1]["decode_staged_early_used"] == 5
    assert runs[1]["cpu_expert_tokens_per_token"] == 1
    # a prediction that is always wrong stages the wrong expert: its layer then runs as unpredicted
    wrong = Simulator(policy, SHAPE, pcie, [[0], [0]], prediction_accuracy=0.0, first_predicted_layer=1)
    result = wrong.run([toy_sequence([1, 2], tokens=5)])
    assert result["decode_staged_early"] >= 1 and result["decode_staged_early_used"] == 0  # (wrong host experts)
    assert result["cpu_expert_tokens_per_token"] == 2
    assert result["tokens_per_s"] == pytest.approx(runs[2]["tokens_per_s"])


@pytest.mark.parametrize("cpu_gbps", [300.0, 390.0, 450.0])
def test_a_faster_link_never_slows_staging_early_nor_below_pre_computing(cpu_gbps):
    """Layer 0's expert is resident, layer 1's is on the host and predicted at layer 0: copied a
    layer early, or pre-computed by the CPU while layer 0 runs. Both start before layer 1 does;
    the plan weighs both head starts and the device work layer 1 is predicted to have."""
    from dataclasses import replace

    def tokens_per_s(policy: str, pcie_gbps: float) -> float:
        hw = Hardware("toy", pcie_gbps=pcie_gbps, device_gbps=1000.0, cpu_gbps=cpu_gbps, device_tflops=100.0,
                      cpu_tflops=100.0)
        sim = Simulator(replace(POLICIES[policy], realloc="off"), SHAPE, hw, [[0], [0]], prediction_accuracy=1.0,
                        first_predicted_layer=1)
        return sim.run([toy_sequence([0, 1], tokens=5)])["tokens_per_s"]

    pre_computing = tokens_per_s("auto-daop", 200.0)
    streaming = [tokens_per_s("auto-daop+stream", pcie) for pcie in (200.0, 400.0, 600.0, 800.0, 1000.0, 3000.0)]
    assert streaming == sorted(streaming), streaming
    assert min(streaming) >= pre_computing, (streaming, pre_computing)


def test_stream_all_and_exact_policies_without_streaming_predict_nothing():
    for name in ("stream-all", "auto-exact"):
        result = Simulator(POLICIES[name], SHAPE, HW, [[0], [0]], first_predicted_layer=1).run(
            [toy_sequence([1, 2], tokens=3)])
        assert result["prediction_accuracy"] is None and result["decode_staged_early"] == 0


def test_a_token_budget_chunks_a_lone_prompt_at_no_cost_where_it_is_compute_bound():
    from dataclasses import replace

    policy = replace(POLICIES["auto-exact"], realloc="off")
    whole = Simulator(policy, SHAPE, HW, [[0], [0]]).run([prompt_sequence(1, 1000)])
    chunked = Simulator(policy, SHAPE, HW, [[0], [0]], max_batched_tokens=256).run([prompt_sequence(1, 1000)])
    # four steps of 256, 256, 256 and 232 tokens, each compute-bound on both sides; one first token
    assert chunked["mean_prefill_s"] == pytest.approx(whole["mean_prefill_s"])
    assert chunked["prefill_tokens_per_s"] == pytest.approx(whole["prefill_tokens_per_s"])
    with pytest.raises(ValueError, match="max_batched_tokens 2 is below the batch"):
        Simulator(policy, SHAPE, HW, [[0], [0]], batch=4, max_batched_tokens=2)


def test_a_token_budget_mixes_prompt_pieces_into_the_decode_steps():
    from dataclasses import replace

    policy = replace(POLICIES["static"], realloc="off")
    short = prompt_sequence(2, 1, [[3] * 8, [3] * 8])  # a one-token prompt, then 8 tokens to generate
    long = prompt_sequence(1, 1024)
    runs = {budget: Simulator(policy, SHAPE, HW, [[0], [0]], batch=2, max_batched_tokens=budget).run([short, long])
            for budget in (None, 257)}
    # unmixed: the two prompts in steps of their own, then 8 decode steps; mixed (257 tokens a
    # step): the short prompt and 256 of the long one, then 3 steps of a decode token and 256
    # prompt tokens, then the last 5 decode steps alone - the decode rows' weights read once with
    # the prompt's, so the whole run is shorter and the long prompt's first token later
    for result in runs.values():
        assert result["tokens_per_s"] is not None and result["decode_hit_rate"] == 0
    seconds = {b: 8 / r["tokens_per_s"] for b, r in runs.items()}
    assert seconds[257] < seconds[None]
    assert runs[257]["mean_prefill_s"] > runs[None]["mean_prefill_s"]
    assert runs[257]["prefill_hit_rate"] == runs[None]["prefill_hit_rate"] == 0

"""Prediction, pre-computation and degradation (modes verified and daop) against a plain
per-row reference, in batches that mix prefill, decode and padding rows."""

import pytest
import torch
import torch.nn.functional as F

from daop_vllm.core.batch import StepBatch
from daop_vllm.core.engine import DaopEngine
from daop_vllm.core.prediction import Fidelity, degrade
from daop_vllm.core.routing import SoftmaxTopK

E, K, H, I, L = 8, 2, 32, 24, 4


def test_degrade_keeps_one_host_expert_and_renormalises():
    is_resident = torch.tensor([False, False, True, True, False, True, False, False])
    ids = torch.tensor([[0, 1], [0, 2], [4, 6]])  # all host / one on device / all host
    scores = torch.tensor([
        [0.40, 0.30, 0.05, 0.10, 0.05, 0.02, 0.04, 0.04],
        [0.50, 0.05, 0.30, 0.05, 0.05, 0.02, 0.02, 0.01],
        [0.05, 0.05, 0.04, 0.03, 0.40, 0.13, 0.30, 0.00],
    ])
    weights = torch.gather(scores, 1, ids)
    weights = weights / weights.sum(1, keepdim=True)
    new_ids, new_weights, degraded = degrade(ids, weights, scores, is_resident)
    assert degraded.tolist() == [True, False, True]
    # the top-ranked host expert stays; the other is the best device-resident one
    assert new_ids.tolist() == [[0, 3], [0, 2], [4, 5]]
    torch.testing.assert_close(new_weights[0], torch.tensor([0.40, 0.10]) / 0.50)
    torch.testing.assert_close(new_weights[2], torch.tensor([0.40, 0.13]) / 0.53)
    torch.testing.assert_close(new_weights[1], weights[1])
    assert (~is_resident[new_ids]).sum(1).max() == 1  # at most one CPU expert per row


def test_degrade_without_device_experts_changes_nothing():
    ids, weights = torch.tensor([[0, 1]]), torch.tensor([[0.6, 0.4]])
    new_ids, _, degraded = degrade(ids, weights, torch.rand(1, E), torch.zeros(E, dtype=torch.bool))
    assert new_ids.tolist() == [[0, 1]] and not degraded.any()


def make_engine(fidelity: Fidelity, resident: list[int], renormalize: bool = True) -> tuple[DaopEngine, list[torch.Tensor]]:
    engine = DaopEngine(torch.device("cpu"), cpu_threads=2, fidelity=fidelity)
    gen = torch.Generator().manual_seed(1)
    gates = []
    for index in range(L):
        layer = engine.add_layer(E, H, I, torch.float32, SoftmaxTopK(K, renormalize))
        layer.store.w13.copy_(torch.randn(layer.store.w13.shape, generator=gen) * 0.3)
        layer.store.w2.copy_(torch.randn(layer.store.w2.shape, generator=gen) * 0.3)
        gate = torch.randn(E, H, generator=gen)
        gates.append(gate)
        engine.set_router(index, lambda x, gate=gate: x @ gate.t())
    engine.place([resident] * L)
    return engine, gates


def run_step(engine, xs, batch: StepBatch) -> list[torch.Tensor]:
    engine.begin_step(batch)
    outs = [layer.forward(x, layer.router_logits(x)) for layer, x in zip(engine.layers, xs)]
    engine.end_step()
    return outs


def expert(layer, e, x):
    gate, up = (x @ layer.store.w13[e].t()).chunk(2)
    return (F.silu(gate) * up) @ layer.store.w2[e].t()


def topk(logits):
    weights, ids = torch.softmax(logits, -1).topk(K)
    return ids.tolist(), (weights / weights.sum()).tolist()


def reference(engine, gates, xs, decode, resident, degrades, tolerance=None):
    """Row by row, layer by layer, as the modes are defined. Also returns the degraded rows and,
    per predicted layer, the pre-computed pairs of rows the staleness gate turned away and of
    those it let through."""
    mode, first = engine.mode, engine.first_predicted_layer
    outs, degraded, rejected, kept_pairs = [], 0, 0, 0
    for i, (layer, x) in enumerate(zip(engine.layers, xs)):
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            ids, weights = topk(x[t] @ gates[i].t())
            source = {e: x[t] for e in ids}
            if i >= first and decode[t]:
                probs = torch.softmax(xs[i - 1][t] @ gates[i].t(), -1)
                predicted, predicted_weights = topk(xs[i - 1][t] @ gates[i].t())
                row_degraded = False
                if mode == "daop" and degrades and not any(e in resident for e in predicted) and resident:
                    row_degraded = True
                    best = max(resident, key=lambda e: float(probs[e]))
                    predicted = [predicted[0], best]
                    kept = probs[predicted]
                    predicted_weights = (kept / kept.sum()).tolist()
                pairs = sum(e not in resident for e in predicted)
                stale = 1 - F.cosine_similarity(xs[i - 1][t], x[t], dim=0)
                if tolerance is not None and not stale < tolerance:
                    rejected += pairs
                    for e, w in zip(ids, weights):
                        out[t] += w * expert(layer, e, x[t])
                    continue
                kept_pairs += pairs
                if mode == "daop":
                    ids, weights = predicted, predicted_weights
                    degraded += row_degraded
                source = {e: xs[i - 1][t] if e not in resident and e in predicted else x[t] for e in ids}
            for e, w in zip(ids, weights):
                out[t] += w * expert(layer, e, source[e])
        outs.append(out)
    return outs, degraded, rejected, kept_pairs


# 2 prompt rows of request a, 1 decode row each of b and c, 1 decode row of d, 2 padding rows
BATCH = StepBatch(("a", "b", "c", "d"), (2, 1, 1, 1), (True, False, False, False), (True, False, False, False))
DECODE = [False, False, True, True, True, False, False]


@pytest.mark.parametrize("mode, degrades", [("verified", False), ("daop", True), ("daop", False)])
@pytest.mark.parametrize("resident", [[], [2, 5], [0, 3, 4, 6], list(range(E))], ids=["none", "two", "four", "all"])
def test_modes_match_the_per_row_reference(mode, degrades, resident):
    engine, gates = make_engine(Fidelity(mode, first_predicted_layer=1, degrade=degrades), resident)
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(len(DECODE), H, generator=gen)
    # consecutive layers' inputs are similar (a residual stream), so predictions are mostly right
    xs = [x0 + 0.3 * i * torch.randn(x0.shape, generator=gen) for i in range(L)]
    outs = run_step(engine, xs, BATCH)
    expected, degraded, _, _ = reference(engine, gates, xs, DECODE, resident, degrades)
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    totals = engine.stats.totals()
    assert totals["predictions"] == (L - 1) * sum(DECODE) * K
    assert 0 < totals["predictions_correct"] <= totals["predictions"]
    host_predicted = totals["precomputed_used"] + totals["precomputed_wasted"]
    if len(resident) == E:
        assert host_predicted == 0 and totals["cpu_expert_tokens"] == 0
    else:
        assert totals["precomputed_used"] > 0
    if mode == "daop":
        assert totals["precomputed_wasted"] == 0  # routing is the prediction: every pair is used
    assert totals["degraded"] == degraded
    if mode == "daop" and degrades and len(resident) == 2:
        assert degraded > 0
        for i in range(1, L):  # at most one CPU expert per decode row in predicted layers
            assert engine.stats.layer(i)["decode_cpu_expert_tokens"] <= sum(DECODE)
    engine.close()


@pytest.mark.parametrize("mode", ["verified", "daop"])
def test_a_failing_job_with_precomputed_pairs_is_recomputed(mode):
    """Device and host one memory: a layer's own job also computes the pairs predicted for it
    (on the layer before's input); when that job fails, the fallback gives the same output."""
    outputs = []
    for fail_every in (None, 1):
        engine, gates = make_engine(Fidelity(mode, first_predicted_layer=1, degrade=False), [2, 5])
        engine.executor.fail_every = fail_every
        gen = torch.Generator().manual_seed(7)
        x0 = torch.randn(len(DECODE), H, generator=gen)
        outputs.append(run_step(engine, [x0 + 0.3 * i * torch.randn(x0.shape, generator=gen) for i in range(L)],
                                BATCH))
        totals = engine.stats.totals()
        assert totals["precomputed_used"] > 0 and (totals["faults_recovered"] > 0) == (fail_every is not None)
        engine.close()
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["verified", "daop"])
def test_a_layers_experts_call_takes_the_precomputed_pairs_too(mode):
    """One memory with a faster call of the layer's experts (inside vLLM: its CPU fused-MoE op):
    the pairs predicted for a layer go into that call as extra rows, summed into theirs; the
    output is the executor's."""
    from daop_vllm.core.expert_math import routed_experts_forward, summed_into_rows

    outputs = []
    for with_call in (False, True):
        engine, gates = make_engine(Fidelity(mode, first_predicted_layer=1, degrade=False), [2, 5])
        calls = []
        if with_call:
            def make_call(store):
                def call(x, ids, weights, out_rows=None, like=None):
                    calls.append(x.shape[0])
                    return summed_into_rows(routed_experts_forward(x, ids, weights, store.w13, store.w2,
                                                                   torch.arange(E)), out_rows, like)
                return call
            engine.use_experts_call(make_call, "a test's call")
        gen = torch.Generator().manual_seed(7)
        x0 = torch.randn(len(DECODE), H, generator=gen)
        outputs.append(run_step(engine, [x0 + 0.3 * i * torch.randn(x0.shape, generator=gen) for i in range(L)],
                                BATCH))
        assert engine.stats.totals()["precomputed_used"] > 0
        engine.close()
    assert max(calls) > len(DECODE), "some call took pre-computed pairs as extra rows"
    for got, want in zip(*outputs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def stepped_inputs(seed: int = 7) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(DECODE), H, generator=gen)
    # rows drift by different amounts, so that a tolerance between their distances splits them
    drift = torch.linspace(0.1, 1.5, len(DECODE))[:, None]
    return [x0 + drift * i * torch.randn(x0.shape, generator=gen) for i in range(L)]


def staleness(xs: list[torch.Tensor]) -> torch.Tensor:
    """1 - cosine between consecutive layers' inputs of the decode rows, every predicted layer."""
    decode = torch.tensor(DECODE)
    return torch.cat([1 - F.cosine_similarity(a[decode], b[decode], dim=-1) for a, b in zip(xs, xs[1:])])


@pytest.mark.parametrize("mode, degrades", [("verified", False), ("daop", True), ("daop", False)])
@pytest.mark.parametrize("tolerance", ["zero", "median", "huge"])
def test_staleness_tolerance_gates_rows_as_the_reference_does(mode, degrades, tolerance):
    xs = stepped_inputs()
    distances = staleness(xs)
    value = {"zero": 0.0, "median": float(distances.median()), "huge": 10.0}[tolerance]
    resident = [2, 5]
    engine, gates = make_engine(Fidelity(mode, first_predicted_layer=1, degrade=degrades,
                                         staleness_tolerance=value), resident)
    outs = run_step(engine, xs, BATCH)
    expected, degraded, rejected, kept = reference(engine, gates, xs, DECODE, resident, degrades, value)
    for out, ref in zip(outs, expected):
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    totals = engine.stats.totals()
    # every pre-computed pair is used, rejected or wasted
    assert totals["precomputed_used"] + totals["precomputed_rejected"] + totals["precomputed_wasted"] == rejected + kept
    assert totals["precomputed_rejected"] == rejected and totals["degraded"] == degraded
    if tolerance == "zero":
        assert totals["precomputed_used"] == 0 and rejected > 0
    elif tolerance == "huge":
        assert rejected == 0 and totals["precomputed_used"] > 0
    else:
        assert 0 < rejected and 0 < totals["precomputed_used"]
    engine.close()


@pytest.mark.parametrize("mode", ["verified", "daop"])
def test_tolerance_zero_is_exact_and_none_is_no_gate(mode):
    xs = stepped_inputs(seed=5)
    exact, _ = make_engine(Fidelity("exact"), [2, 5])
    expected = run_step(exact, xs, BATCH)
    exact.close()
    gated, _ = make_engine(Fidelity(mode, first_predicted_layer=1, staleness_tolerance=0.0), [2, 5])
    for out, ref in zip(run_step(gated, xs, BATCH), expected):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    gated.close()
    ungated, _ = make_engine(Fidelity(mode, first_predicted_layer=1), [2, 5])
    huge, _ = make_engine(Fidelity(mode, first_predicted_layer=1, staleness_tolerance=3.0), [2, 5])
    for a, b in zip(run_step(ungated, xs, BATCH), run_step(huge, xs, BATCH)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert ungated.stats.totals() == huge.stats.totals()
    ungated.close()
    huge.close()


def test_rows_never_mix_a_batch_equals_its_rows_alone():
    engine, _ = make_engine(Fidelity("daop", first_predicted_layer=1), [1, 6])
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, H, generator=gen)
    xs = [x0 + 0.5 * torch.randn(x0.shape, generator=gen) for _ in range(L)]
    batch = StepBatch(("p", "q", "r"), (1, 1, 1), (False,) * 3, (False,) * 3)
    together = run_step(engine, xs, batch)
    for row in range(3):
        alone = run_step(engine, [x[row : row + 1] for x in xs], StepBatch(("p",), (1,), (False,), (False,)))
        for out, ref in zip(alone, together):
            torch.testing.assert_close(out[0], ref[row], rtol=1e-5, atol=1e-5)
    engine.close()


def test_a_prediction_never_reaches_another_step():
    engine, _ = make_engine(Fidelity("verified", first_predicted_layer=1), [])
    x = torch.randn(2, H)
    batch = StepBatch(("p",), (2,), (False,), (False,))
    engine.begin_step(batch)
    engine.layers[0].forward(x, engine.layers[0].router_logits(x))  # predicts layer 1 ...
    engine.end_step()
    engine.begin_step(batch)  # ... which runs only in the next step
    engine.layers[1].forward(x, engine.layers[1].router_logits(x))
    engine.end_step()
    totals = engine.stats.totals()
    assert totals["predictions"] == 0 and totals["precomputed_used"] == 0
    engine.close()


def test_exact_mode_predicts_nothing_and_a_missing_router_is_an_error():
    engine, _ = make_engine(Fidelity("exact"), [0])
    assert all(layer.next_layer is None for layer in engine.layers) and engine.first_predicted_layer is None
    engine.close()
    engine = DaopEngine(torch.device("cpu"), cpu_threads=1, fidelity=Fidelity("daop"))
    for _ in range(2):
        engine.add_layer(E, H, I, torch.float32, SoftmaxTopK(K))
    with pytest.raises(ValueError, match="set_router"):
        engine.place([[0], [0]])
    engine.close()


def test_prediction_uses_the_family_routing_function():
    """A family whose router does not renormalise (OLMoE): in daop mode a decode row is routed
    by the predicted experts with their plain softmax probabilities - predicting with Mixtral's
    renormalised weights instead would silently change every output."""
    engine, gates = make_engine(Fidelity("daop", first_predicted_layer=1, degrade=False), list(range(E)),
                                renormalize=False)
    gen = torch.Generator().manual_seed(11)
    x0, x1 = 0.1 * torch.randn(1, H, generator=gen), torch.randn(1, H, generator=gen)  # soft router: sum of top-k < 1
    batch = StepBatch(("p",), (1,), (False,), (False,))
    engine.begin_step(batch)
    engine.layers[0].forward(x0, engine.layers[0].router_logits(x0))
    out = engine.layers[1].forward(x1, engine.layers[1].router_logits(x1))
    engine.end_step()
    weights, ids = torch.softmax(x0[0] @ gates[1].t(), -1).topk(K)  # predicted from layer 0's input
    expected = sum(w * expert(engine.layers[1], int(e), x1[0]) for w, e in zip(weights, ids))
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-5)
    assert abs(float(weights.sum()) - 1) > 1e-3, "the check needs weights that renormalising would change"
    engine.close()

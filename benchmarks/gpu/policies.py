"""The engine's policies on real-size experts, with routing replayed from a real trace (torch and
Triton only: runs on the GPU test machine, which has no vLLM).

    cp ../shared/traces/mixtral-8x7b-vllm.jsonl.gz .gpu/          # here; .gpu/ is git-ignored
    PYTHONPATH=. python benchmarks/gpu/policies.py --trace .gpu/mixtral-8x7b-vllm.jsonl.gz \\
        --out $OUT/gpu_policies.json                              # there, with .gpu carried

A stack of Mixtral-shaped MoE layers (random bf16 weights; fewer than 32 layers, results scaled
to 32 as the output says), each layer's attention stood in by a matmul that reads the weights of
Mixtral's attention projections. Decode steps at batch 1 and 16, the rows' experts replayed from
the trace; with --prompt-tokens, also the time to first token of one prompt of each length alone
(the trace's rows back to back, as `bench simulate --streaming`). Policies as in `daop-vllm
simulate`, through the engine's own device cache, Triton kernel, CPU executor, predictor,
re-allocation and streaming (`+stream`, `stream-all`: the engine's `stream` option, staging rows
of DEFAULT_STAGING_SLOTS experts); `lru` and `ondemand` copy misses through the device cache. The
routing of every step is on the device before the timed steps. Prints tokens/s per policy and the
ratio to `static`, the measured PCIe and CPU rates, and what the simulator's preset predicts for
the same settings (both stage decode experts a layer early from the prediction in the streaming
policies); with --profile, each step split into host and device time per policy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import random
import statistics
import sys
import time
from collections import OrderedDict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from daop_vllm.bench.simulation import long_prompt  # noqa: E402
from daop_vllm.core.batch import StepBatch  # noqa: E402
from daop_vllm.core.cpu_executor import physical_core_count  # noqa: E402
from daop_vllm.core.device_cache import DeviceExpertCache  # noqa: E402
from daop_vllm.core.engine import DaopEngine  # noqa: E402
from daop_vllm.core.hardware import load_hardware, measure_hardware  # noqa: E402
from daop_vllm.core.placement import plan_residency, rank_pairs  # noqa: E402
from daop_vllm.core.prediction import Fidelity  # noqa: E402
from daop_vllm.core.routing import SoftmaxTopK  # noqa: E402
from daop_vllm.offline.model_shapes import MoEShape  # noqa: E402
from daop_vllm.offline.simulator import (  # noqa: E402
    BASE_POLICIES,
    DEFAULT_STAGING_SLOTS,
    PAPER_PREDICTION_ACCURACY,
    POLICIES,
    simulate,
    split_for_simulation,
)
from daop_vllm.offline.trace_analysis import calibrate_profile  # noqa: E402
from daop_vllm.offline.traces import read_traces  # noqa: E402

MIXTRAL_LAYERS = 32


def logits_choosing(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Router logits whose top-k are exactly ids [T, K], in that order."""
    ranks = torch.arange(ids.shape[1], dtype=torch.float32).expand(ids.shape)
    return torch.zeros(ids.shape[0], num_experts).scatter_(1, ids, 10.0 - ranks)


class Replay:
    """Rows in flight, each replaying one trace sequence from its own offset. Every step's routing
    (true and predicted, as router logits on the device) is made before the timed steps, so that
    the harness adds no host work or copy to them."""

    def __init__(self, seqs, batch: int, num_layers: int, num_experts: int, accuracy: float, steps: int,
                 device: torch.device) -> None:
        rows = [(r % len(seqs), (r // len(seqs)) * 7) for r in range(batch)]  # (sequence, start)
        self.true_ids = [[self._ids(seqs, rows, layer, step) for layer in range(num_layers)] for step in range(steps)]
        self.true_logits = [[logits_choosing(ids, num_experts).to(device) for ids in layers]
                            for layers in self.true_ids]
        self.predicted_logits = [
            [logits_choosing(self._predicted(self.true_ids[step][layer], layer, step, num_experts, accuracy),
                             num_experts).to(device) for layer in range(num_layers)]
            for step in range(steps)]
        self.step = 0

    @staticmethod
    def _ids(seqs, rows, layer: int, step: int) -> torch.Tensor:
        """[B, K] true experts of `layer` at `step` for the rows."""
        out = []
        for seq, start in rows:
            layer_rows = seqs[seq].decode[layer]
            out.append(layer_rows[(start + step) % len(layer_rows)])
        return torch.tensor(out, dtype=torch.int64)

    @staticmethod
    def _predicted(ids: torch.Tensor, layer: int, step: int, num_experts: int, accuracy: float) -> torch.Tensor:
        """What a predictor right `accuracy` of the time says (as in the simulator)."""
        rows = []
        for r, row in enumerate(ids.tolist()):
            rng = random.Random(hash((r, layer, step)))
            others = [e for e in range(num_experts) if e not in row]
            rng.shuffle(others)
            rows.append([e if rng.random() < accuracy else others.pop() for e in row])
        return torch.tensor(rows, dtype=torch.int64)


def build_engine(shape: MoEShape, device: torch.device, threads: int) -> DaopEngine:
    engine = DaopEngine(device, cpu_threads=threads, staging_slots=DEFAULT_STAGING_SLOTS)
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(shape.num_layers):
        layer = engine.add_layer(shape.num_experts, shape.hidden_size, shape.intermediate_size, torch.bfloat16,
                                 SoftmaxTopK(shape.top_k))
        for e in range(shape.num_experts):  # random weights made on the device: fast even at full size
            layer.store.w13[e].copy_(torch.randn(layer.store.w13.shape[1:], generator=gen, device=device,
                                                 dtype=torch.bfloat16) / shape.hidden_size ** 0.5)
            layer.store.w2[e].copy_(torch.randn(layer.store.w2.shape[1:], generator=gen, device=device,
                                                dtype=torch.bfloat16) / shape.intermediate_size ** 0.5)
    return engine


def configure(engine: DaopEngine, policy, placement, replay_box: list, first_predicted_layer: int) -> None:
    """Point the shared engine (its host stores are built once) at one policy."""
    engine.realloc = policy.realloc
    for index in range(len(engine.layers)):
        engine.set_router(index, lambda x, index=index: replay_box[0].predicted_logits[replay_box[0].step][index])
    if policy.misses == "cpu":
        engine.place(placement)
    else:  # lru / ondemand: every slot can hold a copied expert; the policy decides which stay
        for layer, experts in zip(engine.layers, placement):
            layer.cache = DeviceExpertCache(layer.store, engine.num_experts, engine.device)
            layer.cache.fill(experts)
    engine.set_fidelity(Fidelity(policy.mode, first_predicted_layer if policy.mode != "exact" else None))
    engine.set_stream(policy.stream)


def copy_misses(engine: DaopEngine, policy, layer: int, ids: torch.Tensor, static: list[int], lru: OrderedDict) -> None:
    """lru / ondemand: bring this step's missing experts onto the device before the layer runs."""
    cache = engine.layers[layer].cache
    needed = list(dict.fromkeys(ids.flatten().tolist()))
    if policy.misses == "copy":  # ondemand: copied for this step, dropped after it (drop_copies)
        cache.fill(list(dict.fromkeys(static + needed)))
        return
    for expert in needed:
        if expert in lru:
            lru.move_to_end(expert)
        elif lru:
            lru.popitem(last=False)
            lru[expert] = None
    cache.fill(list(lru))


def drop_copies(engine: DaopEngine, policy, layer: int, static: list[int]) -> None:
    if policy.misses == "copy":
        engine.layers[layer].cache.fill(static)


def device_busy_seconds(profiler) -> float:
    """Time the device spent in kernels and copies (their own time, summed) in a profile."""
    return sum(event.self_device_time_total for event in profiler.key_averages()) / 1e6


def run_policy(engine, policy, shape, seqs, placement, batch, steps, attention_w, first_predicted_layer, accuracy,
               profile_dir: Path | None = None, read_gbps: float | None = None):
    placement = policy.resident(placement, shape.num_experts)
    device = engine.device
    warmup = 2
    profiled = steps if profile_dir is not None else 0  # after the timed steps: the profiler slows what it sees
    total = warmup + steps + profiled
    replay_box = [Replay(seqs, batch, shape.num_layers, shape.num_experts, accuracy, total, device)]
    configure(engine, policy, placement, replay_box, first_predicted_layer)
    lru = [OrderedDict((e, None) for e in experts) for experts in placement]
    # the prompts: one prefill step of each sequence's prompt rows, so re-allocation has counts
    for index, seq in enumerate(seqs):
        tokens = min(len(rows) for rows in seq.prefill)  # a real trace's layers may hold a few rows less
        engine.begin_step(StepBatch((f"seq{index}",), (tokens,), (True,), (True,), (steps,)))
        for layer_index, layer in enumerate(engine.layers):
            ids = torch.tensor(seq.prefill[layer_index][:tokens], dtype=torch.int64)
            x = torch.randn(tokens, shape.hidden_size, device=device, dtype=torch.bfloat16)
            if policy.misses != "cpu":
                copy_misses(engine, policy, layer_index, ids, placement[layer_index], lru[layer_index])
            layer.forward(x, logits_choosing(ids, shape.num_experts).to(device))
            drop_copies(engine, policy, layer_index, placement[layer_index])
        engine.end_step()
    req_ids = tuple(f"row{r}" for r in range(batch))
    x0 = torch.randn(batch, shape.hidden_size, device=device, dtype=torch.bfloat16)
    replay = replay_box[0]
    elapsed = profiled_s = 0.0
    profiler = None
    for step in range(total):
        replay.step = step
        if step == warmup + steps and profiled:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities)
            profiler.__enter__()
        engine.begin_step(StepBatch(req_ids, (1,) * batch, (False,) * batch, (False,) * batch,
                                    (total - step,) * batch))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        x = x0
        for layer_index, layer in enumerate(engine.layers):
            x = (x @ attention_w)[:, : shape.hidden_size]  # the attention projections' weight reads
            if policy.misses != "cpu":  # lru / ondemand decide on the host which experts to copy
                copy_misses(engine, policy, layer_index, replay.true_ids[step][layer_index], placement[layer_index],
                            lru[layer_index])
            x = x0 + 0.0 * layer.forward(x, replay.true_logits[step][layer_index])
            drop_copies(engine, policy, layer_index, placement[layer_index])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if warmup <= step < warmup + steps:
            elapsed += time.perf_counter() - start
        elif step >= warmup + steps:
            profiled_s += time.perf_counter() - start
        engine.end_step()
    for name in [*req_ids, *(f"seq{i}" for i in range(len(seqs)))]:
        engine.drop_request(name)
    seconds_per_step = elapsed / steps * MIXTRAL_LAYERS / shape.num_layers  # scaled to 32 layers
    report = engine.report()["totals"]
    engine.stats.reset()
    result = {"tokens_per_s": batch / seconds_per_step, "decode_hit_rate": report["decode_hit_rate"],
              "swaps": report["swaps"], "precomputed_used": report["precomputed_used"]}
    if read_gbps:  # the bound of a step that only reads its weights once, at the device's read rate
        expert_bytes = engine.layers[0].store.expert_bytes
        step_bytes = statistics.mean(
            sum(len(set(ids.flatten().tolist())) * expert_bytes + attention_w.nbytes for ids in replay.true_ids[step])
            for step in range(warmup, warmup + steps))
        result["roofline_tokens_per_s"] = batch / (step_bytes / (read_gbps * 1e9) * MIXTRAL_LAYERS / shape.num_layers)
    if profiler is not None:
        profiler.__exit__(None, None, None)
        busy = device_busy_seconds(profiler) / profiled if device.type == "cuda" else None
        step_s = profiled_s / profiled
        result["profile"] = {"step_ms": 1000 * step_s, "device_busy_ms": None if busy is None else 1000 * busy,
                             "device_idle_share": None if busy is None else max(0.0, 1 - busy / step_s)}
        profile_dir.mkdir(parents=True, exist_ok=True)
        sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        (profile_dir / f"{policy.name}-batch{batch}.txt").write_text(
            profiler.key_averages().table(sort_by=sort_by, row_limit=25))
    return result


def time_prompt(engine, policy, shape, prompt, placement, attention_w, first_predicted_layer,
                repeats: int = 3) -> dict:
    """Seconds of one prompt's step alone (its time to first token), scaled to 32 layers: median
    of `repeats`, each from the policy's initial placement (re-allocation after a prefill moves it)."""
    placement = policy.resident(placement, shape.num_experts)
    device = engine.device
    tokens = len(prompt.prefill[0])
    logits = [logits_choosing(torch.tensor(rows, dtype=torch.int64), shape.num_experts).to(device)
              for rows in prompt.prefill]
    x0 = torch.randn(tokens, shape.hidden_size, device=device, dtype=torch.bfloat16)
    times = []
    for repeat in range(repeats + 1):  # the first warms up
        configure(engine, policy, placement, [None], first_predicted_layer)
        engine.begin_step(StepBatch(("prompt",), (tokens,), (True,), (True,), (1,)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        x = x0
        for layer, layer_logits in zip(engine.layers, logits):
            x = (x @ attention_w)[:, : shape.hidden_size]
            x = x0 + 0.0 * layer.forward(x, layer_logits)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if repeat:
            times.append(time.perf_counter() - start)
        engine.end_step()
        report = engine.report()["totals"]
        engine.drop_request("prompt")
        engine.stats.reset()
    return {"time_to_first_token_s": statistics.median(times) * MIXTRAL_LAYERS / shape.num_layers,
            "prefill_streamed_experts": report.get("prefill_streamed_experts", 0)}


def measure_rates(engine: DaopEngine) -> dict:
    """PCIe (pinned host -> device, one expert) and the CPU executor (one token, one expert)."""
    store = engine.layers[0].store
    rates = {}
    if engine.device.type == "cuda":
        slot = torch.empty_like(store.w13[0], device=engine.device)
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            slot.copy_(store.w13[0], non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rates["pcie_gbps"] = store.w13[0].nbytes / sorted(times)[2] / 1e9
        source = torch.empty(1 << 30, dtype=torch.uint8, device=engine.device)
        target = torch.empty_like(source)
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            start = time.perf_counter()
            target.copy_(source)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        rates["device_copy_read_gbps"] = source.nbytes / sorted(times)[2] / 1e9  # bytes read (as many written)
        del source, target
    x = torch.randn(1, store.w13.shape[2], dtype=store.w13.dtype)
    times = []
    for e in range(store.num_experts):
        table = torch.full((store.num_experts,), -1, dtype=torch.int64)
        table[e] = e
        start = time.perf_counter()
        engine.executor.submit(x, torch.tensor([[e]]), torch.ones(1, 1), store.w13, store.w2, table).result()
        times.append(time.perf_counter() - start)
    rates["cpu_executor_gbps"] = store.expert_bytes / sorted(times)[len(times) // 2] / 1e9
    return rates


def print_run(fraction: float, batch: int, measured: dict) -> None:
    print(f"fraction {fraction}, batch {batch}:")
    for name, r in measured.items():
        idle = r.get("profile", {}).get("device_idle_share")
        print(f"  {name:>18} {r['tokens_per_s']:8.2f} tok/s  x{r['over_static'] or 0:5.2f} static   "
              f"h200 preset {r['h200_preset_tokens_per_s']:8.2f}"
              + (f"   device idle {100 * idle:.0f}%" if idle is not None else "")
              + (f"   {r['tokens_per_s'] / r['roofline_tokens_per_s']:.0%} of the read roofline"
                 if name == "gpu" and "roofline_tokens_per_s" in r else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", type=Path, default=Path(".gpu/mixtral-8x7b-vllm.jsonl.gz"))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--steps", type=int, default=12, help="timed decode steps per policy and setting")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--policies", nargs="+", default=BASE_POLICIES, choices=list(POLICIES),
                        help="default: those without streaming")
    parser.add_argument("--prompt-tokens", type=int, nargs="*", default=[],
                        help="also time one prompt of each length alone, per policy and fraction (those whose "
                             "misses stay host experts: not lru, ondemand)")
    parser.add_argument("--first-predicted-layer", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="CPU executor threads (default: physical cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="torch.profiler over as many steps again, after the timed ones: per policy, step time, "
                             "device busy time and idle share in the JSON, the op table as DIR/POLICY-batchB.txt")
    args = parser.parse_args()

    device = torch.device(args.device)
    shape = MoEShape("bench", args.layers, 8, 2, args.hidden, args.intermediate)
    # the trace's first `layers` layers; decode-only sequences give their first 30% as the prompt
    seqs = [split_for_simulation(s, 0.3) for s in read_traces(args.trace)]
    trimmed = [dataclasses.replace(s, num_layers=shape.num_layers, prefill=s.prefill[: shape.num_layers],
                                   decode=s.decode[: shape.num_layers])
               for s in seqs if all(s.decode) and all(s.prefill)]
    threads = args.threads or physical_core_count()
    started = time.perf_counter()
    engine = build_engine(shape, device, threads)
    engine.hardware = measure_hardware(device)  # auto's cost model: this machine (a6000 stand-in on CPU)
    attention_w = torch.randn(args.hidden, int(2.5 * args.hidden), device=device, dtype=torch.bfloat16) * 0.01
    rates = measure_rates(engine)
    profile = calibrate_profile(trimmed)
    # Serve as vLLM's GPU worker does (set_torch_threads_for_runtime): torch on one thread in the
    # caller, whose CPU ops are small; with all cores, each of them woke torch's OpenMP team, which
    # then spun beside the executor's threads (a Mixtral expert call beside a 4-row gather: 16.2
    # instead of 12.1 ms on our 2-core machine). The executor's torch thread sets its own count.
    torch.set_num_threads(1)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "layers_run": shape.num_layers, "scaled_to_layers": MIXTRAL_LAYERS, "hidden": args.hidden,
              "intermediate": args.intermediate, "cpu_threads": threads, "caller_torch_threads": 1, "steps": args.steps,
              "prediction_accuracy": PAPER_PREDICTION_ACCURACY, "staging_slots": DEFAULT_STAGING_SLOTS,
              "measured": rates, "runs": [], "prompts": []}
    prompt_policies = [n for n in args.policies if POLICIES[n].misses == "cpu"]  # lru / ondemand copy per decode step
    for fraction in args.fractions:
        slots = math.floor(fraction * shape.num_layers * shape.num_experts)
        placement = plan_residency(slots, shape.num_layers, shape.num_experts,
                                   rank_pairs(shape.num_layers, shape.num_experts, profile))
        for batch in args.batches:
            profile_dir = args.profile / f"fraction{fraction}" if args.profile else None
            measured = {name: run_policy(engine, POLICIES[name], shape, trimmed, placement, batch, args.steps,
                                         attention_w, args.first_predicted_layer, PAPER_PREDICTION_ACCURACY,
                                         profile_dir, rates.get("device_copy_read_gbps"))
                        for name in args.policies}
            predicted = simulate(trimmed, args.policies, shape, load_hardware("h200"), fraction, calibrate_on=0,
                                 batch=batch, first_predicted_layer=args.first_predicted_layer,
                                 profile=profile)["policies"]
            static = measured.get("static", {}).get("tokens_per_s")
            for name, r in measured.items():
                r["over_static"] = r["tokens_per_s"] / static if static else None
                r["h200_preset_tokens_per_s"] = predicted[name]["tokens_per_s"] * shape.num_layers / MIXTRAL_LAYERS
            result["runs"].append({"resident_fraction": fraction, "batch": batch, "policies": measured})
            print_run(fraction, batch, measured)
        for tokens in args.prompt_tokens:
            prompt = long_prompt(trimmed, tokens)
            measured = {name: time_prompt(engine, POLICIES[name], shape, prompt, placement, attention_w,
                                          args.first_predicted_layer) for name in prompt_policies}
            predicted = simulate([prompt], prompt_policies, shape, load_hardware("h200"), fraction, calibrate_on=0,
                                 first_predicted_layer=args.first_predicted_layer, profile=profile)["policies"]
            for name, r in measured.items():
                r["h200_preset_time_to_first_token_s"] = predicted[name]["mean_prefill_s"] * MIXTRAL_LAYERS \
                    / shape.num_layers
            result["prompts"].append({"resident_fraction": fraction, "prompt_tokens": tokens, "policies": measured})
            print(f"fraction {fraction}, one {tokens}-token prompt:")
            for name, r in measured.items():
                print(f"  {name:>18} time to first token {r['time_to_first_token_s']:8.3f} s   h200 preset "
                      f"{r['h200_preset_time_to_first_token_s']:8.3f} s   streamed {r['prefill_streamed_experts']}")
    result["seconds"] = time.perf_counter() - started
    print(f"measured: {rates}; {result['seconds']:.0f} s")
    engine.close()
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""The engine through the construction sequence vLLM's `daop` loader uses, on a CUDA device with
Mixtral-size experts (torch and Triton only: the GPU machine has no vLLM).

    PYTHONPATH=. python benchmarks/gpu/engine_lifecycle.py --out $OUT/gpu_engine_lifecycle.json
    PYTHONPATH=. python benchmarks/gpu/engine_lifecycle.py --device cpu --hidden 256 --intermediate 512 \
        --out /tmp/lifecycle.json                                   # the script's own smoke run, here

1. create_model: under `with torch.device("cuda")`, the hardware is measured and the engine and
   its layers are built; every host tensor must still be on the host.
2. load_weights: the host stores are filled (pinned at their own size, not rounded up), then
   `place` fills half of each layer's slots.
3. vLLM's profile run (`dummy_run`, max_num_batched_tokens rows): no CPU expert job.
4. Engine steps: a prompt routed to host experts, decode steps; `auto` re-allocation swaps the
   prompt's experts in on the side stream while later steps run. Outputs are checked against
   the torch reference on the CPU at every step; the launcher is checked for host syncs.
5. `place` again with another slot count while swaps are in flight, then more steps.
Prints and writes what each stage did, and fails (exit status 1) on any wrong output.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from daop_vllm.core.batch import StepBatch  # noqa: E402
from daop_vllm.core.cpu_executor import default_cpu_threads  # noqa: E402
from daop_vllm.core.engine import DaopEngine  # noqa: E402
from daop_vllm.core.expert_math import routed_experts_forward  # noqa: E402
from daop_vllm.core.hardware import measure_hardware  # noqa: E402
from daop_vllm.core.routing import SoftmaxTopK  # noqa: E402

EXPERTS, TOP_K = 8, 2  # Mixtral-8x7B; --hidden 4096 --intermediate 14336 by default


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def logits_choosing(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Router logits whose top-k are exactly ids [T, K], in that order."""
    ranks = torch.arange(ids.shape[1], dtype=torch.float32).expand(ids.shape)
    return torch.zeros(ids.shape[0], num_experts).scatter_(1, ids, 10.0 - ranks)


def host_tensors_off_the_host(engine: DaopEngine) -> list[str]:
    device_side = {"w13", "w2", "slot_of_expert"}
    wrong = []
    owners = [("requests", engine.requests)]
    for layer in engine.layers:
        owners += [(f"layer{layer.layer}.store", layer.store), (f"layer{layer.layer}.cache", layer.cache)]
    for name, owner in owners:
        for attr, value in vars(owner).items():
            if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                if not (name.endswith(".cache") and attr in device_side):
                    wrong.append(f"{name}.{attr} on {value.device}")
    return wrong


def check_layer(layer, x: torch.Tensor, ids: torch.Tensor, failures: list[str], what: str) -> float:
    """One forward of `layer` against the torch reference on the CPU; returns milliseconds."""
    logits = logits_choosing(ids, EXPERTS).to(x.device)
    sync(x.device)
    start = time.perf_counter()
    out = layer.forward(x, logits)
    sync(x.device)
    ms = 1e3 * (time.perf_counter() - start)
    weights, topk = layer.route(logits.cpu())
    want = routed_experts_forward(x.cpu(), topk, weights, layer.store.w13, layer.store.w2, torch.arange(EXPERTS))
    error = (out.cpu().float() - want.float()).abs().max().item() / want.float().abs().max().item()
    if not error < 2e-2:
        failures.append(f"{what}: layer {layer.layer} relative error {error:.3g}")
    return ms


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    hidden, intermediate = args.hidden, args.intermediate
    failures: list[str] = []
    result: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "layers": args.layers,
                    "shape": {"experts": EXPERTS, "hidden": hidden, "intermediate": intermediate, "dtype": "bf16"}}

    # 1. create_model, as vLLM calls it
    start = time.perf_counter()
    with torch.device(device):
        hardware = measure_hardware(device)
        engine = DaopEngine(device, cpu_threads=default_cpu_threads(device.type), realloc="auto", hardware=hardware)
        for _ in range(args.layers):
            engine.add_layer(EXPERTS, hidden, intermediate, torch.bfloat16, SoftmaxTopK(TOP_K))
    result["create_model_s"] = round(time.perf_counter() - start, 2)
    result["hardware"] = hardware.to_dict()
    result["cpu_threads"] = engine.executor.num_threads
    wrong = host_tensors_off_the_host(engine)
    failures += [f"host tensor off the host: {w}" for w in wrong]

    # 2. load_weights: fill the stores, then place half
    start = time.perf_counter()
    for layer in engine.layers:
        layer.store.w13.normal_(0, 0.02)
        layer.store.w2.normal_(0, 0.02)
    stores = [layer.store for layer in engine.layers]
    expected_bytes = args.layers * EXPERTS * 3 * hidden * intermediate * 2
    result["host_expert_bytes"] = sum(s.host_bytes for s in stores)
    result["stores_pinned"] = all(s.w13.is_pinned() and s.w2.is_pinned() for s in stores) if device.type == "cuda" \
        else "n/a (no CUDA: host and device share memory)"
    if result["host_expert_bytes"] != expected_bytes or result["stores_pinned"] is False:
        failures.append(f"host stores: {result['host_expert_bytes']} bytes (want {expected_bytes}), "
                        f"pinned {result['stores_pinned']}")
    if device.type == "cuda" and hasattr(torch.cuda, "host_memory_stats"):
        result["caching_host_allocator_bytes"] = torch.cuda.host_memory_stats().get("allocated_bytes.current")
    engine.place([[0, 1, 2, 3]] * args.layers)
    result["load_and_place_s"] = round(time.perf_counter() - start, 2)

    # 3. the profile run
    rows = 8192
    x = torch.randn(rows, hidden, device=device, dtype=torch.bfloat16)
    with engine.dummy_run():
        for layer in engine.layers:
            layer.forward(x, logits_choosing(torch.randint(0, EXPERTS, (rows, TOP_K)), EXPERTS).to(device))
    sync(device)
    result["profile_run_cpu_jobs"] = engine.executor.jobs_submitted
    if engine.executor.jobs_submitted:
        failures.append(f"the profile run submitted {engine.executor.jobs_submitted} CPU jobs")

    # 4. a prompt routed to host experts 6 and 7, then decode steps; auto re-allocation swaps them in
    step_ms = []
    prompt = torch.tensor([[6, 7]] * 4)
    engine.begin_step(StepBatch(("seq",), (4,), (True,), (True,), (64,)))
    for layer in engine.layers:
        step_ms.append(check_layer(layer, torch.randn(4, hidden, device=device, dtype=torch.bfloat16) * 0.5, prompt,
                                   failures, "prompt"))
    engine.end_step()
    result["swaps_started"] = engine.stats.totals()["swaps"]
    result["swaps_in_flight_after_prompt"] = sum(layer.cache.swaps_in_flight for layer in engine.layers)
    for step in range(12):
        engine.begin_step(StepBatch(("seq",), (1,), (False,), (False,), (64 - step,)))
        ids = torch.tensor([[6, 7]]) if step % 2 else torch.tensor([[0, 6]])
        for layer in engine.layers:
            step_ms.append(check_layer(layer, torch.randn(1, hidden, device=device, dtype=torch.bfloat16) * 0.5, ids,
                                       failures, f"decode step {step}"))
        engine.end_step()
    result["resident_after_decode"] = engine.resident_experts()
    if not all(6 in r and 7 in r for r in result["resident_after_decode"]):
        failures.append(f"experts 6 and 7 were not swapped in: {result['resident_after_decode']}")

    # 5. place again, other slot count, with a swap in flight
    layer = engine.layers[0]
    layer.cache.start_swap(5, layer.cache.resident_experts[0], engine.swap_stream)
    in_flight = layer.cache.swaps_in_flight
    engine.place([[0, 1, 2, 3, 4, 5]] * args.layers)
    result["place_again"] = {"swaps_in_flight_before": in_flight, "resident": engine.resident_experts()}
    for step in range(4):
        engine.begin_step(StepBatch(("seq",), (2,), (False,), (False,), (40,)))
        for layer in engine.layers:
            step_ms.append(check_layer(layer, torch.randn(2, hidden, device=device, dtype=torch.bfloat16) * 0.5,
                                       torch.tensor([[5, 7], [6, 1]]), failures, f"after place, step {step}"))
        engine.end_step()
    result["report_totals"] = engine.report()["totals"]
    result["layer_forward_ms_median"] = sorted(step_ms)[len(step_ms) // 2]
    result["failures"] = failures
    engine.close()
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print("FAILED:" if failures else "all stages passed", *failures, sep="\n  ")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

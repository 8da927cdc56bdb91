"""`daop-vllm simulate`: a routing trace replayed through every policy on a machine model."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from daop_vllm.cli.common import fraction
from daop_vllm.core.errors import DaopConfigError
from daop_vllm.core.quantized_experts import FORMATS
from daop_vllm.offline.model_shapes import MODEL_SHAPES, model_shape


def add_parser(commands) -> None:
    sim = commands.add_parser("simulate", help="replay a routing trace through every policy on a machine model")
    sim.add_argument("--trace", type=Path, required=True)
    sim.add_argument("--resident-fraction", type=fraction, default=0.25)
    sim.add_argument("--split", type=fraction, default=None,
                     help="sequences with one phase only: the first S of their rows become the prompt")
    sim.add_argument("--calibrate-on", type=fraction, default=0.2,
                     help="share of the sequences (from the start) that build the static profile, not scored")
    sim.add_argument("--hardware", default="a6000", help="a preset (a6000, h200, local) or a JSON file")
    sim.add_argument("--model-shape", default=None, choices=sorted(MODEL_SHAPES),
                     help="expert sizes (default: the shape matching the trace)")
    sim.add_argument("--prediction-accuracy", type=fraction, default=None,
                     help="share of predicted experts that are right (default: as measured for the model "
                          "shape where known, else the paper's 0.8411)")
    sim.add_argument("--batch", type=int, default=1, help="sequences in flight (continuous batching)")
    sim.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                     help="GPUs of one machine, each holding 1/N of every expert (vLLM's tensor parallelism): "
                          "the resident fraction is per GPU, the CPU and host memory are shared (default 1)")
    sim.add_argument("--expert-format", default="bf16", choices=FORMATS,
                     help="the host experts' storage (its bytes per expert: what the CPU reads)")
    sim.add_argument("--device-expert-format", default=None, choices=FORMATS,
                     help="the device experts' storage (what the device reads and copies move; default: "
                          "--expert-format); the resident fraction stays a count of experts")
    sim.add_argument("--first-predicted-layer", type=int, default=4)
    sim.add_argument("--precomputed-kept", type=fraction, default=1.0,
                     help="(verified, daop policies) share of predicted rows whose pre-computed results the "
                          "staleness gate keeps: `eval quality --tolerance` measures it per tolerance as kept_share "
                          "(default 1: no gate)")
    sim.add_argument("--staging-slots", type=int, default=None,
                     help="(streaming policies: +stream, stream-all) experts a layer may have in flight to the device "
                          "at once (default 4)")
    sim.add_argument("--max-num-batched-tokens", type=int, default=None,
                     help="vLLM's token budget per step: prompts join the decode steps in pieces within it (chunked "
                          "prefill); default: each prompt whole, in a step of its own")
    sim.add_argument("--policies", nargs="+", default=None, help="default: all")
    sim.add_argument("--limit", type=int, default=None, help="use the first N sequences of the trace")
    sim.add_argument("--json", action="store_true", help="print one JSON object")
    sim.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    import json

    from tqdm import tqdm

    from daop_vllm.core.hardware import load_hardware
    from daop_vllm.offline.simulator import DEFAULT_STAGING_SLOTS, PAPER_PREDICTION_ACCURACY, POLICIES, simulate
    from daop_vllm.offline.traces import read_traces

    policies = args.policies or list(POLICIES)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise DaopConfigError(f"unknown policy {unknown[0]!r}; known: {', '.join(POLICIES)}")
    if args.batch < 1:
        raise DaopConfigError(f"--batch must be >= 1, got {args.batch}")
    if args.tensor_parallel < 1:
        raise DaopConfigError(f"--tensor-parallel must be >= 1, got {args.tensor_parallel}")
    if args.staging_slots is not None and args.staging_slots < 1:
        raise DaopConfigError(f"--staging-slots must be >= 1, got {args.staging_slots}")
    seqs = list(read_traces(args.trace))[: args.limit]
    if not seqs:
        raise DaopConfigError(f"{args.trace} holds no sequences")
    shape = model_shape(args.model_shape) if args.model_shape else _shape_of_trace(seqs[0])
    try:
        shape.tensor_parallel_rank(args.tensor_parallel)  # here, so that the refusal is the only line
    except ValueError as exc:
        raise DaopConfigError(str(exc)) from None
    accuracy = next(a for a in (args.prediction_accuracy, shape.prediction_accuracy, PAPER_PREDICTION_ACCURACY)
                    if a is not None)
    with tqdm(total=len(policies), desc="simulate", unit="policy", disable=args.json) as progress:
        try:
            result = simulate(seqs, policies, shape, load_hardware(args.hardware), args.resident_fraction,
                              args.calibrate_on, args.split, accuracy, args.batch, args.first_predicted_layer,
                              progress, expert_format=args.expert_format, precomputed_kept=args.precomputed_kept,
                              staging_slots=args.staging_slots or DEFAULT_STAGING_SLOTS,
                              max_batched_tokens=args.max_num_batched_tokens, tensor_parallel=args.tensor_parallel,
                              device_expert_format=args.device_expert_format)
        except ValueError as exc:
            raise DaopConfigError(str(exc)) from None
    result["settings"]["trace"] = args.trace.name
    result["command"] = "daop-vllm " + " ".join(sys.argv[1:])
    if args.json:
        print(json.dumps(result))
        return
    settings = result["settings"]
    print(f"{args.trace.name} on {settings['hardware']['name']}, {shape.name}, "
          f"{100 * args.resident_fraction:.1f}% resident, batch {args.batch}, {args.expert_format} experts"
          f"{f' ({args.device_expert_format} on the device)' if args.device_expert_format else ''}, "
          f"{settings['scored_sequences']} sequences scored")
    print(f"tensor parallel {args.tensor_parallel}: resident experts take "
          f"{settings['resident_expert_bytes_per_gpu'] / 2**30:.2f} GiB per GPU; times and bytes are one GPU's")
    static = result["policies"].get("static", {}).get("tokens_per_s")
    print(f"{'policy':>20} {'tok/s':>8} {'vs static':>9} {'decode hit':>10} {'CPU/token':>9} {'PCIe MB/token':>13}")
    for name, r in result["policies"].items():
        ratio = f"{r['tokens_per_s'] / static:9.2f}" if static else f"{'-':>9}"
        print(f"{name:>20} {r['tokens_per_s']:8.2f} {ratio} {100 * r['decode_hit_rate']:9.1f}% "
              f"{r['cpu_expert_tokens_per_token']:9.2f} {r['pcie_bytes_per_token'] / 1e6:13.1f}")


def _shape_of_trace(seq):
    for shape in MODEL_SHAPES.values():
        if (shape.num_layers, shape.num_experts, shape.top_k) == (seq.num_layers, seq.num_experts, seq.top_k):
            return shape
    raise DaopConfigError(f"no known model shape has {seq.num_layers} layers, top-{seq.top_k} of "
                          f"{seq.num_experts} experts; pass --model-shape")

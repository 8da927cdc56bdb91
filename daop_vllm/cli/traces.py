"""`daop-vllm calibrate` and `daop-vllm trace-stats`: placement profiles and what routing traces say."""

from __future__ import annotations

import argparse
from pathlib import Path

from daop_vllm.cli.common import fraction
from daop_vllm.core.errors import DaopConfigError


def add_parser(commands) -> None:
    calibrate = commands.add_parser("calibrate", help="write a placement profile from routing traces or prompts")
    source = calibrate.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, action="append", help="trace file (repeatable)")
    source.add_argument("--model", type=Path, help="model to run the prompts through (with --prompts)")
    calibrate.add_argument("--prompts", type=Path, help="text file, one prompt per line (with --model)")
    calibrate.add_argument("-o", "--out", type=Path, required=True, help="profile JSON to write")

    stats = commands.add_parser("trace-stats", help="what a routing trace says")
    stats.add_argument("trace", type=Path)
    stats.add_argument("--split", type=fraction, default=None,
                       help="treat the first S of each prefill-only sequence as prefill, the rest as decode")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    calibrate.set_defaults(run=calibrate_command)
    stats.set_defaults(run=trace_stats_command)


def calibrate_command(args: argparse.Namespace) -> None:
    import json

    from daop_vllm.offline.trace_analysis import calibrate_profile
    from daop_vllm.offline.traces import read_traces

    if args.model is not None:
        if args.prompts is None:
            raise DaopConfigError("calibrate --model needs --prompts FILE (one prompt per line)")
        from daop_vllm.cli.calibration import record_prompt_traces

        seqs = record_prompt_traces(args.model, args.prompts)
    else:
        seqs = [seq for path in args.trace for seq in read_traces(path)]
    shapes = {(s.num_layers, s.num_experts) for s in seqs}
    if len(shapes) != 1:
        raise DaopConfigError(f"the traces mix model shapes {sorted(shapes)}; calibrate one model at a time")
    profile = calibrate_profile(seqs)
    args.out.write_text(json.dumps([list(pair) for pair in profile]))
    print(f"{len(seqs)} sequences -> {len(profile)} [layer, expert] pairs, most popular first: {args.out}")


def trace_stats_command(args: argparse.Namespace) -> None:
    import json

    from daop_vllm.offline.trace_analysis import split_sequence, trace_stats
    from daop_vllm.offline.traces import read_traces

    seqs = [split_sequence(seq, args.split) for seq in read_traces(args.trace)]
    stats = trace_stats(seqs)
    if args.json:
        print(json.dumps(stats))
        return
    similarity = stats["prefill_decode_similarity"]["mean"]
    print(f"{stats['model'] or args.trace.name}: {stats['sequences']} sequences, {stats['num_layers']} layers, "
          f"top-{stats['top_k']} of {stats['num_experts']}, aligned: {stats['aligned']}")
    print(f"tokens (layer 0): prefill {stats['prefill_tokens']}, decode {stats['decode_tokens']}")
    print(f"experts used per layer: {stats['experts_used_per_layer']}")
    print("prefill-to-decode similarity (cosine of tokens per expert): "
          + (f"{100 * similarity:.2f}% (paper, Mixtral: 90.72%)" if similarity is not None
             else "no sequence has both phases (try --split 0.5)"))
    for budget, rate in stats["static_profile_hit_rate"].items():
        print(f"static profile at {100 * float(budget):.0f}% of experts resident: hit rate {100 * rate:.1f}%")

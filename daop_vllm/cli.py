"""The `daop-vllm` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from daop_vllm.core.errors import DaopConfigError


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="daop-vllm", description="DAOP expert offloading for MoE models in vLLM")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="offline batch generation with load_format='daop' on a small local Mixtral")
    demo.add_argument("--model-dir", type=Path, default=Path("models/demo-mixtral"),
                      help="checkpoint to serve; built here if missing (default: %(default)s)")
    demo.add_argument("--resident-fraction", type=_fraction, default=0.5, help="share of experts on the device")
    demo.add_argument("--num-prompts", type=int, default=16)
    demo.add_argument("--max-tokens", type=int, default=64)
    demo.add_argument("--compile", action="store_true", help="let vLLM compile the model (slower start)")

    build = commands.add_parser("build-model", help="write a small random-weight Mixtral checkpoint and tokenizer")
    build.add_argument("out_dir", type=Path)
    build.add_argument("--layers", type=int, default=4)
    build.add_argument("--experts", type=int, default=8)
    build.add_argument("--top-k", type=int, default=2)
    build.add_argument("--hidden-size", type=int, default=64)
    build.add_argument("--intermediate-size", type=int, default=128)
    build.add_argument("--seed", type=int, default=0)
    commands.add_parser("patch-vllm", help="apply patches/ to the installed vLLM (idempotent; `make` does it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from daop_vllm.demo import run_demo

            run_demo(args.model_dir, args.resident_fraction, args.num_prompts, args.max_tokens, eager=not args.compile)
        elif args.command == "build-model":
            from daop_vllm.model_builder import TinyMixtralShape, build_tiny_mixtral

            shape = TinyMixtralShape(num_layers=args.layers, num_experts=args.experts, top_k=args.top_k,
                                     hidden_size=args.hidden_size, intermediate_size=args.intermediate_size)
            print(build_tiny_mixtral(args.out_dir, shape, seed=args.seed))
        elif args.command == "patch-vllm":
            from daop_vllm.patch_vllm import apply_patches

            for name, status in apply_patches():
                print(f"{name}: {status}")
    except DaopConfigError as exc:
        print(f"daop-vllm: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

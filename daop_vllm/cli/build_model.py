"""`daop-vllm build-model`: a small MoE checkpoint and tokenizer, trained (model builders in
trained_model.py, corpus.py) or with random weights (model_builder.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from daop_vllm.cli.model_builder import FAMILIES
from daop_vllm.cli.trained_model import RECIPES
from daop_vllm.core.quantized_experts import check_format


def add_parser(commands) -> None:
    build = commands.add_parser("build-model", help="write a small MoE checkpoint and tokenizer: trained or random")
    build.add_argument("name", choices=[*RECIPES, "random"],
                       help="a trained model (Shakespeare, from scratch on this CPU; cached) or 'random' weights")
    build.add_argument("-o", "--out-dir", type=Path,
                       help="where to write it (default: $DAOP_VLLM_CACHE/models/NAME, ~/.cache/daop-vllm/...)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    # random weights only:
    build.add_argument("--layers", type=int, default=4)
    build.add_argument("--experts", type=int, default=8)
    build.add_argument("--top-k", type=int, default=2)
    build.add_argument("--hidden-size", type=int, default=64)
    build.add_argument("--intermediate-size", type=int, default=128)
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--family", default="mixtral", choices=list(FAMILIES), help="the MoE architecture")
    build.add_argument("--quantize", choices=["fp8"],
                       help="write the routed experts as an FP8 checkpoint does: e4m3 in blocks of 128 x 128 with "
                            "a scale each (hidden and intermediate sizes multiples of 128)")
    build.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    if args.name == "random":
        out_dir = args.out_dir or Path("models/random")
        from daop_vllm.cli.model_builder import TinyMixtralShape, build_tiny_mixtral

        shape = TinyMixtralShape(num_layers=args.layers, num_experts=args.experts, top_k=args.top_k,
                                 hidden_size=args.hidden_size, intermediate_size=args.intermediate_size)
        if args.quantize:
            for size in (args.hidden_size, args.intermediate_size):
                check_format(args.quantize, size, what="--quantize experts")
        print(build_tiny_mixtral(out_dir, shape, seed=args.seed, family=args.family, quantize_experts=args.quantize))
        return
    from daop_vllm.cli.trained_model import build_trained_model, model_card_summary

    print(model_card_summary(build_trained_model(args.name, args.out_dir, progress=not args.quiet)))

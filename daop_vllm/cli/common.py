"""What the subcommands share: argument types and how a benchmark's result is written."""

from __future__ import annotations

import argparse
import json
import sys


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def layer_index(text: str) -> int:
    """A predicted layer: 1 or more (layer 0 has no layer before it to predict from)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def emit_json(result: dict, args: argparse.Namespace, plot) -> bool:
    """Record the command in a benchmark's result, write --out and --plot; with --json print it
    and return True (the caller then prints nothing else)."""
    result["command"] = "daop-vllm " + " ".join(sys.argv[1:])
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if getattr(args, "plot", None):
        plot(result, args.plot)
    if args.json:
        print(json.dumps(result))
    return args.json


def percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"

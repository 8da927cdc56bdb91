"""The `daop-vllm` command: one module per subcommand group, each adding its parser."""

from __future__ import annotations

import argparse
import sys

from daop_vllm.cli import bench, build_model, demo, evaluate, patch_vllm, simulate, stats_view, traces
from daop_vllm.core.errors import DaopConfigError

# in the order of `daop-vllm --help`
SUBCOMMANDS = (demo, build_model, bench, evaluate, simulate, traces, stats_view, patch_vllm)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="daop-vllm", description="DAOP expert offloading for MoE models in vLLM")
    commands = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except DaopConfigError as exc:
        print(f"daop-vllm: error: {exc}", file=sys.stderr)
        return 2
    return 0

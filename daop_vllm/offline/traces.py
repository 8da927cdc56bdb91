"""Reading routing traces (the format of ../shared/traces/FORMAT.md): gzip or plain JSON Lines,
one sequence per line, with the expert ids chosen per layer, token and rank. The serving
engine writes them (core/trace_writer.py)."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class TraceError(ValueError):
    """A trace line that does not follow the format; the message names the file and line."""


@dataclass(frozen=True)
class TraceSequence:
    id: str
    num_layers: int
    num_experts: int
    top_k: int
    aligned: bool
    prefill: list[list[list[int]]]  # [layer][token][k]
    decode: list[list[list[int]]]
    prefill_probs: list[list[list[float]]] | None = None
    decode_probs: list[list[list[float]]] | None = None
    model: str = ""


def _check_rows(rows, name: str, seq: dict) -> None:
    if not isinstance(rows, list) or len(rows) != seq["num_layers"]:
        raise ValueError(f"{name!r} must have one list per layer ({seq['num_layers']})")
    for layer_rows in rows:
        for choice in layer_rows:
            if len(choice) != seq["top_k"] or not all(
                isinstance(e, int) and 0 <= e < seq["num_experts"] for e in choice
            ):
                raise ValueError(f"{name!r} has {choice!r}: expected {seq['top_k']} expert ids in [0, {seq['num_experts']})")


def read_traces(path: str | Path) -> Iterator[TraceSequence]:
    """Sequences of a trace file, checked as they are read."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                seq = json.loads(line)
                for key in ("id", "num_layers", "num_experts", "top_k", "prefill", "decode"):
                    if key not in seq:
                        raise ValueError(f"missing key {key!r}")
                _check_rows(seq["prefill"], "prefill", seq)
                _check_rows(seq["decode"], "decode", seq)
            except (ValueError, TypeError, KeyError) as exc:
                raise TraceError(f"{path}:{number}: {exc}") from None
            yield TraceSequence(
                id=str(seq["id"]), num_layers=seq["num_layers"], num_experts=seq["num_experts"],
                top_k=seq["top_k"], aligned=bool(seq.get("aligned", True)), prefill=seq["prefill"],
                decode=seq["decode"], prefill_probs=seq.get("prefill_probs"), decode_probs=seq.get("decode_probs"),
                model=seq.get("model", ""),
            )

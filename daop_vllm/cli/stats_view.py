"""`daop-vllm stats FILE [--plot PNG]`: a `stats_path` file as a short table, or a plot."""

from __future__ import annotations

import json
from pathlib import Path

from daop_vllm.core.errors import DaopConfigError
from daop_vllm.core.stats import summed_over_ranks
from daop_vllm.core.stats_file import rank_stats_paths


def load_report(path: Path) -> dict:
    """The stats file at `path`; under tensor parallelism, with the other ranks' files beside
    it, summed over the ranks (each rank's own under `ranks`)."""
    return summed_over_ranks([_read_report(rank_path) for rank_path in rank_stats_paths(path)])


def _read_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DaopConfigError(f"cannot read stats file {path}: {exc}") from None
    if not isinstance(report, dict) or "layers" not in report or "totals" not in report:
        raise DaopConfigError(f"{path} is not a DAOP stats file (a stats_path file has 'layers' and 'totals')")
    return report


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def render(report: dict) -> str:
    budget = report["budget"]
    lines = [
        f"mode {report['mode']}, realloc {report['realloc']}, {report['device_path']}, "
        f"{report['cpu_threads']} CPU threads",
        f"resident {budget['resident_experts']} of {budget['total_experts']} experts; "
        f"{report['requests_tracked']} requests tracked; CPU busy {report.get('cpu_busy_seconds', 0):.1f} s",
        *([_ranks_line(report["ranks"])] if "ranks" in report else []),
        f"{'layer':>5} {'resident':>16} {'device tok':>10} {'cpu tok':>9} {'prefill hit':>11} {'decode hit':>10} "
        f"{'pred acc':>8} {'swaps':>6}",
    ]
    rows = [(str(i), layer) for i, layer in enumerate(report["layers"])] + [("all", report["totals"])]
    for name, row in rows:
        resident = ",".join(map(str, row["resident"])) if "resident" in row else ""
        lines.append(
            f"{name:>5} {resident:>16} {row['device_expert_tokens']:>10} {row['cpu_expert_tokens']:>9} "
            f"{_pct(row['prefill_hit_rate']):>11} {_pct(row['decode_hit_rate']):>10} "
            f"{_pct(_ratio(row['predictions_correct'], row['predictions'])):>8} {row['swaps']:>6}"
        )
    return "\n".join(lines)


def _ranks_line(ranks: list[dict]) -> str:
    busy = ", ".join(f"{rank['cpu_busy_seconds']:.1f}" for rank in ranks)
    return (f"tensor parallel: {len(ranks)} ranks, counts summed over them (a (token, expert) pair once per rank); "
            f"CPU busy per rank {busy} s")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = report["layers"]
    index = list(range(len(layers)))
    fig, (hits, work) = plt.subplots(1, 2, figsize=(11, 3.8))
    for offset, phase in ((-0.2, "prefill"), (0.2, "decode")):
        hits.bar([i + offset for i in index], [100 * (layer[f"{phase}_hit_rate"] or 0) for layer in layers],
                 width=0.4, label=phase)
    hits.set(xlabel="layer", ylabel="% of expert work on the device", title="device hit rate", ylim=(0, 100))
    hits.legend()
    work.bar(index, [layer["device_expert_tokens"] for layer in layers], label="device")
    work.bar(index, [layer["cpu_expert_tokens"] for layer in layers],
             bottom=[layer["device_expert_tokens"] for layer in layers], label="CPU")
    work.set(xlabel="layer", ylabel="(token, expert) assignments", title="expert work")
    work.legend()
    fig.suptitle(f"DAOP stats: mode {report['mode']}, realloc {report['realloc']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def add_parser(commands) -> None:
    stats_cmd = commands.add_parser("stats", help="a stats_path file as a table (and a plot)")
    stats_cmd.add_argument("file", type=Path)
    stats_cmd.add_argument("--plot", type=Path, help="write a PNG plot here (needs matplotlib)")
    stats_cmd.set_defaults(run=run)


def run(args) -> None:
    report = load_report(args.file)
    print(render(report))
    if args.plot:
        plot(report, args.plot)

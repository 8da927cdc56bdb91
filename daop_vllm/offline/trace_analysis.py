"""What routing traces say: calibration profiles, and the statistics of `daop-vllm trace-stats`."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from daop_vllm.core.placement import Pair, plan_residency, rank_pairs
from daop_vllm.offline.traces import TraceSequence


def _counts(rows: list[list[int]], num_experts: int) -> torch.Tensor:
    """Tokens per expert [E] of one layer's rows [T][K]."""
    if not rows:
        return torch.zeros(num_experts)
    return torch.bincount(torch.tensor(rows).flatten(), minlength=num_experts).float()


def prefill_counts(seqs: Iterable[TraceSequence]) -> torch.Tensor:
    """[L, E] tokens per (layer, expert) over the prefill rows of all sequences."""
    total = None
    for seq in seqs:
        counts = torch.stack([_counts(rows, seq.num_experts) for rows in seq.prefill])
        total = counts if total is None else total + counts
    if total is None:
        raise ValueError("no sequences")
    return total


def calibrate_profile(seqs: Iterable[TraceSequence]) -> list[Pair]:
    """Every (layer, expert) pair of the model, most prefill tokens first (ties: layer, expert)."""
    counts = prefill_counts(seqs)
    num_layers, num_experts = counts.shape
    pairs = [(layer, expert) for layer in range(num_layers) for expert in range(num_experts)]
    return sorted(pairs, key=lambda p: (-counts[p].item(), p))


def split_sequence(seq: TraceSequence, split: float) -> TraceSequence:
    """A prefill-only sequence as prefill (the first `split` of its rows) and decode (the rest)."""
    if any(seq.decode) or split is None:
        return seq
    cut = [int(len(rows) * split) for rows in seq.prefill]
    return TraceSequence(seq.id, seq.num_layers, seq.num_experts, seq.top_k, seq.aligned,
                         [rows[:c] for rows, c in zip(seq.prefill, cut)],
                         [rows[c:] for rows, c in zip(seq.prefill, cut)], model=seq.model)


def prefill_decode_similarity(seq: TraceSequence) -> float | None:
    """Cosine similarity of the prefill's and the decode's tokens-per-expert vectors, averaged
    over layers (how well a prompt's experts predict its decode's, the paper's 90.72% on
    Mixtral); None without both phases. A share of decode choices that hit prompt-used
    experts would say little: a long prompt uses every expert."""
    values = []
    for prefill, decode in zip(seq.prefill, seq.decode):
        if prefill and decode:
            a, b = _counts(prefill, seq.num_experts), _counts(decode, seq.num_experts)
            values.append(torch.nn.functional.cosine_similarity(a, b, dim=0).item())
    return sum(values) / len(values) if values else None


def trace_stats(seqs: list[TraceSequence], budgets: Iterable[float] = (0.25, 0.5, 0.75)) -> dict:
    """Tokens, experts used per layer, prefill-to-decode similarity, and the hit rate a static
    profile (calibrated on this same trace's prefill) would give at each budget."""
    first = seqs[0]
    num_layers, num_experts = first.num_layers, first.num_experts
    all_counts = torch.zeros(num_layers, num_experts)
    for seq in seqs:
        for layer in range(num_layers):
            all_counts[layer] += _counts(seq.prefill[layer], num_experts) + _counts(seq.decode[layer], num_experts)
    similarity = {seq.id: prefill_decode_similarity(seq) for seq in seqs}
    measured = [v for v in similarity.values() if v is not None]
    ranking = rank_pairs(num_layers, num_experts, calibrate_profile(seqs))
    hit_rates = {}
    for budget in budgets:
        resident = plan_residency(int(budget * num_layers * num_experts), num_layers, num_experts, ranking)
        hits = sum(all_counts[layer, experts].sum().item() for layer, experts in enumerate(resident))
        hit_rates[str(budget)] = hits / all_counts.sum().item()
    return {
        "model": first.model, "sequences": len(seqs), "num_layers": num_layers, "num_experts": num_experts,
        "top_k": first.top_k, "aligned": all(s.aligned for s in seqs),
        "prefill_tokens": sum(len(s.prefill[0]) for s in seqs),
        "decode_tokens": sum(len(s.decode[0]) for s in seqs),
        "experts_used_per_layer": [int((c > 0).sum()) for c in all_counts],
        "prefill_decode_similarity": {"mean": sum(measured) / len(measured) if measured else None,
                                      "per_sequence": similarity, "paper_mixtral": 0.9072},
        "static_profile_hit_rate": hit_rates,
    }

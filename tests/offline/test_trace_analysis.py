"""Calibration profiles and trace statistics, on the public traces and on hand-made ones."""

import json
import subprocess
import sys

import pytest

from daop_vllm.offline.trace_analysis import calibrate_profile, prefill_decode_similarity, split_sequence, trace_stats
from daop_vllm.offline.traces import TraceSequence, read_traces

from ..shared_traces import trace_path


def seq(prefill, decode, experts=4):
    return TraceSequence("s", len(prefill), experts, len(prefill[0][0]), True, prefill, decode)


def test_profile_ranks_pairs_by_prefill_tokens():
    s = seq([[[1, 2], [1, 3]], [[0, 1], [0, 2]]], [[], []])
    profile = calibrate_profile([s])
    assert profile[:2] == [(0, 1), (1, 0)]  # two tokens each; ties by layer
    assert len(profile) == 8 and len(set(profile)) == 8


def test_similarity_and_split():
    same = seq([[[0, 1], [0, 1]]], [[[0, 1]]])
    assert prefill_decode_similarity(same) == pytest.approx(1.0)
    disjoint = seq([[[0, 1]]], [[[2, 3]]])
    assert prefill_decode_similarity(disjoint) == pytest.approx(0.0)
    halves = split_sequence(seq([[[0, 1], [0, 1], [2, 3], [2, 3]]], [[]]), 0.5)
    assert halves.prefill == [[[0, 1], [0, 1]]] and halves.decode == [[[2, 3], [2, 3]]]


def test_calibrate_mixtral_trace_gives_all_256_pairs(tmp_path):
    path = trace_path("mixtral-8x7b-vllm.jsonl.gz")
    out = tmp_path / "profile.json"
    result = subprocess.run([sys.executable, "-m", "daop_vllm.cli", "calibrate", "--trace", str(path), "-o", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    pairs = json.loads(out.read_text())
    assert len(pairs) == 256 and {tuple(p) for p in pairs} == {(l, e) for l in range(32) for e in range(8)}


def test_trace_stats_on_mixtral_trace():
    stats = trace_stats(list(read_traces(trace_path("mixtral-8x7b-vllm.jsonl.gz"))))
    similarity = stats["prefill_decode_similarity"]["mean"]
    assert 0.8 < similarity < 1.0, "close to the paper's 90.72%"
    rates = stats["static_profile_hit_rate"]
    assert rates["0.25"] < rates["0.5"] < rates["0.75"] < 1
    assert stats["experts_used_per_layer"] == [8] * 32

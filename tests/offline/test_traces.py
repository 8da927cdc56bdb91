import gzip
import json

import pytest

from daop_vllm.offline.traces import TraceError, read_traces

from ..shared_traces import trace_path


def test_reads_public_mixtral_trace():
    seqs = list(read_traces(trace_path("mixtral-8x7b-vllm.jsonl.gz")))
    assert len(seqs) == 3
    first = seqs[0]
    assert (first.num_layers, first.num_experts, first.top_k, first.aligned) == (32, 8, 2, False)
    assert len(first.prefill) == 32 and len(first.decode) == 32 and first.prefill_probs is not None


def test_reads_public_deepseek_trace():
    seqs = list(read_traces(trace_path("deepseek-v2-lite-puffin.dev.jsonl.gz")))
    assert len(seqs) == 300 and all(s.aligned and s.top_k == 6 and s.num_experts == 64 for s in seqs)
    assert sum(len(s.prefill[0]) for s in seqs) == 28659


GOOD = {"id": "a", "num_layers": 1, "num_experts": 4, "top_k": 2, "prefill": [[[0, 1]]], "decode": [[]]}


@pytest.mark.parametrize(
    "bad, words",
    [
        ("{not json", "line 2"),
        (json.dumps({**GOOD, "prefill": [[[0, 9]]]}), "[0, 9]"),
        (json.dumps({**GOOD, "prefill": [[[0]]]}), "expected 2 expert ids"),
        (json.dumps({**GOOD, "decode": []}), "one list per layer"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "top_k"}), "missing key 'top_k'"),
    ],
)
def test_malformed_line_is_named(tmp_path, bad, words):
    path = tmp_path / "t.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps(GOOD) + "\n" + bad + "\n")
    with pytest.raises(TraceError) as info:
        list(read_traces(path))
    assert f"{path}:2:" in str(info.value) and words.replace("line 2", "") in str(info.value)


def test_our_own_trace_reads_back():
    """tests/data/tiny-mixtral.jsonl.gz, written by the engine's trace_path (record_tiny_trace.py):
    what the writer puts out, the reader takes in, whole."""
    from pathlib import Path

    seqs = list(read_traces(Path(__file__).resolve().parents[1] / "data" / "tiny-mixtral.jsonl.gz"))
    assert len(seqs) == 6
    for seq in seqs:
        assert (seq.num_layers, seq.num_experts, seq.top_k, seq.aligned) == (4, 8, 2, True)
        assert all(len(rows) == len(seq.prefill[0]) > 0 for rows in seq.prefill)
        assert all(len(rows) == 23 for rows in seq.decode), "24 tokens generated: 23 go back through the model"
        assert len(seq.decode_probs[0][0]) == 2 and abs(sum(seq.decode_probs[0][0]) - 1) < 1e-4

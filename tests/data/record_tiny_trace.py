"""Records tests/data/tiny-mixtral.jsonl.gz: the routing of six prompts through the random tiny
Mixtral (daop_vllm.cli.model_builder), written by the engine's own `trace_path` option.

    .venv/bin/python tests/data/record_tiny_trace.py tests/data/tiny-mixtral.jsonl.gz
"""

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = ["Hello world, the experts route every token", "The quick brown fox jumps over the lazy dog",
           "Once upon a time there was a small model", "During decode the next layer is predicted",
           "One, two, three, four, five, six, seven", "Mixture-of-Experts models"]


def main(out: Path) -> None:
    from vllm import LLM, SamplingParams

    from daop_vllm.cli.model_builder import build_tiny_mixtral

    out.unlink(missing_ok=True)
    model = build_tiny_mixtral(tempfile.mkdtemp())
    llm = LLM(model=str(model), dtype="float32", max_model_len=256, max_num_seqs=4, seed=0, enforce_eager=True,
              load_format="daop", model_loader_extra_config={"resident_fraction": 0.5, "trace_path": str(out)})
    llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    llm.llm_engine.engine_core.shutdown()  # finished requests reach the trace as the engine closes
    print(out, out.stat().st_size, "bytes")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve())

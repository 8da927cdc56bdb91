"""`daop-vllm calibrate --model DIR --prompts FILE`: the prompts' routing, recorded by vLLM."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from daop_vllm.core.errors import DaopConfigError
from daop_vllm.offline.traces import TraceSequence, read_traces


def record_prompt_traces(model: Path, prompts_file: Path) -> list[TraceSequence]:
    """Run every prompt's prefill through vLLM (`load_format="daop"`, all experts resident,
    trace recording on) and return the recorded sequences."""
    try:
        prompts = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise DaopConfigError(f"--prompts {str(prompts_file)!r}: cannot read it ({exc.strerror})") from None
    if not prompts:
        raise DaopConfigError(f"--prompts {str(prompts_file)!r} has no prompts (one per line)")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    with tempfile.TemporaryDirectory(prefix="daop-calibrate-") as directory:
        trace = Path(directory) / "prompts.jsonl"
        llm = LLM(model=str(model), load_format="daop", enforce_eager=True, gpu_memory_utilization=0.5,
                  model_loader_extra_config={"resident_fraction": 1, "trace_path": str(trace)})
        llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=True)  # the prefill is what counts
        llm.llm_engine.engine_core.shutdown()  # the engine writes the requests still open
        return list(read_traces(trace))

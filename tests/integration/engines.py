"""Real vLLM engines for integration tests: small, in-process, fp32."""

import gc

ENGINE_ARGS = dict(dtype="float32", max_model_len=256, max_num_seqs=8, seed=0, gpu_memory_utilization=0.5)


def make_llm(model: str, **kwargs):
    from vllm import LLM

    return LLM(model=model, **{**ENGINE_ARGS, **kwargs})


def close_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()

"""Real vLLM engines for integration tests: small, in-process, fp32."""

import contextlib
import gc

ENGINE_ARGS = dict(dtype="float32", max_model_len=256, max_num_seqs=8, seed=0, gpu_memory_utilization=0.5)


def make_llm(model: str, **kwargs):
    from vllm import LLM

    return LLM(model=model, **{**ENGINE_ARGS, **kwargs})


@contextlib.contextmanager
def running_llm(model: str, **kwargs):
    """An engine for the `with` block, shut down after it whatever happens."""
    llm = make_llm(model, **kwargs)
    try:
        yield llm
    finally:
        close_llm(llm)


def close_llm(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


PROMPTS = [
    "Hello world",
    "The quick brown fox",
    "Once upon a time there was",
    "What is the capital of France?",
    "Write a short poem about the sea",
    "One, two, three, four",
    "Mixture-of-Experts models route every token",
    "During decode the next layer",
    "experts",
]
MAX_TOKENS = 24


def greedy_ids(llm) -> list[list[int]]:
    """The greedy tokens of PROMPTS, all submitted at once (vLLM batches them)."""
    from vllm import SamplingParams

    outputs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def run_counted(llm) -> tuple[list[list[int]], dict]:
    """greedy_ids with the DAOP counters of just that run."""
    llm.collective_rpc("daop_reset_counters")
    ids = greedy_ids(llm)
    return ids, llm.collective_rpc("daop_report")[0]


def runs_at_fractions(llm, fractions: list[float]):
    """(fraction, greedy ids, counters) per fraction: the engine, started at fractions[0], is
    re-placed between runs (an RPC; far cheaper than a new engine)."""
    for fraction in fractions:
        if fraction != fractions[0]:
            llm.collective_rpc("daop_place_fraction", args=(fraction,))
        yield (fraction, *run_counted(llm))


def prompt_logprobs(llm, prompts: list[list[int]]) -> list[list[float]]:
    """vLLM's log-probability of each prompt token after the first, given those before it."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                           SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    return [[step[token].logprob for step, token in zip(output.prompt_logprobs[1:], prompt[1:])]
            for prompt, output in zip(prompts, outputs)]


def transformers_logprobs(model: str, prompts: list[list[int]], dtype,
                          without_router_bias: bool = False) -> list[list[float]]:
    """The same log-probabilities from `transformers`' implementation of the model (optionally
    with DeepSeek-V3's router bias zeroed)."""
    import torch
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
    if without_router_bias:
        for module in reference.modules():
            if isinstance(getattr(module, "e_score_correction_bias", None), torch.Tensor):
                module.e_score_correction_bias.zero_()
    result = []
    for prompt in prompts:
        with torch.no_grad():
            logprobs = reference(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
        result.append([logprobs[position, token].item() for position, token in enumerate(prompt[1:])])
    return result


def max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for row_a, row_b in zip(a, b, strict=True) for x, y in zip(row_a, row_b, strict=True))

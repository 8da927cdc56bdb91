"""Hooks on vLLM 0.32's V1 model runner that tell the DAOP engine, per step, which token rows
belong to which request and in which phase, and when a request leaves.

V1 runner internals used (checked against 0.32 by the plugin's version gate):
`_prepare_inputs(scheduler_output, num_scheduled_tokens)`, `input_batch.req_ids`,
`input_batch.num_computed_tokens_cpu`, `input_batch.num_prompt_tokens`,
`scheduler_output.preempted_req_ids`, `_model_forward`, `_on_request_state_removed`,
`requests[req_id].sampling_params.max_tokens` and `.output_token_ids`, `_dummy_run` (profile,
warm-up and capture runs, outside engine steps).
"""

from __future__ import annotations

import functools

from daop_vllm.core.batch import StepBatch


def engine_of_runner(runner):
    """The DAOP engine of a model runner's model, or None (not loaded yet, or not daop)."""
    if runner is None or getattr(runner, "model", None) is None:
        return None
    return getattr(runner.get_model(), "daop_engine", None)


def install_runner_hooks() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner._prepare_inputs, "_daop_hooked", False):
        return

    prepare_inputs = GPUModelRunner._prepare_inputs

    @functools.wraps(prepare_inputs)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        engine = engine_of_runner(self)
        if engine is not None:
            for req_id in getattr(scheduler_output, "preempted_req_ids", None) or ():
                engine.drop_request(req_id, finished=False)
            engine.begin_step(step_batch(self.input_batch, num_scheduled_tokens, self.requests))
        return prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)

    model_forward = GPUModelRunner._model_forward

    @functools.wraps(model_forward)
    def _model_forward(self, *args, **kwargs):
        output = model_forward(self, *args, **kwargs)
        engine = engine_of_runner(self)
        if engine is not None:
            engine.end_step()
        return output

    on_removed = GPUModelRunner._on_request_state_removed

    @functools.wraps(on_removed)
    def _on_request_state_removed(self, req_id, req_state):
        engine = engine_of_runner(self)
        if engine is not None:
            engine.drop_request(req_id)
        return on_removed(self, req_id, req_state)

    dummy_run = GPUModelRunner._dummy_run

    @functools.wraps(dummy_run)
    def _dummy_run(self, *args, **kwargs):
        engine = engine_of_runner(self)
        if engine is None:
            return dummy_run(self, *args, **kwargs)
        with engine.dummy_run():
            return dummy_run(self, *args, **kwargs)

    _prepare_inputs._daop_hooked = True  # type: ignore[attr-defined]
    GPUModelRunner._prepare_inputs = _prepare_inputs
    GPUModelRunner._model_forward = _model_forward
    GPUModelRunner._on_request_state_removed = _on_request_state_removed
    GPUModelRunner._dummy_run = _dummy_run


def step_batch(input_batch, num_scheduled_tokens, requests) -> StepBatch:
    """The step's requests in row order, from the runner's persistent batch and request states."""
    num_reqs = len(num_scheduled_tokens)
    rows = [int(n) for n in num_scheduled_tokens]
    computed = input_batch.num_computed_tokens_cpu[:num_reqs].tolist()
    prompt = input_batch.num_prompt_tokens[:num_reqs].tolist()
    prefill = [c < p for c, p in zip(computed, prompt)]
    completes = [pre and c + r >= p for pre, c, r, p in zip(prefill, computed, rows, prompt)]
    req_ids = tuple(input_batch.req_ids[:num_reqs])
    return StepBatch(req_ids, tuple(rows), tuple(prefill), tuple(completes),
                     tuple(_tokens_left(requests.get(req_id)) for req_id in req_ids))


def _tokens_left(state) -> int:
    """Tokens a request may still generate (its max_tokens left); 1 when it does not say."""
    params = getattr(state, "sampling_params", None)
    if params is None or params.max_tokens is None:
        return 1
    return max(1, params.max_tokens - len(state.output_token_ids))

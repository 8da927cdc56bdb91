"""Teacher forcing through vLLM's sampler, for perplexity measured on decode rows.

vLLM scores a prompt in one prefill, but DAOP's approximations act only on decode rows; so a
held-out passage is fed as a short prompt plus forced continuation tokens: a request with
`SamplingParams(extra_args={"forced_tokens": [...]})` samples exactly those tokens, and with
`logprobs=0` (and vLLM's default `logprobs_mode="raw_logprobs"`) it reports each forced token's
log-probability under the model's own logits, before this processor touched them.
"""

from __future__ import annotations

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

FORCED_TOKENS_KEY = "forced_tokens"


class ForcedTokens(LogitsProcessor):
    """Pass as `LLM(..., logits_processors=[ForcedTokens])`."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self._rows: dict[int, tuple[list[int], list[int]]] = {}  # batch row -> (forced ids, output ids so far)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        forced = (sampling_params.extra_args or {}).get(FORCED_TOKENS_KEY)
        if forced is not None and not (isinstance(forced, list) and all(isinstance(t, int) for t in forced)):
            raise ValueError(f"extra_args[{FORCED_TOKENS_KEY!r}] must be a list of token ids")

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def new_state(params: SamplingParams, _prompt_ids, output_ids: list[int]):
            forced = (params.extra_args or {}).get(FORCED_TOKENS_KEY) if params else None
            return (forced, output_ids) if forced else None

        process_dict_updates(self._rows, batch_update, new_state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for row, (forced, output_ids) in self._rows.items():
            position = len(output_ids)  # the output list is vLLM's live one: this step samples token `position`
            if position < len(forced):
                token = forced[position]
                kept = logits[row, token].clone()
                logits[row] = float("-inf")
                logits[row, token] = kept
        return logits

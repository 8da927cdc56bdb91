"""Router functions: router logits -> (top-k weights, top-k expert ids).

Each MoE family routes its own way; a `RoutingFunction` is what both the forward pass and
the next-layer predictor call, so that prediction uses the family's real router.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SoftmaxTopK:
    """Mixtral's router: softmax over all experts in fp32, top-k, optionally renormalised."""

    top_k: int
    renormalize: bool = True

    def __str__(self) -> str:
        return f"softmax top-{self.top_k}" + (", renormalised" if self.renormalize else ", not renormalised")

    def scores(self, router_logits: torch.Tensor) -> torch.Tensor:
        """[T, E] -> [T, E] fp32 probabilities, whose top-k the router chooses."""
        return torch.softmax(router_logits, dim=-1, dtype=torch.float32)

    def __call__(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # router_logits: [T, E] -> weights [T, K] fp32, ids [T, K] int64 (descending weight).
        # Softmax is monotonic: the top-k of the logits, then the softmax of those k alone (the
        # renormalised weights) - two ops where four were, as vLLM's CPU router does.
        top_logits, ids = torch.topk(router_logits, self.top_k, dim=-1)
        if self.renormalize:
            return torch.softmax(top_logits, dim=-1, dtype=torch.float32), ids
        log_total = torch.logsumexp(router_logits.float(), dim=-1, keepdim=True)
        return (top_logits.float() - log_total).exp(), ids


@dataclass(frozen=True)
class CustomRouting:
    """A model's own routing function, vLLM's `custom_routing_function` signature
    `(hidden_states, gating_output, topk, renormalize) -> (weights, ids)` (Phi-3.5-MoE's
    sparsemixer, DeepSeek's grouped top-k). Such functions read only the row count of
    `hidden_states`, so the logits stand in for it. `scores` (degradation's substitutes and
    their weights) are the function's own: softmax, or sigmoid (DeepSeek-V3; its bias, which
    only steers the choice, is left out)."""

    function: object
    top_k: int
    renormalize: bool = False
    name: str | None = None  # for reports; default: the function's own name
    scoring_func: str = "softmax"

    def __str__(self) -> str:
        return f"{self.name or getattr(self.function, '__name__', 'custom')} top-{self.top_k}"

    def scores(self, router_logits: torch.Tensor) -> torch.Tensor:
        if self.scoring_func == "sigmoid":
            return torch.sigmoid(router_logits.float())
        return torch.softmax(router_logits, dim=-1, dtype=torch.float32)

    def __call__(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = self.function(router_logits, router_logits, self.top_k, self.renormalize)
        return weights.float(), ids.long()

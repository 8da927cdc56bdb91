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
        # router_logits: [T, E] -> weights [T, K] fp32, ids [T, K] int64 (descending weight)
        weights, ids = torch.topk(self.scores(router_logits), self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

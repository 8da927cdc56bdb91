"""Counters of what the engine did, per MoE layer."""

from __future__ import annotations


class DaopStats:
    """Expert-token assignments (a token routed to an expert counts once) computed on the
    device and on the CPU, per layer. Written by the forward thread, read by anyone."""

    def __init__(self, num_layers: int = 0) -> None:
        self.device_expert_tokens = [0] * num_layers
        self.cpu_expert_tokens = [0] * num_layers

    def add_layer(self) -> None:
        self.device_expert_tokens.append(0)
        self.cpu_expert_tokens.append(0)

    def record(self, layer: int, device_tokens: int, cpu_tokens: int) -> None:
        self.device_expert_tokens[layer] += device_tokens
        self.cpu_expert_tokens[layer] += cpu_tokens

    def reset(self) -> None:
        n = len(self.device_expert_tokens)
        self.device_expert_tokens = [0] * n
        self.cpu_expert_tokens = [0] * n

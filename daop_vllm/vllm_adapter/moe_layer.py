"""The DAOP MoE layer that replaces vLLM's MoE runner under the `daop` load format.

While the `daop` loader builds a model, the model module's `FusedMoEFactory` is replaced by
`daop_moe_factory`, which returns a `DaopMoELayer` instead of a `MoERunner`. The layer's
forward is one opaque custom op (`torch.ops.vllm.daop_moe_forward`), so that Dynamo and
inductor treat all of DAOP's Python - threads, host copies, counters - as a black box.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import re
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from daop_vllm.core.engine import DaopEngine
from daop_vllm.core.errors import DaopConfigError
from daop_vllm.core.moe import DaopMoE, RoutingFunction
from daop_vllm.core.quantized_experts import FP8_BLOCK, QuantizedWeights
from daop_vllm.core.ranks import TensorParallelRank
from daop_vllm.core.routing import CustomRouting, SoftmaxTopK
from daop_vllm.vllm_adapter.families import MoEFamily


class RoutedExpertWeights(nn.Module):
    """A layer's host expert store as parameters, named as vLLM's RoutedExperts names them
    (w13 = gate rows then up rows; fp8 experts also their block scales, `*_weight_scale_inv`),
    each with vLLM's expert weight loader: models that load experts themselves (DeepSeek-V2) call
    it with `shard_id` w1/w2/w3 and `expert_id`. Under tensor parallelism (`ranks`) the store
    holds this rank's shard of every expert: its slice of the intermediate size."""

    def __init__(self, moe: DaopMoE, ranks: TensorParallelRank) -> None:
        super().__init__()
        self.ranks = ranks
        w13, w2 = moe.store.w13, moe.store.w2
        if isinstance(w13, QuantizedWeights):  # fp8, as the checkpoint holds them
            self.w13_weight_scale_inv = nn.Parameter(w13.scales, requires_grad=False)
            self.w2_weight_scale_inv = nn.Parameter(w2.scales, requires_grad=False)
            w13, w2 = (w.data.view(torch.float8_e4m3fn) for w in (w13, w2))
        self.w13_weight = nn.Parameter(w13, requires_grad=False)
        self.w2_weight = nn.Parameter(w2, requires_grad=False)
        for param in self.parameters():
            param.weight_loader = self.load_expert

    def load_expert(self, param: nn.Parameter, tensor: torch.Tensor, name: str = "", *, shard_id: str,
                    expert_id: int, return_success: bool = False) -> bool:
        """Expert `expert_id`'s w1, w3 (rows of w13) or w2 into `param` (a weight, or its block scales)."""
        rows = self.w2_weight.shape[2]  # the intermediate size: w1's rows
        if param is getattr(self, "w13_weight_scale_inv", None):
            rows //= FP8_BLOCK  # a row of block scales per 128 rows
        target = param[expert_id] if shard_id == "w2" else param[expert_id, slice(0, rows) if shard_id == "w1"
                                                                   else slice(rows, 2 * rows)]
        sharded = 1 if shard_id == "w2" else 0  # the intermediate size: w2's input, w1's and w3's output
        size = target.shape[sharded]
        if self.ranks.size > 1 and tensor.dim() == target.dim() and tensor.shape[sharded] == self.ranks.size * size:
            tensor = tensor.narrow(sharded, self.ranks.rank * size, size)  # the whole expert: this rank's shard
        if target.shape != tensor.shape:
            raise ValueError(f"expert {expert_id} {shard_id} {name}: the checkpoint's {tuple(tensor.shape)} does not "
                             f"fit {tuple(target.shape)}")
        target.copy_(tensor)
        return True


class DaopMoELayer(nn.Module):
    """Holds one layer's host expert store (as `routed_experts`, so that vLLM's weight loading
    and checks see it) and forwards through the DAOP op."""

    def __init__(self, moe: DaopMoE, layer_name: str, ckpt_names: tuple[str, str, str],
                 shared_experts: nn.Module | None = None, gate: nn.Module | None = None,
                 shared_output_scale: float = 1.0, ranks: TensorParallelRank | None = None) -> None:
        """`ranks`: under tensor parallelism the store holds this rank's shard of each expert and
        the layer's output is this rank's share (of the shared experts too: vLLM builds them
        unreduced), all-reduced here as vLLM's MoE runner does."""
        super().__init__()
        self.moe = moe
        ranks = ranks or TensorParallelRank()
        self._sums_ranks = ranks.size > 1
        # The model's shared experts (Qwen2-MoE, DeepSeek-V2): always on the device, outside DAOP's
        # budget and counters. Kept out of this module's children: the MoE block owns and loads
        # them, as it owns the gate of the families (Qwen3-MoE, DeepSeek-V2) that leave routing to
        # the MoE layer.
        self._shared_experts = (shared_experts,)
        self._shared_output_scale = shared_output_scale
        self._router_logits = None if gate is None else _router_logits(gate)
        self.layer_name = layer_name
        self.routed_experts = RoutedExpertWeights(moe, ranks)
        gate, down, up = (re.escape(name) for name in ckpt_names)
        self._ckpt_pattern = re.compile(rf"(\d+)\.({gate}|{down}|{up})\.(weight|weight_scale_inv)")
        self._shard_ids = dict(zip(ckpt_names, ("w1", "w2", "w3"), strict=True))

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if self._router_logits is not None:  # the block passed its hidden states in place of logits
            router_logits = self._router_logits(hidden_states)
        out = torch.ops.vllm.daop_moe_forward(hidden_states, router_logits, self.layer_name)
        shared = self._shared_experts[0]
        if shared is not None:
            out = out + shared(hidden_states) * self._shared_output_scale
        if self._sums_ranks:
            from vllm.distributed import tensor_model_parallel_all_reduce

            out = tensor_model_parallel_all_reduce(out)
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Checkpoint tensors `{expert}.{gate|down|up}.weight` (and, fp8, `.weight_scale_inv`)
        into the host store (models whose weight loader hands each module its own weights)."""
        loaded: set[str] = set()
        for name, tensor in weights:
            match = self._ckpt_pattern.fullmatch(name)
            if match is None:
                raise ValueError(f"{self.layer_name}: unexpected expert weight {name!r}")
            shard_id = self._shard_ids[match.group(2)]
            param_name = ("w2_" if shard_id == "w2" else "w13_") + match.group(3)
            self.routed_experts.load_expert(getattr(self.routed_experts, param_name), tensor, shard_id=shard_id,
                                            expert_id=int(match.group(1)))
            loaded.add(f"routed_experts.{param_name}")
        return loaded


def set_routers(model: nn.Module, engine: DaopEngine, family: MoEFamily) -> None:
    """Give the engine each layer's gate, so that the layer before can predict its experts."""
    for layer in model.modules():
        if isinstance(layer, DaopMoELayer):
            block = model.get_submodule(layer.layer_name.rsplit(".", 1)[0])
            engine.set_router(layer.moe.layer, _router_logits(getattr(block, family.gate_attr)))


def release_loaded_experts(model: nn.Module) -> None:
    """After the engine quantized its experts: the parameters vLLM loaded them through let go
    of the loaded weights (empty tensors of the same dtype), so that their memory is freed."""
    for layer in model.modules():
        if isinstance(layer, RoutedExpertWeights):
            for param in (layer.w13_weight, layer.w2_weight):
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)


def _router_logits(gate: nn.Module):
    def router_logits(x: torch.Tensor) -> torch.Tensor:
        out = gate(x)
        return out[0] if isinstance(out, tuple) else out  # vLLM's linear layers return (out, bias)

    return router_logits


def _daop_moe_forward(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer_name: str) -> torch.Tensor:
    from vllm.forward_context import get_forward_context

    layer = get_forward_context().no_compile_layers[layer_name]
    return layer.moe.forward(hidden_states, router_logits)


def _daop_moe_forward_fake(hidden_states: torch.Tensor, router_logits: torch.Tensor, layer_name: str) -> torch.Tensor:
    return torch.empty_like(hidden_states)


def register_daop_op() -> None:
    """Define `torch.ops.vllm.daop_moe_forward` once per process."""
    if hasattr(torch.ops.vllm, "daop_moe_forward"):
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op(
        op_name="daop_moe_forward",
        op_func=_daop_moe_forward,
        mutates_args=[],
        fake_impl=_daop_moe_forward_fake,
    )


def _factory_defaults() -> dict[str, Any]:
    from vllm.model_executor.layers.fused_moe import FusedMoEFactory

    return {
        name: p.default
        for name, p in inspect.signature(FusedMoEFactory).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


# FusedMoEFactory arguments the DAOP layer honours; any other argument must keep its default.
_HANDLED = {"num_experts", "top_k", "hidden_size", "intermediate_size", "params_dtype", "renormalize", "prefix", "ckpt_names",
            "shared_experts", "custom_routing_function", "gate", "use_grouped_topk", "num_expert_group", "topk_group",
            "scoring_func", "routed_scaling_factor", "e_score_correction_bias", "apply_routed_scale_to_output",
            "router_logits_dtype", "quant_config", "tp_size"}
# Arguments whose value does not change what the layer computes (the other kinds of parallelism,
# and quantization other than FP8 blocks, are refused before the model is built:
# loader.check_engine_config)
_IGNORED = {"dp_size", "pcp_size", "shared_expert_prefix"}


def _routing(kwargs: dict[str, Any], dtype: torch.dtype) -> tuple[RoutingFunction, float]:
    """The family's routing function, and the factor on its shared experts' output.

    vLLM scales routed outputs by `routed_scaling_factor` (DeepSeek-V2: 16) in the routing
    weights, except in fp16 with shared experts, where it divides the shared output instead (and
    DeepSeek's decoder layer divides the residual) to stay within fp16's range."""
    top_k, renormalize = kwargs["top_k"], kwargs.get("renormalize", True)
    scale = kwargs.get("routed_scaling_factor", 1.0)
    scale_shared = (kwargs.get("apply_routed_scale_to_output") and dtype == torch.float16
                    and kwargs.get("shared_experts") is not None)
    weight_scale, shared_output_scale = (1.0, 1.0 / scale) if scale_shared else (scale, 1.0)
    if kwargs.get("use_grouped_topk"):
        from vllm.model_executor.layers.fused_moe.router.grouped_topk_router import (
            grouped_topk,
        )

        groups, kept, scoring = kwargs["num_expert_group"], kwargs["topk_group"], kwargs.get("scoring_func", "softmax")
        function = functools.partial(grouped_topk, num_expert_group=groups, topk_group=kept, scoring_func=scoring,
                                     routed_scaling_factor=weight_scale,
                                     e_score_correction_bias=kwargs.get("e_score_correction_bias"))
        name = f"grouped {scoring} ({kept} of {groups} groups)"
        return CustomRouting(function, top_k, renormalize, name, scoring), shared_output_scale
    if weight_scale != 1.0 or kwargs.get("scoring_func", "softmax") != "softmax":
        raise DaopConfigError(
            f"this model's MoE layers route with scoring_func={kwargs.get('scoring_func')!r} and "
            f"routed_scaling_factor={scale} without grouped top-k, which load_format 'daop' does not support yet"
        )
    if kwargs.get("custom_routing_function") is not None:
        return CustomRouting(kwargs["custom_routing_function"], top_k, renormalize), shared_output_scale
    return SoftmaxTopK(top_k, renormalize), shared_output_scale


def expert_checkpoint_format(quant_config: Any, prefix: str) -> str:
    """How the checkpoint holds the experts of the layer at `prefix`: "fp8" (blocks of 128 x 128)
    under an FP8 checkpoint that does not skip the layer, else "bf16" (the model's dtype). Other
    quantization is refused before the model is built (loader.check_quantization)."""
    if quant_config is None or quant_config.get_name() != "fp8":
        return "bf16"
    from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

    skipped = is_layer_skipped(prefix=prefix, ignored_layers=quant_config.ignored_layers,
                               fused_mapping=quant_config.packed_modules_mapping,
                               match_mode=quant_config.ignored_layers_match_mode)
    return "bf16" if skipped else "fp8"


def _is_default(value: Any, default: Any) -> bool:
    return value is default or (not isinstance(value, torch.Tensor) and value == default)


def _make_factory(engine: DaopEngine, vllm_config: Any):
    defaults = _factory_defaults()

    def daop_moe_factory(**kwargs: Any) -> DaopMoELayer:
        for name, value in kwargs.items():
            if name not in _HANDLED | _IGNORED and not _is_default(value, defaults.get(name)):
                raise DaopConfigError(
                    f"this model's MoE layers use {name}={value!r}, which load_format 'daop' does not support yet"
                )
        ranks = engine.tensor_parallel  # every rank holds its shard of each expert's intermediate size
        if kwargs.get("tp_size") not in (None, ranks.size):
            raise DaopConfigError(f"this model's MoE layers split their experts over tp_size={kwargs['tp_size']} ranks "
                                  f"and the engine runs {ranks.size}; load_format 'daop' splits them over all of them")
        dtype = kwargs.get("params_dtype") or torch.get_default_dtype()
        route, shared_output_scale = _routing(kwargs, dtype)
        prefix = kwargs["prefix"]
        moe = engine.add_layer(kwargs["num_experts"], kwargs["hidden_size"], kwargs["intermediate_size"] // ranks.size,
                               dtype, route, expert_checkpoint_format(kwargs.get("quant_config"), prefix))
        layer = DaopMoELayer(moe, prefix, kwargs.get("ckpt_names", defaults["ckpt_names"]), kwargs.get("shared_experts"),
                             kwargs.get("gate"), shared_output_scale, ranks)
        forward_context = vllm_config.compilation_config.static_forward_context
        if prefix in forward_context:
            raise ValueError(f"duplicate layer name {prefix!r}")
        forward_context[prefix] = layer
        return layer

    return daop_moe_factory


@contextlib.contextmanager
def daop_moe_layers(family: MoEFamily, engine: DaopEngine, vllm_config: Any) -> Iterator[None]:
    """While active, the family's model module builds DAOP layers instead of MoE runners.
    Scoped so that other models in the same process are unaffected."""
    register_daop_op()
    module = importlib.import_module(family.model_module)
    original = getattr(module, "FusedMoEFactory", None)
    if original is None:
        raise RuntimeError(f"{family.model_module} has no FusedMoEFactory: this vLLM version is not supported")
    module.FusedMoEFactory = _make_factory(engine, vllm_config)
    try:
        yield
    finally:
        module.FusedMoEFactory = original

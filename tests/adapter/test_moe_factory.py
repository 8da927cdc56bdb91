"""The DAOP MoE factory refuses what it would compute differently, in one line."""

import pytest
import torch

from daop_vllm.core.engine import DaopEngine
from daop_vllm.core.errors import DaopConfigError
from daop_vllm.core.ranks import TensorParallelRank


def test_experts_split_over_other_than_every_rank_are_refused():
    from daop_vllm.vllm_adapter.moe_layer import _make_factory

    engine = DaopEngine(torch.device("cpu"), cpu_threads=1, tensor_parallel=TensorParallelRank(0, 2, 2))
    try:
        factory = _make_factory(engine, vllm_config=None)
        with pytest.raises(DaopConfigError, match=r"tp_size=1 ranks and the engine runs 2"):
            factory(num_experts=8, top_k=2, hidden_size=64, intermediate_size=128, prefix="layers.0.experts",
                    tp_size=1)
        assert engine.layers == [], "refused before any layer was added"
    finally:
        engine.close()

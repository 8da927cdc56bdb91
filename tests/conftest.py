import os

import pytest

# vLLM engines in tests run in-process (faster to start, and one process to inspect), offline.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> str:
    from daop_vllm.cli.model_builder import build_tiny_mixtral

    return str(build_tiny_mixtral(tmp_path_factory.mktemp("tiny-mixtral")))


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> str:
    """The trained model's tiny recipe (about 25 s of training), shared by the tests that need
    a model whose router and experts were trained."""
    from daop_vllm.cli.trained_model import build_trained_model

    return str(build_trained_model("shakespeare-moe-tiny", tmp_path_factory.mktemp("trained"), progress=False))

from pathlib import Path

import pytest

from .engines import MAX_TOKENS, close_llm, greedy_ids, make_llm


@pytest.fixture(scope="session")
def stock_ids(tiny_mixtral) -> list[list[int]]:
    """Stock vLLM's greedy tokens for engines.PROMPTS: what exact DAOP must reproduce."""
    llm = make_llm(tiny_mixtral, enforce_eager=True)
    ids = greedy_ids(llm)
    close_llm(llm)
    assert len(ids) >= 8 and all(len(i) == MAX_TOKENS for i in ids)
    return ids


def pytest_collection_modifyitems(items) -> None:
    """Every test here starts or configures real vLLM: marked `vllm` (`make test-fast` leaves them out)."""
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.vllm)

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

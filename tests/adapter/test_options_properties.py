"""Property-based: every input to the option parser either parses or raises the project's
configuration error with one line naming what was wrong - never anything else."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from daop_vllm.core.errors import DaopConfigError
from daop_vllm.vllm_adapter.options import ACCEPTED_KEYS, DaopOptions

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
keys = st.sampled_from(ACCEPTED_KEYS) | st.text(max_size=20)


def parses_or_says_why(raw) -> None:
    try:
        options = DaopOptions.parse(raw)
        options.check_model(num_layers=4, num_experts=8)
    except DaopConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(options, DaopOptions)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(keys, json_values, max_size=4))
def test_any_dict(raw):
    parses_or_says_why(raw)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40) | json_values.map(json.dumps))
def test_any_text(raw):
    parses_or_says_why(raw)


@settings(max_examples=100, deadline=None)
@given(json_values)
def test_any_value(raw):
    parses_or_says_why(raw)

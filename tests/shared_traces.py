"""Access to the public routing traces in ../shared/traces (evaluation data, never copied here)."""

from pathlib import Path

import pytest

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"


def trace_path(name: str) -> Path:
    path = TRACES / name
    if not path.exists():
        pytest.skip(f"routing trace {path} is absent (../shared/traces is optional data)")
    return path

"""The optional C extension with the CPU expert kernels (csrc/cpu_experts.c)."""

from __future__ import annotations

from types import ModuleType

import torch

# dtype -> the extension's dtype code
NATIVE_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def native_kernels() -> ModuleType | None:
    """The extension module, or None where it was not built (no C compiler at install)."""
    try:
        from daop_vllm import _cpu_experts
    except ImportError:
        return None
    return _cpu_experts

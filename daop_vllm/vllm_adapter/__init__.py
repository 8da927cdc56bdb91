"""The thin layer that binds the core engine to vLLM 0.32. vLLM internals are touched only
in this package."""

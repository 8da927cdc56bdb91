"""daop-vllm: DAOP expert offloading for Mixture-of-Experts models in vLLM."""

__version__ = "0.1.0"

"""Benchmarks behind `daop-vllm bench`."""

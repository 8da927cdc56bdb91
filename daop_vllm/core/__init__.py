"""The DAOP core engine: expert store, device cache and placement, CPU executor, the MoE
forward and counters. Imports torch only, never vLLM."""

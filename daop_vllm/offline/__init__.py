"""Offline tools, apart from the serving engine: routing traces read and analysed, the
simulator (which runs the engine's own policy code from `core`), and MoE model shapes."""

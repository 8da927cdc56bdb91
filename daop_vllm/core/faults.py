"""Faults DAOP recovers from inside a step (vLLM's engine dies on any exception in a model
step): counted in `faults_recovered`, logged once per process."""

from __future__ import annotations

import logging

# A child of vLLM's logger, so the line reaches vLLM's log handlers where vLLM runs.
logger = logging.getLogger("vllm.daop")
_logged = False


def log_fault_once(message: str) -> None:
    global _logged
    if not _logged:
        _logged = True
        logger.warning("%s", message)

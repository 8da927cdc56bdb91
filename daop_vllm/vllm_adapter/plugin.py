"""vLLM plugin entry point (`vllm.general_plugins`): registers the `daop` load format and
checks DAOP options in the front-end process, before the engine starts.

`register()` runs in every vLLM process (front end, engine core, workers): it is idempotent,
cheap and makes no CUDA calls.
"""

from __future__ import annotations

import functools

SUPPORTED_VLLM = "0.32."
WORKER_EXTENSION = "daop_vllm.vllm_adapter.worker_extension.DaopWorkerExtension"
_registered = False


def vllm_version_problem() -> str | None:
    import vllm

    if not vllm.__version__.startswith(SUPPORTED_VLLM):
        return f"daop-vllm supports vLLM {SUPPORTED_VLLM}x, found {vllm.__version__}"
    return None


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    problem = vllm_version_problem()
    if problem is not None:
        from vllm.logger import init_logger

        init_logger(__name__).warning("%s; the 'daop' load format is not registered", problem)
        return
    from vllm.model_executor.model_loader import register_model_loader

    from daop_vllm.vllm_adapter.loader import DaopModelLoader

    register_model_loader("daop")(DaopModelLoader)
    _check_options_before_engine_start()


def _check_options_before_engine_start() -> None:
    """Wrap `EngineArgs.create_engine_config` so that bad DAOP options fail in the caller's
    process with DaopConfigError, not later in a worker as "EngineCore failed to start"."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_daop_checked", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        if self.load_format != "daop":
            return original(self, *args, **kwargs)
        from daop_vllm.core.options import DaopOptions
        from daop_vllm.vllm_adapter.loader import check_engine_config

        options = DaopOptions.parse(self.model_loader_extra_config)
        vllm_config = original(self, *args, **kwargs)
        check_engine_config(options, vllm_config)
        _install_worker_extension(vllm_config)
        return vllm_config

    create_engine_config._daop_checked = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config


def _install_worker_extension(vllm_config) -> None:
    """Give the workers DAOP's `collective_rpc` methods, unless the user set an extension."""
    from vllm.logger import init_logger

    parallel = vllm_config.parallel_config
    if not parallel.worker_extension_cls:
        parallel.worker_extension_cls = WORKER_EXTENSION
    elif parallel.worker_extension_cls != WORKER_EXTENSION:
        init_logger("vllm.daop").warning(
            "worker_extension_cls=%s is set, so the daop_* collective_rpc methods are not available",
            parallel.worker_extension_cls,
        )

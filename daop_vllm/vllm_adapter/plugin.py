"""vLLM plugin entry point (`vllm.general_plugins`): registers the `daop` load format and
checks DAOP options in the front-end process, before the engine starts.

`register()` runs in every vLLM process (front end, engine core, workers): it is idempotent,
cheap and makes no CUDA calls. The rest of the package is imported inside the functions, where
it is needed: this module is imported at every vLLM start-up, before vLLM itself is ready.
"""

from __future__ import annotations

import functools
import sys

SUPPORTED_VLLM = "0.32."
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
    from daop_vllm.vllm_adapter.runner_hooks import install_runner_hooks

    register_model_loader("daop")(DaopModelLoader)
    install_runner_hooks()
    _check_options_before_engine_start()
    _close_engines_on_worker_shutdown()
    _one_line_errors_in_vllm_cli()


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
        from daop_vllm.vllm_adapter.loader import check_engine_config, prefer_piecewise_cuda_graphs, split_at_daop_op
        from daop_vllm.vllm_adapter.options import DaopOptions

        options = DaopOptions.parse(self.model_loader_extra_config)
        _use_v1_model_runner()
        _serve_metrics(self, options)
        prefer_piecewise_cuda_graphs(self.compilation_config, self.enforce_eager)
        vllm_config = original(self, *args, **kwargs)
        split_at_daop_op(vllm_config.compilation_config)
        check_engine_config(options, vllm_config)
        _install_worker_extension(vllm_config)
        return vllm_config

    create_engine_config._daop_checked = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config


def _serve_metrics(engine_args, options) -> None:
    """`daop_*` metrics on this process's Prometheus registry (vLLM's /metrics), read from the
    stats file the worker writes; without a `stats_path` option, a temporary one is given, in a
    directory removed when this process exits."""
    import atexit
    import json
    import shutil
    import tempfile
    from pathlib import Path

    from daop_vllm.vllm_adapter.metrics import expose_metrics

    stats_path = options.stats_path
    if stats_path is None:
        raw = engine_args.model_loader_extra_config
        extra = dict(json.loads(raw) if isinstance(raw, str) and raw else raw or {})
        directory = tempfile.mkdtemp(prefix="daop-metrics-")
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        stats_path = extra["stats_path"] = str(Path(directory) / "stats.json")
        engine_args.model_loader_extra_config = extra
    expose_metrics(stats_path)


def _install_worker_extension(vllm_config) -> None:
    """Give the workers DAOP's `collective_rpc` methods, unless the user set an extension."""
    from vllm.logger import init_logger

    from daop_vllm.vllm_adapter.worker_extension import WORKER_EXTENSION

    parallel = vllm_config.parallel_config
    if not parallel.worker_extension_cls:
        parallel.worker_extension_cls = WORKER_EXTENSION
    elif parallel.worker_extension_cls != WORKER_EXTENSION:
        init_logger("vllm.daop").warning(
            "worker_extension_cls=%s is set, so the daop_* collective_rpc methods are not available",
            parallel.worker_extension_cls,
        )


def _close_engines_on_worker_shutdown() -> None:
    """When vLLM shuts a worker down, close its DAOP engine: last stats write, CPU threads stop."""
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    original = WorkerWrapperBase.shutdown
    if getattr(original, "_daop_closes", False):
        return

    @functools.wraps(original)
    def shutdown(self) -> None:
        from daop_vllm.vllm_adapter.runner_hooks import engine_of_runner

        engine = engine_of_runner(getattr(self.worker, "model_runner", None))
        if engine is not None:
            engine.close()
        original(self)

    shutdown._daop_closes = True  # type: ignore[attr-defined]
    WorkerWrapperBase.shutdown = shutdown


def _one_line_errors_in_vllm_cli() -> None:
    """`vllm serve` with bad DAOP options: one line on stderr and exit status 2, no traceback.
    Only in the `vllm` command's own process (the serve module is loaded there, before plugins)."""
    serve = sys.modules.get("vllm.entrypoints.cli.serve")
    if serve is None or getattr(serve.ServeSubcommand.cmd, "_daop_one_line", False):
        return
    original = serve.ServeSubcommand.cmd

    def cmd(args) -> None:
        from daop_vllm.core.errors import DaopConfigError
        from daop_vllm.vllm_adapter.options import DaopOptions

        try:
            if getattr(args, "load_format", None) == "daop":
                DaopOptions.parse(args.model_loader_extra_config)
            original(args)
        except DaopConfigError as exc:
            print(f"vllm serve: error: {exc}", file=sys.stderr)
            sys.exit(2)

    cmd._daop_one_line = True  # type: ignore[attr-defined]
    serve.ServeSubcommand.cmd = staticmethod(cmd)


def _use_v1_model_runner() -> None:
    """DAOP's per-step hooks live on the V1 model runner, the one vLLM uses on CPU; the V2
    runner (CUDA's default) cannot run without Triton, so hooks on it could not be tested.
    Set before the engine builds its runner; worker processes inherit the variable."""
    import os

    from vllm.platforms import current_platform

    if current_platform.is_cuda_alike() and os.environ.get("VLLM_USE_V2_MODEL_RUNNER") != "0":
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        from vllm.logger import init_logger

        init_logger("vllm.daop").info("daop: VLLM_USE_V2_MODEL_RUNNER=0 (DAOP hooks the V1 model runner)")

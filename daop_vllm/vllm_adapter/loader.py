"""The `daop` load format: builds the model with DAOP MoE layers, loads the stock
checkpoint (experts into host memory), then fills each layer's device slots."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from vllm.config import CompilationConfig, CUDAGraphMode, ModelConfig, ParallelConfig, VllmConfig
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader import DefaultModelLoader
from vllm.model_executor.model_loader.base_loader import BaseModelLoader
from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype

from daop_vllm.core.cpu_executor import default_cpu_threads
from daop_vllm.core.device_budget import (
    DEFAULT_KV_RESERVE_TOKENS,
    AutoBudget,
    DeviceMemory,
    KvReserve,
    activation_peak_bytes,
)
from daop_vllm.core.engine import DaopEngine
from daop_vllm.core.errors import DaopConfigError
from daop_vllm.core.hardware import load_hardware, measure_hardware
from daop_vllm.core.placement import load_profile, plan_for_budget
from daop_vllm.core.quantized_experts import FP8_BLOCK
from daop_vllm.core.realloc import AUTO_INTERVAL_STEPS
from daop_vllm.core.staging import BANKS
from daop_vllm.core.stats_file import rank_stats_path
from daop_vllm.vllm_adapter.cpu_fused_experts import (
    cpu_fused_experts,
    kernel_isa,
    prepacked_bytes,
)
from daop_vllm.vllm_adapter.cuda_fused_experts import fp8_device_forward
from daop_vllm.vllm_adapter.families import MoEFamily, family_for
from daop_vllm.vllm_adapter.moe_layer import daop_moe_layers, release_loaded_experts, set_routers
from daop_vllm.vllm_adapter.options import DaopOptions
from daop_vllm.vllm_adapter.tensor_parallel import (
    agreed_hardware,
    agreed_minimum,
    rank_cpu_cores,
    this_rank,
)
from daop_vllm.vllm_adapter.worker_extension import WORKER_EXTENSION

logger = init_logger("vllm.daop")


def model_family(model_config: ModelConfig) -> MoEFamily:
    return family_for(list(model_config.architectures or []), model_config.hf_text_config)


def check_engine_config(options: DaopOptions, vllm_config: VllmConfig) -> None:
    """Every check that needs the model's config; raises DaopConfigError. Runs in the
    front-end process before the engine starts, and again in the worker."""
    model_config = vllm_config.model_config
    family = model_family(model_config)
    check_quantization(model_config, options.expert_format, options.device_expert_format)
    check_device_format(options, vllm_config.device_config.device_type)
    check_parallelism(vllm_config.parallel_config)
    num_layers, num_experts, _ = family.shape(model_config.hf_text_config)
    hidden, intermediate = family.expert_sizes(model_config.hf_text_config)
    ranks = vllm_config.parallel_config.tensor_parallel_size
    if intermediate % ranks:
        raise DaopConfigError(f"tensor_parallel_size {ranks} must divide the experts' intermediate size "
                              f"{intermediate} (each rank holds an equal shard of every expert)")
    options.check_model(num_layers, num_experts, (hidden, intermediate // ranks))
    if options.profile:
        load_profile(options.profile, num_layers, num_experts)
    compilation = vllm_config.compilation_config
    mode = compilation.cudagraph_mode
    check_cuda_graph_mode(mode.name if mode is not None else "NONE", compilation.splitting_ops)
    check_v1_model_runner(vllm_config.use_v2_model_runner)


def check_parallelism(parallel: ParallelConfig) -> None:
    """Tensor parallelism is DAOP's (each rank holds its shards of every expert); the other
    kinds of vLLM's parallelism are refused in one line naming the setting."""
    if parallel.pipeline_parallel_size != 1:
        raise DaopConfigError(
            f"load_format 'daop' runs under tensor parallelism but not pipeline parallelism: pipeline_parallel_size "
            f"must be 1, got {parallel.pipeline_parallel_size} (use tensor_parallel_size; see docs/parallelism.md)")
    if parallel.data_parallel_size != 1:
        raise DaopConfigError(
            f"load_format 'daop' does not run data-parallel engines (each would hold every expert in host memory; "
            f"no host store is shared between them): data_parallel_size must be 1, got "
            f"{parallel.data_parallel_size}; use tensor_parallel_size")
    if parallel.enable_expert_parallel:
        raise DaopConfigError(
            "load_format 'daop' places the experts itself, every expert sharded over the tensor-parallel ranks: "
            "enable_expert_parallel must be off")


def check_v1_model_runner(uses_v2: bool) -> None:
    """DAOP learns each step's requests from hooks on vLLM's V1 model runner: under the V2 one
    it would run without them (no predictions, no re-allocation, no phase counters). The plugin
    asks for V1 (VLLM_USE_V2_MODEL_RUNNER=0), but some settings override that (a
    watermark_config, HiSparse attention), and a worker may not have inherited the variable."""
    if uses_v2:
        raise DaopConfigError(
            "load_format 'daop' needs vLLM's V1 model runner, and this engine would use the V2 one "
            "(VLLM_USE_V2_MODEL_RUNNER=1, or a setting that requires V2 such as watermark_config); "
            "set VLLM_USE_V2_MODEL_RUNNER=0 and drop such settings"
        )


def check_quantization(model_config: ModelConfig, expert_format: str, device_expert_format: str | None = None) -> None:
    """DAOP serves unquantized checkpoints (bf16/fp16/fp32 experts, quantized at load by
    `expert_format` if asked) and FP8 ones in blocks of 128 x 128 with dynamic activation scales
    (DeepSeek-V3's and Qwen3's published format), whose experts load as fp8; vLLM keeps the rest
    of such a model. Anything else is refused in one line naming the method."""
    method = model_config.quantization
    if method is None:
        return
    checkpoint = getattr(model_config.hf_config, "quantization_config", None)
    if checkpoint is None:
        if method in ("experts_int8", "fp8"):
            fmt = method.removeprefix("experts_")
            raise DaopConfigError(f"load_format 'daop' quantizes experts itself: instead of --quantization {method}, "
                                  f"set the daop option \"expert_format\": \"{fmt}\"")
        raise DaopConfigError(f"load_format 'daop' serves unquantized and FP8 block-quantized checkpoints, and "
                              f"--quantization makes this model {method}: leave --quantization out")
    if method != "fp8":
        raise DaopConfigError(f"load_format 'daop' serves unquantized and FP8 block-quantized checkpoints, and its "
                              f"config.json's quantization_config makes this model {method}: serve a bf16, fp16, "
                              "fp32 or FP8 (blocks of 128 x 128) checkpoint")
    block = list(checkpoint.get("weight_block_size") or [])
    scheme, fmt = checkpoint.get("activation_scheme", "dynamic"), checkpoint.get("fmt", "e4m3")
    if block != [FP8_BLOCK, FP8_BLOCK] or scheme != "dynamic" or fmt != "e4m3":
        raise DaopConfigError(f"load_format 'daop' serves FP8 checkpoints with weight_block_size [{FP8_BLOCK}, "
                              f"{FP8_BLOCK}], activation_scheme 'dynamic' and fmt 'e4m3' (DeepSeek-V3's and Qwen3's); "
                              f"this one has weight_block_size {block or None}, activation_scheme {scheme!r}, fmt {fmt!r}")
    for key, value in (("expert_format", expert_format), ("device_expert_format", device_expert_format)):
        if value not in (None, "bf16", "fp8"):  # None, bf16: as loaded
            raise DaopConfigError(f"this checkpoint's experts are fp8 already: daop option {key!r} "
                                  f"{value!r} would quantize them again; leave it out")


def check_device_format(options: DaopOptions, device_type: str) -> None:
    """A device format of its own needs a device memory of its own: on a CPU-only machine the
    resident experts are the host's, in expert_format."""
    device_format = options.device_expert_format
    if device_format not in (None, options.expert_format) and device_type == "cpu":
        raise DaopConfigError(f"daop option 'device_expert_format' {device_format!r} needs a device with its own "
                              f"memory (CUDA); here device and host are one memory and every expert is stored as "
                              f"expert_format {options.expert_format!r}: drop device_expert_format")


DAOP_OP = "vllm::daop_moe_forward"


def prefer_piecewise_cuda_graphs(compilation_config: CompilationConfig, enforce_eager: bool) -> None:
    """Before vLLM fills its defaults: where the user chose no CUDA-graph mode, PIECEWISE
    (vLLM's CUDA default, FULL_AND_PIECEWISE, would capture the DAOP op's device work in a full
    graph, but not its CPU threads). No effect where the platform has no CUDA graphs (CPU)."""
    if compilation_config.cudagraph_mode is None and not enforce_eager:
        compilation_config.cudagraph_mode = CUDAGraphMode.PIECEWISE


def split_at_daop_op(compilation_config: CompilationConfig) -> None:
    """After vLLM filled its splitting ops (attention, KV-cache updates; only when the user set
    none): the DAOP op splits the graph too, so that it runs eagerly between captured pieces."""
    mode = compilation_config.cudagraph_mode
    if mode is None or not mode.has_piecewise_cudagraphs() or mode.has_full_cudagraphs():
        return
    if compilation_config.splitting_ops is None:
        compilation_config.splitting_ops = []
    if DAOP_OP not in compilation_config.splitting_ops:
        compilation_config.splitting_ops.append(DAOP_OP)


def check_cuda_graph_mode(mode: str, splitting_ops: list[str] | None) -> None:
    """Full CUDA graphs would capture the DAOP op's device work but not its CPU threads: refused.
    Piecewise graphs run it between the captured pieces, when it is one of the splitting ops."""
    if mode == "NONE" or (mode == "PIECEWISE" and DAOP_OP in (splitting_ops or [])):
        return
    if mode == "PIECEWISE":
        raise DaopConfigError(
            f"load_format 'daop' under piecewise CUDA graphs needs {DAOP_OP} among the splitting ops, and "
            f"compilation_config.splitting_ops is {splitting_ops}: add it, or leave splitting_ops unset"
        )
    raise DaopConfigError(
        f"load_format 'daop' cannot run under full CUDA graphs (cudagraph_mode {mode}): the CPU experts run "
        "outside any graph; use -cc.cudagraph_mode=PIECEWISE (daop's default: its op runs between the captured "
        "pieces), -cc.cudagraph_mode=NONE, or --enforce-eager"
    )


def vllm_settings_report(vllm_config: VllmConfig | None) -> list[str]:
    """vLLM settings DAOP set or depends on, for the startup log."""
    if vllm_config is None:
        return ["-"]
    extension = vllm_config.parallel_config.worker_extension_cls
    compilation = vllm_config.compilation_config
    return [
        "worker_extension_cls set to DAOP's (collective_rpc daop_*)" if extension == WORKER_EXTENSION
        else f"worker_extension_cls {extension or '-'} kept (daop_* RPCs unavailable)",
        f"cudagraph_mode {compilation.cudagraph_mode.name if compilation.cudagraph_mode else 'NONE'}"
        f" (daop takes NONE or PIECEWISE, {DAOP_OP} among the splitting ops; full graphs refused)",
        f"compilation mode {compilation.mode}",
        "V1 model runner (hooks for per-request state)",
    ]


class DaopModelLoader(BaseModelLoader):
    """Wraps the default loader (for reading the checkpoint) around DAOP's model building."""

    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.options = DaopOptions.parse(load_config.model_loader_extra_config)
        self._checkpoint_loader = DefaultModelLoader(
            dataclasses.replace(load_config, load_format="auto", model_loader_extra_config={})
        )
        self._vllm_config: VllmConfig | None = None

    def download_model(self, model_config: ModelConfig) -> None:
        self._checkpoint_loader.download_model(model_config)

    def create_model(self, vllm_config: VllmConfig, model_config: ModelConfig, prefix: str = "") -> nn.Module:
        # vLLM calls this under `with torch.device(<accelerator>)`; the engine names the device of
        # every tensor it makes, and the hardware measurement its own.
        check_engine_config(self.options, vllm_config)
        device = torch.device(vllm_config.device_config.device)
        rank = this_rank(vllm_config)
        cores = rank_cpu_cores(device.type, rank)
        threads = self.options.cpu_threads or default_cpu_threads(device.type, cores)
        if self.options.hardware == "auto":
            hardware = agreed_hardware(lambda: measure_hardware(device), rank)
        else:
            hardware = load_hardware(self.options.hardware)
        engine = DaopEngine(device, cpu_threads=threads, fidelity=self.options.fidelity, realloc=self.options.realloc,
                            swap_threshold=self.options.swap_threshold, hardware=hardware,
                            max_swap_bytes_per_step=self.options.max_swap_bytes_per_step,
                            budget_asked=self.options.budget_asked, fail_every=self.options.test_cpu_fault_every,
                            stream=self.options.stream, tensor_parallel=rank, cpu_cores=cores)
        with daop_moe_layers(model_family(model_config), engine, vllm_config):
            model = super().create_model(vllm_config, model_config, prefix)
        model.daop_engine = engine
        self._vllm_config = vllm_config
        return model

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        self._checkpoint_loader.load_weights(model, model_config)
        engine: DaopEngine = model.daop_engine
        set_routers(model, engine, model_family(model_config))
        formats = (self.options.expert_format, self.options.device_expert_format or self.options.expert_format)
        if engine.expert_format == "bf16" and formats != ("bf16", "bf16"):  # as loaded, fp8 checkpoints too
            engine.quantize_experts(*formats)
            release_loaded_experts(model)
        engine.staging_slots = self.options.staging_slots or engine.layers[0].route.top_k
        engine.place(
            plan_for_budget(self.options.budget, len(engine.layers), engine.num_experts, engine.expert_bytes,
                            self._auto_bytes(engine), self._profile(engine))
        )
        # vLLM's op takes the loaded dtype; injected faults are the executor's: keep it then
        if self.options.test_cpu_fault_every is None and engine.expert_format == "bf16":
            extra = sum(prepacked_bytes(layer.store) for layer in engine.layers)
            engine.use_experts_call(
                cpu_fused_experts,
                f"vLLM's CPU fused-MoE op ({kernel_isa(engine.layers[0].store.w13.dtype)}), every expert in one call "
                f"(device and host are one memory), on a prepacked copy of the experts: +{extra / 2**30:.2f} GiB")
        if engine.device.type == "cuda" and engine.device_expert_format == "fp8":
            forward, description = fp8_device_forward(engine.device)
            if forward is not None:
                engine.use_device_forward(forward, description)
            else:
                engine.device_path += f" (not vLLM's FP8 MoE method: {description})"
        if self.options.stats_path:
            engine.write_stats_to(str(rank_stats_path(self.options.stats_path, engine.tensor_parallel.rank)))
        if self.options.trace_path and engine.tensor_parallel.rank == 0:  # every rank routes alike
            engine.record_traces_to(self.options.trace_path, model=model_config.model)
        logger.info("%s", self._startup_report(engine))

    def _profile(self, engine: DaopEngine):
        if not self.options.profile:
            return None
        return load_profile(self.options.profile, len(engine.layers), engine.num_experts)

    def _startup_report(self, engine: DaopEngine) -> str:
        report = engine.report()
        budget = report["budget"]
        asked = ", ".join(f"{k}={v}" for k, v in self.options.budget_asked.items()) or (
            "auto (all experts that fit in device memory)"
        )
        if self.options.kv_reserve_tokens:
            asked += f", kv_reserve_tokens={self.options.kv_reserve_tokens}" + (
                "" if engine.device.type == "cuda" else " (no effect here: device and host share one memory)")
        lines = [
            "daop: load format ready",
            f"  mode:          {self._mode_report(engine)}",
            f"  budget asked:  {asked}",
            f"  budget chosen: {budget['resident_experts']} of {budget['total_experts']} experts resident "
            f"({100.0 * budget['resident_experts'] / budget['total_experts']:.1f}%), "
            f"slots per layer {budget['slots_per_layer']}",
            *(f"  layer {i:3d} resident: {layer['resident']}" for i, layer in enumerate(report["layers"])),
            f"  device path:   {engine.device_path}",
            f"  CPU executor:  {engine.executor.num_threads} threads{self._threads_reason(engine)}, "
            f"{engine.executor.kernel_name}",
            f"  host experts:  {report['host_expert_bytes'] / 2**30:.2f} GiB"
            f"{' pinned' if report['host_expert_bytes_pinned'] else ''}, {self._format_report(engine)}",
            *([f"  tensor parallel: {self._tensor_parallel_report(engine, report)}"]
              if engine.tensor_parallel.size > 1 else []),
            f"  realloc:       {self._realloc_report(engine)}",
            f"  stream:        {self._stream_report(engine)}",
            f"  stats_path:    {self.options.stats_path or '-'}{self._final_write_note()}",
            *([f"  TEST ONLY:     every {self.options.test_cpu_fault_every}th CPU expert job fails "
               "(test_cpu_fault_every)"] if self.options.test_cpu_fault_every else []),
            f"  trace_path:    {self.options.trace_path or '-'}",
            f"  vLLM settings: {'; '.join(vllm_settings_report(self._vllm_config))}",
        ]
        return "\n".join(lines)

    def _format_report(self, engine: DaopEngine) -> str:
        if engine.expert_format == "bf16" and engine.device_expert_format == "bf16":
            return "as loaded (expert_format bf16)"
        store = engine.layers[0].store
        if self.options.expert_format != engine.expert_format:
            return (f"{engine.expert_format} as the checkpoint holds them, blocks of {FP8_BLOCK} x {FP8_BLOCK} with a "
                    f"scale each ({store.expert_bytes / 2**20:.1f} MiB an expert); activations "
                    f"{str(store.dtype).removeprefix('torch.')}")
        weights = store.w13.shape[1] * store.w13.shape[2] + store.w2.shape[1] * store.w2.shape[2]
        loaded = weights * store.dtype.itemsize
        if engine.device.type != "cuda":
            where = "the resident ones are the same host experts (one memory)"
        elif engine.device_expert_format == engine.expert_format:
            where = "the device's slots hold them so too, dequantised in the Triton kernel"
        else:
            where = (f"the device's slots hold {engine.device_expert_format} "
                     f"({store.device_expert_bytes / 2**20:.1f} MiB an expert, every expert kept so in host memory "
                     f"too for re-allocation's copies)")
        host = "as loaded (bf16)" if engine.expert_format == "bf16" else (
            f"{engine.expert_format}, quantized at load ({store.expert_bytes / 2**20:.1f} MiB an expert where "
            f"{str(store.dtype).removeprefix('torch.')} took {loaded / 2**20:.1f})")
        return f"{host}; {where}"

    def _final_write_note(self) -> str:
        """vLLM's --shutdown-timeout 0 (its default) kills the engine processes as soon as shutdown
        starts: no last stats write then."""
        if not self.options.stats_path or getattr(self._vllm_config, "shutdown_timeout", 0):
            return ""
        return (" (rewritten every second; its final write at shutdown needs --shutdown-timeout > 0: "
                "with 0 vLLM kills the engine at once)")

    @staticmethod
    def _tensor_parallel_report(engine: DaopEngine, report: dict) -> str:
        ranks, shard = engine.tensor_parallel, engine.layers[0].store.w2.shape[2]
        host = report["host_expert_bytes"]
        return (f"rank {ranks.rank} of {ranks.size} ({ranks.local_ranks} on this machine); every expert's intermediate "
                f"size {shard * ranks.size} split in {ranks.size}, {shard} here; host experts {host / 2**30:.2f} GiB "
                f"here, {ranks.size * host / 2**30:.2f} GiB over the ranks; CPU executor pinned to CPUs "
                f"{list(engine.executor.cores)}; placement and re-allocation alike on every rank (replicated routing)")

    def _threads_reason(self, engine: DaopEngine) -> str:
        if self.options.cpu_threads:
            return " (cpu_threads)"
        if engine.tensor_parallel.size > 1:
            launches = ", less one for the GPU's launches" if engine.device.type == "cuda" else ""
            return f" (the physical cores of this rank's CPUs, the machine's split over its ranks{launches})"
        if engine.device.type == "cuda":
            return " (physical cores - 1: one is left to the thread that launches the GPU's work)"
        return " (physical cores)"

    @staticmethod
    def _realloc_report(engine: DaopEngine) -> str:
        if engine.realloc == "off":
            return "off (placement stays as loaded)"
        cap = engine.max_swap_bytes_per_step
        copies = (f"copies on a side stream, at most {cap / 2**20:.0f} MiB started per step"
                  if engine.device.type == "cuda" else "device and host share memory: a swap flips the slot table")
        if engine.realloc == "paper":
            return f"paper (after each prompt, swap_threshold {engine.swap_threshold}); {copies}"
        hw = engine.hardware
        return (f"auto (demand of the requests in flight, every {AUTO_INTERVAL_STEPS} steps and after each prompt; "
                f"cost model {hw.name}: PCIe {hw.pcie_gbps} GB/s, device {hw.device_gbps} GB/s, CPU {hw.cpu_gbps} GB/s"
                f"{' (stand-in: no PCIe on this machine)' if engine.device.type != 'cuda' else ''}); {copies}")

    @staticmethod
    def _stream_report(engine: DaopEngine) -> str:
        if engine.stream == "off":
            return "off (every host expert on the CPU)"
        what = {"auto": "each host expert of a step on the CPU or copied to the device, whichever ends the layer "
                        "sooner (cost model above)",
                "all": "every host expert of a step copied to the device and run there"}[engine.stream]
        if engine.device.type != "cuda":
            where = ("device and host are one memory: nothing to copy, so nothing streams" if engine.stream == "auto"
                     else "device and host are one memory: its bookkeeping only (counted, nothing copied)")
        else:
            early = ", decode experts staged a layer early from the prediction" if engine.stream == "auto" else ""
            where = (f"{engine.staging_slots} staging slots in each of {BANKS} banks shared by the layers{early}, "
                     f"{engine.staging.nbytes / 2**30:.2f} GiB (untested on a GPU)")
        return f"{engine.stream}: {what}; {where}"

    @staticmethod
    def _mode_report(engine: DaopEngine) -> str:
        if engine.mode == "exact":
            return "exact (own router, CPU experts on their true input)"
        tolerance = engine.fidelity.staleness_tolerance
        return (f"{engine.mode}, first_predicted_layer {engine.first_predicted_layer}, degrade "
                f"{'on' if engine.fidelity.degrades else 'off'}, staleness_tolerance "
                f"{'off' if tolerance is None else tolerance}; the next layer's CPU experts run in the "
                "executor's threads while the device works (the DAOP op is opaque to torch.compile)")

    def _auto_bytes(self, engine: DaopEngine) -> int | None:
        """Device bytes left for experts in auto mode; None where device and host share memory."""
        if engine.device.type != "cuda" or self._vllm_config is None:
            return None
        budget = auto_budget(self._vllm_config, self.options.kv_reserve_tokens, engine.device)
        logger.info("daop: auto budget: %s", budget.explain())
        staging = BANKS * engine.staging_slots * engine.expert_bytes if engine.stream != "off" else 0
        if staging:
            logger.info("daop: auto budget: %.2f GiB of it for %d x %d staging slots", staging / 2**30, BANKS,
                        engine.staging_slots)
        return agreed_minimum(max(0, budget.expert_bytes - staging), engine.tensor_parallel)


def kv_bytes_per_token(vllm_config: VllmConfig) -> int:
    """KV cache bytes one token takes over all layers, in the cache's dtype."""
    text = vllm_config.model_config.hf_text_config
    element = kv_cache_dtype_str_to_dtype(vllm_config.cache_config.cache_dtype, vllm_config.model_config).itemsize
    if getattr(text, "kv_lora_rank", None):  # MLA (DeepSeek-V2/V3) caches one latent per token and layer
        return text.num_hidden_layers * (text.kv_lora_rank + text.qk_rope_head_dim) * element
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * element


def auto_budget(vllm_config: VllmConfig, kv_reserve_tokens: int | None, device: torch.device) -> AutoBudget:
    """The auto budget from vLLM's settings and the device's free memory, measured after the
    allocator's cache is returned (the checkpoint's staging buffers would count as used)."""
    model, scheduler, cache = vllm_config.model_config, vllm_config.scheduler_config, vllm_config.cache_config
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    memory = DeviceMemory(free, total, cache.gpu_memory_utilization)
    tokens = kv_reserve_tokens or min(model.max_model_len, DEFAULT_KV_RESERVE_TOKENS)
    kv = KvReserve(scheduler.max_num_seqs, tokens, kv_bytes_per_token(vllm_config), model.max_model_len,
                   explicit_bytes=cache.kv_cache_memory_bytes or None)
    text = model.hf_text_config
    activations = activation_peak_bytes(scheduler.max_num_batched_tokens, text.hidden_size, model.dtype.itemsize,
                                        scheduler.max_num_seqs, model.get_vocab_size())
    return AutoBudget.compute(memory, kv, activations)

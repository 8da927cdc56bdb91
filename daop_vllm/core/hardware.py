"""What moving and computing experts costs on a machine: presets, a JSON file, or measured.

Decode is memory-bound on both sides, so one (token, expert) costs about an expert's bytes over
the memory bandwidth of the side that computes it, and a swap costs an expert's bytes over PCIe.
The `realloc="auto"` policy and the simulator weigh swaps with these figures.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from daop_vllm.core.errors import DaopConfigError


@dataclass(frozen=True)
class Hardware:
    name: str
    pcie_gbps: float  # host -> device copies from pinned memory
    device_gbps: float  # the accelerator's memory bandwidth
    cpu_gbps: float  # the CPU's streaming read rate (all cores)
    device_tflops: float = 100.0  # dense bf16 matmul rate (prefill-sized expert work)
    cpu_tflops: float = 1.0
    # GPU-to-GPU all-reduce rate under tensor parallelism (the simulator's --tensor-parallel); the
    # default is PCIe peer-to-peer (PCIe 4.0 x16 at ~80%), so JSON files without it keep working
    interconnect_gbps: float = 25.0

    def swap_seconds(self, expert_bytes: int) -> float:
        return expert_bytes / (self.pcie_gbps * 1e9)

    def token_seconds_saved(self, expert_bytes: int, device_bytes: int | None = None) -> float:
        """Decode time saved per (token, expert) computed on the device (reading `device_bytes`,
        default the same) instead of the CPU (reading `expert_bytes`)."""
        device_bytes = expert_bytes if device_bytes is None else device_bytes
        return expert_bytes / (self.cpu_gbps * 1e9 * OUR_CPU_EFFICIENCY) - device_bytes / (self.device_gbps * 1e9)

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


# Share of the streaming read rate that decode-sized CPU expert work reaches on our development
# machine. Our executor: 0.92, the mean of its 95/89/90/93% at 1-4 tokens per Mixtral expert
# (medians of five runs, benchmarks/results/cpu_experts_mixtral_bf16_more_runs.json; 0.86 before
# #5's last round). PyTorch's bf16 `x @ w.t()` (the paper's path and Fiddler's): 0.60 as first
# measured, kept (never tuned); against today's stricter read it reaches 0.42-0.55 at 1-4 tokens.
OUR_CPU_EFFICIENCY = 0.92
# The executor's read rate on quantized experts over its rate on bf16 ones, at one token per
# Mixtral expert, in the same passes: bench cpu-experts --format bf16 int8 int4 fp8, medians of
# three runs on one machine (an AMD EPYC with AVX512-BF16 and VNNI; its speed over bf16 2.06x,
# 3.60x and 1.97x times the bytes' ratio; benchmarks/results/cpu_experts_mixtral_formats.json).
# int8 reads a little faster than bf16 there: both near the memory's rate, int8 with fewer streams.
FORMAT_READ_SHARE = {"bf16": 1.0, "int8": 1.03, "int4": 0.93, "fp8": 0.98}
TORCH_CPU_EFFICIENCY = 0.60

# Constants from published specifications, written down before any comparison (never tuned):
HARDWARE_PRESETS = {
    hw.name: hw
    for hw in (
        # The paper's machine. RTX A6000 datasheet: 768 GB/s GDDR6, 154.8 TFLOPS bf16 dense tensor.
        # PCIe 4.0 x16: 31.5 GB/s per direction, ~25 GB/s reached from pinned memory (80%).
        # i9-10980XE: 4 channels DDR4-2933 = 93.9 GB/s, streaming at ~80% = 75 GB/s; 18 cores x 2
        # AVX-512 FMA units x 32 fp32 FLOP x ~2.6 GHz (AVX-512 all-core) = 3.0 TFLOPS.
        # Cross-check (not a fit): 75 GB/s x TORCH_CPU_EFFICIENCY = 45 GB/s, i.e. 7.8 ms per Mixtral
        # expert and token, against the 8.5 ms of the paper's reference code.
        Hardware("a6000", pcie_gbps=25.0, device_gbps=768.0, cpu_gbps=75.0, device_tflops=154.8, cpu_tflops=3.0),
        # Our GPU test machine. H200 datasheet: 4.8 TB/s HBM3e, 989 TFLOPS bf16 dense. PCIe and the
        # CPU as measured there (#10, benchmarks/results/gpu_policies.json; the datasheet guesses
        # were 50 and 100 GB/s): host-to-device copies 54.3 GB/s, our executor 106 GB/s on its 16
        # cores at one token per Mixtral expert, i.e. a streaming rate of 106 / OUR_CPU_EFFICIENCY
        # = 115 GB/s. AMX bf16 ~1 TFLOPS per 16 cores (not measured). NVLink 4 (SXM): 450 GB/s per
        # direction; an all-reduce's bus rate at ~90% of it, 400 GB/s (not measured: one GPU there).
        Hardware("h200", pcie_gbps=54.0, device_gbps=4800.0, cpu_gbps=115.0, device_tflops=989.0, cpu_tflops=1.0,
                 interconnect_gbps=400.0),
    )
}
# Where device and host are one memory there is nothing to measure; the paper's machine stands in.
CPU_ONLY_STAND_IN = "a6000"


# `daop-vllm bench cpu-experts` on the development machine, committed (#5).
LOCAL_CPU_RESULT = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "cpu_experts_mixtral_bf16.json"


def local_hardware(result_path: Path = LOCAL_CPU_RESULT) -> Hardware:
    """This machine's CPU as `bench cpu-experts` measured it (streaming read, best matmul
    rate), beside the a6000 preset's GPU and PCIe (the development machine has no GPU)."""
    try:
        result = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DaopConfigError(f"hardware 'local' reads {result_path} (from `daop-vllm bench cpu-experts --out`): "
                              f"{exc}") from None
    best_gflops = max(r["torch_gflops"] for r in result["per_tokens"].values())
    gpu = HARDWARE_PRESETS["a6000"]
    return Hardware(f"local ({result['threads']} threads measured here, a6000 GPU and PCIe)", gpu.pcie_gbps,
                    gpu.device_gbps, round(result["stream_read_gbps"], 1), gpu.device_tflops,
                    round(best_gflops / 1000, 3))


def load_hardware(spec: str) -> Hardware:
    """A preset name, "local", or a JSON file with the fields of `Hardware`."""
    if spec in HARDWARE_PRESETS:
        return HARDWARE_PRESETS[spec]
    if spec == "local":
        return local_hardware()
    path = Path(spec)
    accepted = f"a preset ({', '.join(HARDWARE_PRESETS)}, local), or a JSON file with {_field_names()}"
    if not path.is_file():
        raise DaopConfigError(f"daop option 'hardware' must be {accepted}; got {spec!r}")
    try:
        raw = json.loads(path.read_text())
        hardware = Hardware(**{"name": path.stem, **raw})
        if not all(isinstance(getattr(hardware, f.name), (int, float)) and getattr(hardware, f.name) > 0
                   for f in fields(Hardware) if f.name != "name"):
            raise ValueError("bandwidths and FLOP rates must be numbers > 0")
    except (ValueError, TypeError) as exc:
        raise DaopConfigError(f"daop option 'hardware': {path} is not {accepted} ({exc})") from None
    return hardware


def _field_names() -> str:
    return ", ".join(f.name for f in fields(Hardware) if f.name != "name")


def measure_hardware(device: torch.device, nbytes: int = 256 << 20) -> Hardware:
    """Measure PCIe, device and CPU streaming rates with `nbytes` copies (median of 3). Every
    tensor names its device: vLLM's loader runs under `with torch.device(<accelerator>)`."""
    if device.type != "cuda":
        return HARDWARE_PRESETS[CPU_ONLY_STAND_IN]
    host = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=True)
    on_device = torch.empty(nbytes, dtype=torch.uint8, device=device)
    copy = torch.empty_like(on_device)

    def rate(fn, moved: int) -> float:
        times = []
        for _ in range(3):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return moved / sorted(times)[1] / 1e9

    pcie = rate(lambda: on_device.copy_(host, non_blocking=True), nbytes)
    device_rate = rate(lambda: copy.copy_(on_device), 2 * nbytes)  # a copy reads and writes
    words = host.view(torch.int64)
    start = time.perf_counter()
    for _ in range(3):
        words.sum()
    cpu = 3 * nbytes / (time.perf_counter() - start) / 1e9
    base = HARDWARE_PRESETS["h200"]  # FLOP rates are not measured here; only decode's bandwidths matter
    return Hardware(f"measured on {torch.cuda.get_device_name(device)}", round(pcie, 1), round(device_rate, 1),
                    round(cpu, 1), base.device_tflops, base.cpu_tflops)

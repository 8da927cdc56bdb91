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
    device_gbps: float  # the accelerator's memory bandwidth, as its expert kernel reaches it
    cpu_gbps: float  # the CPU executor's weight streaming rate (all its threads)

    def swap_seconds(self, expert_bytes: int) -> float:
        return expert_bytes / (self.pcie_gbps * 1e9)

    def token_seconds_saved(self, expert_bytes: int) -> float:
        """Decode time saved per (token, expert) computed on the device instead of the CPU."""
        return expert_bytes / (self.cpu_gbps * 1e9) - expert_bytes / (self.device_gbps * 1e9)

    def to_dict(self) -> dict[str, float | str]:
        return asdict(self)


HARDWARE_PRESETS = {
    hw.name: hw
    for hw in (
        # The paper's machine: RTX A6000, PCIe 4.0, i9-10980XE. CPU rate from the reference code's
        # 8.5 ms per Mixtral expert and token (352 MB).
        Hardware("a6000", pcie_gbps=25.0, device_gbps=768.0, cpu_gbps=41.0),
        # The paper's other figures (A100 40 GB: 5 ms per expert and token on its CPU).
        Hardware("a100", pcie_gbps=25.0, device_gbps=1555.0, cpu_gbps=70.0),
        # Our GPU test machine (one H200, PCIe 5.0, 16 cores): datasheet figures until measured (#10).
        Hardware("h200", pcie_gbps=55.0, device_gbps=4800.0, cpu_gbps=80.0),
    )
}
# Where device and host are one memory there is nothing to measure; the paper's machine stands in.
CPU_ONLY_STAND_IN = "a6000"


def load_hardware(spec: str) -> Hardware:
    """A preset name, or a JSON file with the fields of `Hardware`."""
    if spec in HARDWARE_PRESETS:
        return HARDWARE_PRESETS[spec]
    path = Path(spec)
    accepted = f"a preset ({', '.join(HARDWARE_PRESETS)}), \"auto\", or a JSON file with {_field_names()}"
    if not path.is_file():
        raise DaopConfigError(f"daop option 'hardware' must be {accepted}; got {spec!r}")
    try:
        raw = json.loads(path.read_text())
        hardware = Hardware(**{"name": path.stem, **raw})
        if not all(isinstance(getattr(hardware, f), (int, float)) and getattr(hardware, f) > 0
                   for f in ("pcie_gbps", "device_gbps", "cpu_gbps")):
            raise ValueError("bandwidths must be numbers > 0")
    except (ValueError, TypeError) as exc:
        raise DaopConfigError(f"daop option 'hardware': {path} is not {accepted} ({exc})") from None
    return hardware


def _field_names() -> str:
    return ", ".join(f.name for f in fields(Hardware) if f.name != "name")


def measure_hardware(device: torch.device, nbytes: int = 256 << 20) -> Hardware:
    """Measure PCIe, device and CPU streaming rates with `nbytes` copies (median of 3)."""
    if device.type != "cuda":
        return HARDWARE_PRESETS[CPU_ONLY_STAND_IN]
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
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
    return Hardware(f"measured on {torch.cuda.get_device_name(device)}", round(pcie, 1), round(device_rate, 1),
                    round(cpu, 1))

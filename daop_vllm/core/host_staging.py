"""Copies between the device and the CPU executor: a layer's input to the host, the CPU
experts' result back. On CUDA both go through pinned memory, so neither is a pageable copy
that the driver stages (and, device to host, blocks on) by itself."""

from __future__ import annotations

import torch

from daop_vllm.core.cpu_executor import CpuJob


class HostStaging:
    """One engine's staging: a pinned input buffer, reused by every layer (a layer's CPU job
    is done with its input before the layer returns), grown when a step has more rows."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self._input: torch.Tensor | None = None

    def to_host(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] on the device -> the same values on the host, ready to read."""
        if not self.pinned:
            return x.cpu()
        needed = x.numel()
        if self._input is None or self._input.dtype != x.dtype or self._input.numel() < needed:
            self._input = torch.empty(max(needed, 2 * self._input.numel() if self._input is not None else 0),
                                      dtype=x.dtype, device="cpu", pin_memory=True)
        host = self._input[:needed].view(x.shape)
        host.copy_(x, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        copied.synchronize()  # the CPU experts read it next
        return host

    def to_device(self, result: torch.Tensor, job: CpuJob | None) -> torch.Tensor:
        """The CPU result [T, H] on the device. When `result` is `job`'s (its lane's pinned
        workspace), the copy is still reading it after this returns: the lane's next job waits
        for it (CpuJob.release_after)."""
        if result.device == self.device:
            return result
        on_device = result.to(self.device, non_blocking=True)
        if self.pinned and job is not None and job.owns(result):
            copied = torch.cuda.Event()
            copied.record()
            job.release_after(copied)
        return on_device

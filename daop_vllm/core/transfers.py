"""The MoE layer's copies between the device and the host, one call each way.

A layer that has host work sends its input, routing (and, when it predicts, the prediction's
routing) to the host in one packed copy, and the CPU experts' result back in one. On CUDA both
go through pinned memory, so neither is a pageable copy that the driver stages (and, device to
host, blocks on) by itself. The calls are counted: where device and host are one memory (the
CPU) no byte moves, but the count is what the CUDA path would copy.
"""

from __future__ import annotations

import torch

from daop_vllm.core.cpu_executor import CpuJob


def _packed(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The tensors' bytes back to back (widest elements first, so that each starts aligned), and
    each tensor's (offset, bytes) in that buffer, in the order given."""
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
    spans: list[tuple[int, int]] = [(0, 0)] * len(tensors)
    offset = 0
    for i in order:
        size = tensors[i].numel() * tensors[i].element_size()
        spans[i] = (offset, size)
        offset += size
    flat = torch.cat([tensors[i].contiguous().view(-1).view(torch.uint8) for i in order])
    return flat, spans


def _unpacked(buffer: torch.Tensor, spans: list[tuple[int, int]], like: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [buffer[offset:offset + size].view(t.dtype).view(t.shape) for (offset, size), t in zip(spans, like)]


class HostTransfers:
    """One engine's transfers; `to_host_calls` and `to_device_calls` count them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        self.to_host_calls = 0
        self.to_device_calls = 0

    def to_host(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """The tensors (on the device) on the host, ready to read; one copy on CUDA. Each call
        gets buffers of its own (the caching host allocator recycles them): a prediction's
        routing lives until the next layer reads it."""
        self.to_host_calls += 1
        if not self.pinned:
            return [t.cpu() for t in tensors]
        flat, spans = _packed(tensors)
        host = torch.empty(flat.numel(), dtype=torch.uint8, device="cpu", pin_memory=True)
        host.copy_(flat, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        copied.synchronize()  # the CPU reads them next
        return _unpacked(host, spans, tensors)

    def to_device(self, *tensors: torch.Tensor, job: CpuJob | None = None) -> list[torch.Tensor]:
        """The host tensors on the device, in one copy on CUDA, queued on the current stream.
        The copy reads the host memory after this returns: where it is `job`'s result (its
        lane's pinned workspace), the lane's next job waits for it (CpuJob.release_after)."""
        self.to_device_calls += 1
        if all(t.device == self.device for t in tensors):
            return list(tensors)
        if not self.pinned:
            return [t.to(self.device) for t in tensors]
        if len(tensors) == 1 and job is not None and job.owns(tensors[0]):
            on_device = [tensors[0].to(self.device, non_blocking=True)]
        else:  # fresh pageable tensors: packed into pinned memory first
            flat, spans = _packed(tensors)
            on_device = _unpacked(flat.pin_memory().to(self.device, non_blocking=True), spans, tensors)
        if job is not None:
            copied = torch.cuda.Event()
            copied.record()
            job.release_after(copied)
        return on_device

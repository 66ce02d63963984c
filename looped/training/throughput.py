"""Training throughput you can compare: tokens/s over training steps only (not evaluation,
checkpoints or the first step, which pays compilation), and MFU: the model FLOPs at the loop
counts actually sampled (looped.training.flops) against the device's peak."""

from __future__ import annotations

import functools
import time
from typing import Optional

import torch

# Dense bf16 tensor-core peaks (FLOP/s, without sparsity), from the vendors' data sheets
GPU_BF16_PEAK = {
    "H200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # a bare "H100" name is taken to be the SXM part
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
}
CPU_PEAK_SIZE = 512  # the matmul that measures a CPU's peak: (n x n) @ (n x n), fp32, ~1 ms
CPU_PEAK_REPEATS = 3


def gpu_peak(name: str) -> Optional[float]:
    """The bf16 peak of a GPU by its device name (the longest table key it contains)."""
    hits = [k for k in GPU_BF16_PEAK if k.lower() in name.lower()]
    return GPU_BF16_PEAK[max(hits, key=len)] if hits else None


@functools.cache
def measured_cpu_peak(threads: int, n: int = CPU_PEAK_SIZE, repeats: int = CPU_PEAK_REPEATS
                      ) -> float:
    """The best FLOP/s of an fp32 matmul on this process's threads (training runs in fp32)."""
    gen = torch.Generator().manual_seed(0)  # not the global RNG, which checkpoints record
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def device_peak(device: torch.device) -> tuple[Optional[float], str]:
    """(peak FLOP/s, where it comes from); None on a GPU the table does not know."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return gpu_peak(name), f"{name} bf16 data sheet"
    threads = torch.get_num_threads()
    return measured_cpu_peak(threads), f"measured fp32 matmul on {threads} threads"


class ThroughputMeter:
    """Tokens/s and MFU over the training steps since the last `read`; a process's first step
    is left out (it pays compilation and allocator warm-up)."""

    def __init__(self, peak: Optional[float], world_size: int = 1):
        self.peak, self.world_size = peak, world_size
        self.seen_first = False
        self.seconds = self.tokens = self.flops = 0.0

    def add(self, seconds: float, tokens: int, flops: float) -> None:
        """One step: its wall time, and the global batch's tokens and model FLOPs."""
        if not self.seen_first:
            self.seen_first = True
            return
        self.seconds += seconds
        self.tokens += tokens
        self.flops += flops

    def read(self) -> tuple[Optional[float], Optional[float]]:
        """(tokens/s, MFU) since the last read; None before any step counts."""
        if self.seconds == 0:
            return None, None
        tok_s = self.tokens / self.seconds
        mfu = (None if self.peak is None else
               self.flops / self.seconds / (self.peak * self.world_size))
        self.seconds = self.tokens = self.flops = 0.0
        return tok_s, mfu

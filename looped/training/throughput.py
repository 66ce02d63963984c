"""Training throughput you can compare: tokens/s over training steps only (not evaluation,
checkpoints or the first step, which pays compilation), and MFU: the model FLOPs at the loop
counts actually sampled (looped.training.flops) against the device's peak."""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from pathlib import Path
from typing import Optional

import torch

from looped.data.tokenizers import cache_root

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
CPU_PEAK_SIZE = 1024  # the matmul that measures a CPU's peak: (n x n) @ (n x n), fp32, ~10 ms
CPU_PEAK_REPEATS = 5


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


def cpu_peak_key(threads: int) -> str:
    """What a measured CPU peak is valid for: the processor, the thread count, torch's version."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         model)
    except OSError:
        pass
    return f"{model} | {threads} threads | torch {torch.__version__}"


def peak_cache_file() -> Path:
    return cache_root() / "cpu_peak.json"


def _read_peaks(path: Path) -> dict[str, float]:
    """The peaks kept in path by key; an unreadable or malformed file keeps none."""
    try:
        seen = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(seen, dict):
        return {}
    return {k: float(v) for k, v in seen.items() if isinstance(v, (int, float))}


def cpu_peak(threads: int) -> tuple[float, str]:
    """The CPU's fp32 matmul peak on `threads` threads: the best of this process's measurement
    and every earlier one on this machine (kept in peak_cache_file()). A busy machine can only
    make a measurement slower, so the best one seen is the closest to the true peak."""
    now = measured_cpu_peak(threads)
    key, path = cpu_peak_key(threads), peak_cache_file()
    seen = _read_peaks(path)
    best = max(now, seen.get(key, 0.0))
    if now > seen.get(key, 0.0):
        try:  # the cache is a convenience: an unwritable one only costs the next run's accuracy
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({**seen, key: now}))
            os.replace(tmp, path)
        except OSError:
            pass
    where = ("this run's" if best == now else f"an earlier run's (this run's: "
             f"{now / 1e12:.3g} TFLOP/s)")
    return best, (f"measured fp32 matmul on {threads} threads, best of {CPU_PEAK_REPEATS}; "
                  f"{where} measurement, kept in {path}")


def device_peak(device: torch.device) -> tuple[Optional[float], str]:
    """(peak FLOP/s, where it comes from); None on a GPU the table does not know."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return gpu_peak(name), f"{name} bf16 data sheet"
    return cpu_peak(torch.get_num_threads())


class ThroughputMeter:
    """Tokens/s and MFU over the training steps since the last `read`; a process's first step
    is left out (it pays compilation and allocator warm-up). An MFU above 1 cannot be right: the
    peak was measured low (a busy machine at start). `read` then gives None for it and sets
    `over_peak`, so that no figure above 100 % is ever shown."""

    def __init__(self, peak: Optional[float], world_size: int = 1):
        self.peak, self.world_size = peak, world_size
        self.seen_first = False
        self.over_peak = False
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
        """(tokens/s, MFU) since the last read; None before any step counts, and MFU None
        when it would exceed 1 (over_peak then says so)."""
        if self.seconds == 0:
            return None, None
        tok_s = self.tokens / self.seconds
        mfu = (None if self.peak is None else
               self.flops / self.seconds / (self.peak * self.world_size))
        self.over_peak = mfu is not None and mfu > 1.0
        self.seconds = self.tokens = self.flops = 0.0
        return tok_s, None if self.over_peak else mfu

    def describe(self, mfu: Optional[float]) -> str:
        """The MFU part of a log line."""
        if self.over_peak:
            return "  MFU n/a (above the measured peak: it was measured on a busy machine)"
        return "" if mfu is None else f"  MFU {100 * mfu:.1f}%"

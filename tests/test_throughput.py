"""MFU's ingredients: training FLOPs at the sampled R (equal to torch's FlopCounterMode over a
forward and backward), the peak table, and a meter that counts training steps only."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import rand_ids
from looped import build_model, load_config
from looped.training.flops import forward_flops_per_token, train_flops_per_token
import json

from looped.training import throughput
from looped.training.throughput import ThroughputMeter, gpu_peak

TINY = ["loop=4", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
        "model.head_dim=16", "model.ffn_dim=64", "model.n_layers=2", "model.n_prelude=1",
        "model.n_coda=1", "model.vocab_size=32", "model.max_seq_len=64", "model.kernel=eager",
        "model.depth_attention.enabled=false", "model.injection=concat",
        "model.init_state=embed"]


@pytest.mark.parametrize("loops, grad_loops", [(3, None), (7, None), (7, 2)])
def test_training_flops_equal_the_flop_counter(loops, grad_loops):
    """At a loop count other than the model's own, with and without truncated backprop: the
    counter sees every matmul of the forward and the backward (eager attention)."""
    model = build_model(load_config(TINY))
    t = 24
    ids = rand_ids(2, t, vocab=32)
    with FlopCounterMode(display=False) as counter:
        out = model(ids, loops=loops, grad_loops=grad_loops)
        out.logits.float().square().mean().backward()
    assert train_flops_per_token(model, loops, grad_loops, context=t) * 2 * t == \
        counter.get_total_flops()
    assert train_flops_per_token(model, loops, None, t) == 3 * forward_flops_per_token(model, loops, t)


def test_peak_table_picks_the_most_specific_name():
    assert gpu_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_peak("Some Future Accelerator") is None


def test_meter_leaves_out_the_first_step_and_resets_on_read():
    meter = ThroughputMeter(peak=1000.0, world_size=2)
    meter.add(10.0, 1000, 1e6)  # the first step: compilation, warm-up
    assert meter.read() == (None, None)
    meter.add(1.0, 300, 400.0)
    meter.add(2.0, 600, 800.0)
    tok_s, mfu = meter.read()
    assert tok_s == pytest.approx(300.0)
    assert mfu == pytest.approx(400.0 / 1000.0 / 2)  # FLOP/s over the peak of both devices
    assert meter.read() == (None, None)


def test_meter_never_reports_mfu_above_100_percent():
    """A peak measured low (a busy machine at start) would give MFU > 1: the meter withholds
    the figure and says why, and reports it again once it is plausible."""
    meter = ThroughputMeter(peak=100.0)
    meter.add(1.0, 10, 1.0)  # first step, left out
    meter.add(1.0, 10, 150.0)  # 150 FLOP/s against a peak of 100
    tok_s, mfu = meter.read()
    assert tok_s == pytest.approx(10.0) and mfu is None and meter.over_peak
    assert "MFU n/a" in meter.describe(mfu) and "%" not in meter.describe(mfu)
    meter.add(1.0, 10, 50.0)
    tok_s, mfu = meter.read()
    assert mfu == pytest.approx(0.5) and not meter.over_peak
    assert meter.describe(mfu) == "  MFU 50.0%"


class SlowClock:
    """perf_counter for the throughput module only: every call is `step` seconds later."""

    def __init__(self, step: float):
        self.t, self.step = 0.0, step

    def perf_counter(self) -> float:
        self.t += self.step
        return self.t


def test_a_slow_measurement_keeps_the_best_peak_seen_on_this_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOPED_CACHE", str(tmp_path))
    throughput.measured_cpu_peak.cache_clear()
    monkeypatch.setattr(throughput, "time", SlowClock(1e-3))  # each matmul "takes" 1 ms
    fast, source = throughput.cpu_peak(2)
    n = throughput.CPU_PEAK_SIZE
    assert fast == pytest.approx(2 * n ** 3 / 1e-3)
    assert "this run's measurement" in source
    throughput.measured_cpu_peak.cache_clear()
    monkeypatch.setattr(throughput, "time", SlowClock(1.0))  # a busy machine: 1000x slower
    peak, source = throughput.cpu_peak(2)
    assert peak == pytest.approx(fast)  # the earlier, faster measurement wins
    assert "an earlier run's" in source and str(tmp_path) in source
    cache = json.loads((tmp_path / "cpu_peak.json").read_text())
    assert list(cache.values()) == [pytest.approx(fast)]
    throughput.measured_cpu_peak.cache_clear()


def test_training_log_shows_no_mfu_above_100_percent(monkeypatch, tmp_path, capsys):
    """A peak measured far too slow (each 1024^3 matmul "takes" 1000 s: 2 MFLOP/s, hundreds of
    times below what the tiny model reaches even on a loaded machine), in a short real training
    run: no MFU figure at all."""
    import re

    from looped.tools.train import main as train_main

    monkeypatch.setenv("LOOPED_CACHE", str(tmp_path / "cache"))
    throughput.measured_cpu_peak.cache_clear()
    monkeypatch.setattr(throughput, "time", SlowClock(1000.0))
    try:
        assert train_main(["task=prefix_sums", "task.length=6", "model.vocab_size=4", "loop=2",
                           "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
                           "model.n_kv_heads=1", "model.head_dim=8", "model.ffn_dim=32",
                           "model.max_seq_len=13", "train.steps=6", "train.log_every=2",
                           "train.eval_every=6", "eval.loops=[2]", "eval.n_samples=8",
                           "threads=1", f"out_dir={tmp_path}", "name=slow"]) == 0
    finally:
        throughput.measured_cpu_peak.cache_clear()
    log = capsys.readouterr().out
    assert "MFU against" in log and "measured fp32 matmul" in log
    assert "MFU n/a" in log
    assert not re.search(r"MFU \d", log)


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"%s": "fast"}'])
def test_a_malformed_peak_cache_is_ignored_and_replaced(text, monkeypatch, tmp_path):
    monkeypatch.setenv("LOOPED_CACHE", str(tmp_path))
    throughput.measured_cpu_peak.cache_clear()
    monkeypatch.setattr(throughput, "time", SlowClock(1e-3))
    key = throughput.cpu_peak_key(2)
    (tmp_path / "cpu_peak.json").write_text(text.replace("%s", key))
    try:
        peak, source = throughput.cpu_peak(2)
    finally:
        throughput.measured_cpu_peak.cache_clear()
    assert peak == pytest.approx(2 * throughput.CPU_PEAK_SIZE ** 3 / 1e-3)
    assert "this run's measurement" in source
    assert json.loads((tmp_path / "cpu_peak.json").read_text()) == {key: pytest.approx(peak)}

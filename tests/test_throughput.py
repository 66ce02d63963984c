"""MFU's ingredients: training FLOPs at the sampled R (equal to torch's FlopCounterMode over a
forward and backward), the peak table, and a meter that counts training steps only."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import rand_ids
from looped import build_model, load_config
from looped.training.flops import forward_flops_per_token, train_flops_per_token
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
    meter = ThroughputMeter(peak=100.0, world_size=2)
    meter.add(10.0, 1000, 1e6)  # the first step: compilation, warm-up
    assert meter.read() == (None, None)
    meter.add(1.0, 300, 400.0)
    meter.add(2.0, 600, 800.0)
    tok_s, mfu = meter.read()
    assert tok_s == pytest.approx(300.0)
    assert mfu == pytest.approx(400.0 / 100.0 / 2)  # FLOP/s over the peak of both devices
    assert meter.read() == (None, None)

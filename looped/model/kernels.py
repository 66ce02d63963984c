"""Causal sequence attention behind one function, with interchangeable kernels.

All kernels take q (B, H, Tq, D) and k, v (B, Hkv, Tk, D) with H a multiple of Hkv (GQA), and
treat query i as sitting at absolute position q_offset + i over keys 0..Tk-1, so the same call
serves a full forward (q_offset = 0, Tq = Tk), a chunked prefill and a one-token decode. A
q_offset given as a 0-d tensor (a compiled decode step over a preallocated cache) always masks
the keys after the query.
Depth-Attention only changes v, so it works unchanged with every kernel here.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from looped.errors import KernelUnavailableError
from looped.registry import Registry

Kernel = Callable[..., tuple[torch.Tensor, Optional[torch.Tensor]]]


def causal_mask(tq: int, tk: int, q_offset: int, device: torch.device,
                window: int = 0) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i may read key j: j <= q_offset + i, and with a sliding
    window (> 0) also j > q_offset + i - window (the query's last `window` keys)."""
    rows = torch.arange(tq, device=device).unsqueeze(1) + q_offset
    keys = torch.arange(tk, device=device).unsqueeze(0)
    mask = keys <= rows
    return mask & (keys > rows - window) if window else mask


def _sdpa(q, k, v, q_offset: int, need_weights: bool, window: int = 0):
    if need_weights:
        raise ValueError("the sdpa kernel cannot return attention weights; use kernel='eager'")
    tq, tk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    static = isinstance(q_offset, torch.Tensor)  # a preallocated buffer: keys past it are stale
    if window:
        mask = causal_mask(tq, tk, q_offset, q.device, window)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    elif tq == 1 and not static:  # one new token reads every cached key: no mask needed
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    elif not static and tq == tk and q_offset == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    else:
        mask = causal_mask(tq, tk, q_offset, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return out, None


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _eager(q, k, v, q_offset: int, need_weights: bool, window: int = 0):
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
    mask = causal_mask(q.shape[2], k.shape[2], q_offset, q.device, window)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return weights @ v, (weights if need_weights else None)


def xformers_available() -> bool:
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken build raising at import
        return False
    return True


def xformers_unavailable_reason(device_type: str) -> Optional[str]:
    """None when xformers can run on this device type, else a one-line reason with the fallback."""
    if not xformers_available():
        return ("kernel 'xformers' needs the xformers package (pip install -e '.[xformers]'); "
                "use model.kernel=sdpa instead")
    if device_type != "cuda":
        return (f"kernel 'xformers' has no {device_type} kernel and needs CUDA; "
                "use model.kernel=sdpa instead")
    return None


def _xformers(q, k, v, q_offset: int, need_weights: bool, window: int = 0):
    reason = xformers_unavailable_reason(q.device.type)
    if reason:
        raise KernelUnavailableError(reason)
    if window:
        raise KernelUnavailableError("the xformers kernel here has no sliding window "
                                     "(model.attn_window); use model.kernel=sdpa")
    if need_weights:
        raise ValueError("the xformers kernel cannot return attention weights; use kernel='eager'")
    from xformers.ops import fmha

    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    tq, tk = q.shape[2], k.shape[2]
    if isinstance(q_offset, torch.Tensor):
        raise KernelUnavailableError("the xformers kernel takes no tensor position (compiled "
                                     "decode); use model.kernel=sdpa")
    if tq == 1:
        bias = None
    elif tq == tk and q_offset == 0:
        bias = fmha.attn_bias.LowerTriangularMask()
    else:  # keys before the chunk are all visible: the diagonal sits at the bottom right
        bias = fmha.attn_bias.LowerTriangularFromBottomRightMask()
    # xformers wants (B, T, H, D)
    out = fmha.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2), None


KERNELS = Registry("attention kernel")  # name -> Kernel
for _name, _kernel in (("sdpa", _sdpa), ("eager", _eager), ("xformers", _xformers)):
    KERNELS.register(_name)(_kernel)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kernel: str = "sdpa",
           q_offset: int = 0, need_weights: bool = False, window: int = 0):
    """Causal attention, over each query's last `window` keys if window > 0. Returns
    (out (B, H, Tq, D), weights (B, H, Tq, Tk) or None)."""
    if window:
        return KERNELS[kernel](q, k, v, q_offset, need_weights, window)
    return KERNELS[kernel](q, k, v, q_offset, need_weights)


def check_kernel(kernel: str, device: torch.device | str) -> None:
    """Fail early, with one line, when a kernel cannot run on this device."""
    if kernel not in KERNELS:
        raise KernelUnavailableError(
            f"unknown attention kernel '{kernel}'; choose one of: {', '.join(KERNELS)}")
    if kernel == "xformers":
        reason = xformers_unavailable_reason(torch.device(device).type)
        if reason:
            raise KernelUnavailableError(reason)

"""Manifold-constrained hyper-connections (mHC, DeepSeek-AI 2025): hyper-connections whose
residual mixing matrix is projected onto the doubly stochastic matrices (Birkhoff polytope) by
Sinkhorn-Knopp iterations, so mixing streams can neither amplify nor shrink the residual signal:

    H_pre  = sigmoid(b_pre + a_pre dyn_pre)             (n, in (0, 1))
    H_post = 2 sigmoid(b_post + a_post dyn_post)        (n, in (0, 2))
    H_res  = Sinkhorn(exp(b_res + a_res dyn_res))       (n x n, rows and columns sum to 1)

Initialisation keeps the model vanilla (up to the rounding of sigmoid(logit(.)), ~1e-7), like
hyper-connections: position l reads stream
l mod n with weight 1 - (n - 1) eps and the others with eps (sum 1), writes with weight 1
(b_post = 0) and mixes with a near-identity doubly stochastic H_res.

Extra parameters: as hyper-connections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from looped.errors import ConfigError
from looped.model.cross_layer.hyper_connections import HyperConnections

READ_EPS = 0.01  # initial read weight of the streams other than the position's own
RES_OFF_DIAGONAL = -8.0  # initial logits of H_res off the diagonal: exp(-8) = 3e-4


def sinkhorn(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """(..., n, n) logits -> a doubly stochastic matrix by alternately normalising rows and
    columns of exp(logits), in fp32."""
    m = (logits.float() - logits.float().amax(dim=(-2, -1), keepdim=True)).exp()
    for _ in range(iters):
        m = m / m.sum(-1, keepdim=True)
        m = m / m.sum(-2, keepdim=True)
    return m.to(logits.dtype)


class ManifoldHyperConnections(HyperConnections):
    @dataclass
    class Config(HyperConnections.Config):
        sinkhorn_iters: int = 20  # Sinkhorn-Knopp iterations

        def check(self, cfg) -> None:
            super().check(cfg)
            if self.sinkhorn_iters < 1:
                raise ConfigError(f"model.cross_layer.sinkhorn_iters must be >= 1, "
                                  f"got {self.sinkhorn_iters}")

    def static_init(self, slot: int):
        n = self.n
        read = torch.full((n,), READ_EPS)
        read[slot % n] = 1.0 - (n - 1) * READ_EPS
        res = torch.full((n, n), RES_OFF_DIAGONAL).fill_diagonal_(0.0)
        return torch.logit(read), torch.zeros(n), res

    def maps(self, pre, post, res, scale):
        return pre * scale[0], post * scale[1], res * scale[2]

    def combine(self, dyn, bias):
        pre, post, res = (d + b for d, b in zip(dyn, bias))
        return pre.sigmoid(), 2.0 * post.sigmoid(), sinkhorn(res, self.cfg.sinkhorn_iters)

    def extra_flops_per_token(self) -> float:
        n = self.n
        # each Sinkhorn iteration: two sums and two divisions over n^2 entries
        return super().extra_flops_per_token() + self.n_slots * (4.0 * n * n *
                                                                 self.cfg.sinkhorn_iters)


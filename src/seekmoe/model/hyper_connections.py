"""Manifold-constrained hyper-connections (mHC, DeepSeek-V4 section 2.2): the residual stream widened to `hc_mult`
parallel streams, mixed by a doubly stochastic matrix (Sinkhorn-Knopp normalized) around each sub-layer.

A DeepSeek-V4 block (v4_block.py) holds two `HyperConnection`s, one around attention and one around the MoE; the
model collapses the streams once at the end with `HyperHead`. Everything here runs in fp32 (transformers keeps these
modules fp32 whatever the model's dtype): the Sinkhorn iterations divide by sums that bf16 would round away.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def unweighted_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, the rms in fp32, returned in x's dtype (no learned weight)."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


def expand_streams(h: torch.Tensor, hc_mult: int) -> torch.Tensor:
    """The embeddings h [B, S, H] copied onto each of the hc_mult residual streams: [B, S, hc_mult, H]."""
    return h.unsqueeze(2).expand(-1, -1, hc_mult, -1).contiguous()


class HyperConnection(nn.Module):
    """From the streams x [B, S, n, H]: the sub-layer's input (the streams collapsed with weights `pre`), and the
    weights that put its output back (`post` [B, S, n]) and mix the streams (`comb` [B, S, n, n], doubly stochastic),
    all from one linear map `fn` of the normalized, flattened streams: out = post * f(input) + comb^T x."""

    def __init__(self, hidden_size: int, hc_mult: int, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_mult, self.sinkhorn_iters, self.hc_eps, self.norm_eps = hc_mult, sinkhorn_iters, hc_eps, norm_eps
        n = hc_mult
        self.fn = nn.Parameter(torch.empty((2 + n) * n, n * hidden_size))  # rows: pre [n], post [n], comb [n * n]
        self.base = nn.Parameter(torch.empty((2 + n) * n))
        self.scale = nn.Parameter(torch.empty(3))  # pre, post, comb

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Normal(0, std) projection, zero biases, unit scales (transformers' initialization)."""
        self.fn.normal_(0.0, std)
        self.base.zero_()
        self.scale.fill_(1.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, n, H] -> (post [B, S, n] fp32, comb [B, S, n, n] fp32, collapsed input [B, S, H] in x's dtype)."""
        n = self.hc_mult
        B, S = x.shape[:2]
        mixes = F.linear(unweighted_rms_norm(x.reshape(B, S, -1).float(), self.norm_eps), self.fn.float())
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        pre_s, post_s, comb_s = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = sinkhorn(torch.softmax(comb_w.view(B, S, n, n) * comb_s + comb_b.view(n, n), dim=-1) + self.hc_eps,
                        self.sinkhorn_iters, self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)
        return post, comb, collapsed

    @staticmethod
    def merge(x: torch.Tensor, out: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """The new streams: post * out on each stream plus the old streams mixed by comb (summed over comb's
        first index: comb is doubly stochastic but not symmetric). x [B, S, n, H], out [B, S, H]."""
        dtype = x.dtype
        return post.to(dtype).unsqueeze(-1) * out.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), x)


def sinkhorn(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Sinkhorn-Knopp: alternately normalize the columns and rows of the positive m [..., n, n] (columns first,
    `iters` column normalizations in all), so both sum to ~1."""
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


class HyperHead(nn.Module):
    """The final collapse of the streams x [B, S, n, H] into one [B, S, H], before the model's last norm."""

    def __init__(self, hidden_size: int, hc_mult: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.hc_mult, self.hc_eps, self.norm_eps = hc_mult, hc_eps, norm_eps
        self.hc_fn = nn.Parameter(torch.empty(hc_mult, hc_mult * hidden_size))
        self.hc_base = nn.Parameter(torch.empty(hc_mult))
        self.hc_scale = nn.Parameter(torch.empty(1))

    @torch.no_grad()
    def reset_parameters(self, std: float) -> None:
        """Normal(0, std) projection, zero bias, unit scale."""
        self.hc_fn.normal_(0.0, std)
        self.hc_base.zero_()
        self.hc_scale.fill_(1.0)

    def expand(self, h: torch.Tensor) -> torch.Tensor:
        """The embeddings h [B, S, H] onto the streams the blocks carry: [B, S, n, H] (block_choice.build_streams)."""
        return expand_streams(h, self.hc_mult)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixes = F.linear(unweighted_rms_norm(x.flatten(2).float(), self.norm_eps), self.hc_fn.float())
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.hc_eps
        return (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)

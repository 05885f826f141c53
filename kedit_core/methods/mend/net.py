"""MEND's editor network (reference eric-mitchell/mend `algs/mend.py`, `nn.py`).

For every edited weight W (out x in, y = W u) the fine-tuning gradient of a batch is a sum of
rank-1 terms, grad W = sum_t delta_t u_t^T, u_t the layer input and delta_t the gradient of the
loss at the layer output of token t. MEND transforms each pair (u_t, delta_t):

    [u~; d~] = g_shape( [(u - mu_u) / s_u ; (delta - mu_d) / s_d], mode = layer index )
    g(x)     = IDMLP: n_hidden + 1 residual low-rank layers  x + clamp(scale_m (U V x + b) + shift_m, 0)
               (U zero-initialised, so g starts as the identity; rank 1920 in the reference)
    W'       = W + eta_l * sum_t d~_t u~_t^T                   (eta_l learned, initial 1e-4)

One network per weight shape, shared by the layers of that shape, with a per-layer scale and
shift ("modes"). The sign is the reference's: `p + lr * pseudo_grad` of the NLL; training
learns eta_l (it turns negative within a few steps) and the transform.

Deviations, both numerical: the normalisation statistics (count, mean, M2) are merged per
batch in float64 (Chan et al.'s parallel update, all-reduced over data-parallel workers so
that W workers see the statistics of the global batch) where the reference updates them one
token at a time in float32 (Welford); the same statistics up to rounding.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class LRLinear(nn.Module):
    def __init__(self, dim: int, rank: int, n_modes: int):
        super().__init__()
        mid = min(rank, dim)
        self.u = nn.Parameter(torch.zeros(dim, mid))
        self.v = nn.Parameter(torch.randn(mid, dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.mode_scale = nn.Parameter(torch.ones(n_modes, dim))
        self.mode_shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (x @ self.v.T) @ self.u.T + self.bias
        pre = pre * self.mode_scale[mode] + self.mode_shift[mode]
        return pre.clamp(min=0) + x          # clamp, not relu: the reference keeps a gradient at 0


class IDMLP(nn.Module):
    def __init__(self, dim: int, rank: int, n_hidden: int, n_modes: int):
        super().__init__()
        self.layers = nn.ModuleList([LRLinear(dim, rank, n_modes) for _ in range(n_hidden + 1)])

    def forward(self, x: torch.Tensor, mode: int) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, mode)
        return x


class GradientTransform(nn.Module):
    """Normalise (u, delta) with running statistics and transform them jointly."""

    def __init__(self, x_dim: int, delta_dim: int, rank: int, n_hidden: int, n_modes: int):
        super().__init__()
        self.x_dim, self.delta_dim = x_dim, delta_dim
        d = x_dim + delta_dim
        self.mlp = IDMLP(d, rank, n_hidden, n_modes)
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(d, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(d, dtype=torch.float64))

    @torch.no_grad()
    def update_stats(self, x: torch.Tensor) -> None:
        """Merge the rows of x (n, d) into (count, mean, M2); across data-parallel workers
        when torch.distributed is initialised."""
        x = x.double()
        s = torch.cat([torch.tensor([float(x.shape[0])], dtype=torch.float64, device=x.device),
                       x.sum(0), (x * x).sum(0)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(s)
        n, tot, sq = s[0], s[1:1 + x.shape[1]], s[1 + x.shape[1]:]
        if n == 0:
            return
        bmean = tot / n
        bm2 = (sq - n * bmean * bmean).clamp(min=0)
        k = self.count
        new = k + n
        diff = bmean - self.mean
        self.mean.copy_(self.mean + diff * (n / new))
        self.m2.copy_(self.m2 + bm2 + diff * diff * (k * n / new))
        self.count.copy_(new)

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int, update: bool = False):
        u = u.reshape(-1, u.shape[-1]).float()
        delta = delta.reshape(-1, delta.shape[-1]).float()
        keep = (u != 0).any(-1) & (delta != 0).any(-1)      # tokens without a gradient add nothing
        x = torch.cat([u[keep], delta[keep]], -1)
        if update:
            self.update_stats(x)
        if self.count < 2:
            raise RuntimeError(f"MEND normalisation needs at least 2 samples so far (has {int(self.count)})")
        std = (self.m2 / (self.count - 1)).sqrt()
        xn = ((x.double() - self.mean) / (std + 1e-7)).float()
        out = self.mlp(xn, mode)
        return out[:, :self.x_dim], out[:, self.x_dim:]


class MENDNet(nn.Module):
    """The editor: one GradientTransform per (in, out) shape and a learned step per site."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int = 1920, n_hidden: int = 1,
                 edit_lr: float = 1e-4):
        super().__init__()
        self.sites = list(shapes)
        groups: dict[str, list[str]] = {}
        for s, (out_f, in_f) in shapes.items():
            groups.setdefault(f"{in_f}x{out_f}", []).append(s)
        self.route = {s: (key, members.index(s)) for key, members in groups.items() for s in members}
        self.transforms = nn.ModuleDict({key: GradientTransform(int(key.split("x")[0]), int(key.split("x")[1]),
                                                                rank, n_hidden, len(members))
                                         for key, members in groups.items()})
        self.edit_lrs = nn.Parameter(torch.full((len(self.sites),), float(edit_lr)))

    def delta(self, site: str, u: torch.Tensor, d: torch.Tensor, update: bool = False) -> torch.Tensor:
        """eta_site * sum_t d~_t u~_t^T, (out, in)."""
        key, mode = self.route[site]
        ut, dt = self.transforms[key](u, d, mode, update)
        return self.edit_lrs[self.sites.index(site)] * (dt.T @ ut)

"""Rotary position embeddings: default RoPE and YaRN (DeepSeek-V2's 128K context: factor 40 over 4K), applied to
interleaved pairs (DeepSeek: dims (0,1), (2,3), ...) or to halves (Qwen: dims (i, i + d/2)).

YaRN (arXiv 2309.00071) blends interpolated (theta / factor) and extrapolated frequencies with a linear ramp over
the dims whose wavelength falls between beta_fast and beta_slow rotations of the original context, and scales
cos/sin by attention_factor = mscale(factor, mscale) / mscale(factor, mscale_all_dim) (DeepSeek) or
mscale(factor). Numbers follow transformers' _compute_yarn_parameters. The interleaved form writes its output as
[rotated even dims, rotated odd dims] — a fixed permutation of the rope dims applied to q and k alike, so every
q.k product (and so attention) equals the pair-in-place form; the paged cache stores k in this layout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import RopeConfig, yarn_mscale


def inv_freq_and_scale(r: RopeConfig) -> tuple[torch.Tensor, float]:
    """-> (inv_freq [dim/2] float32, attention_factor multiplying cos and sin)."""
    d = r.dim
    cpu = torch.device("cpu")  # explicit: also right when the model is being built under torch.device("meta")
    pos_freqs = r.theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=cpu) / d)  # [d/2]
    if r.kind == "default":
        return 1.0 / pos_freqs, 1.0
    factor = r.factor
    attn = r.attention_factor
    if attn is None:
        if r.mscale and r.mscale_all_dim:
            attn = yarn_mscale(factor, r.mscale) / yarn_mscale(factor, r.mscale_all_dim)
        else:
            attn = yarn_mscale(factor)

    def corr_dim(rot: float) -> float:
        return (d * math.log(r.original_max_position_embeddings / (rot * 2 * math.pi))) / (2 * math.log(r.theta))

    low, high = corr_dim(r.beta_fast), corr_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32, device=cpu) - low) / (high - low)).clamp(0, 1)  # [d/2]
    extrap = 1 - ramp  # 1 -> keep the original frequency (high-frequency dims)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
    return inv_freq, float(attn)


class Rotary(nn.Module):
    """inv_freq is a plain float32 attribute, not a buffer: model.to(bfloat16) must not round the frequencies
    (at position 100K a bf16 frequency is off by hundreds of radians). It follows the positions' device."""

    def __init__(self, r: RopeConfig):
        super().__init__()
        self.interleaved = r.interleaved
        self.inv_freq, self.scale = inv_freq_and_scale(r)  # [d/2] float32

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [...] int -> (cos, sin) [..., dim/2] float32, already times attention_factor."""
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * self.inv_freq  # [..., d/2]
        return freqs.cos() * self.scale, freqs.sin() * self.scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [..., T, d] (any number of head dims before T, matched by broadcasting cos/sin [..., T, d/2]);
    computed in float32, returned in x's dtype."""
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
    else:
        x1, x2 = xf.chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)

"""Attention: GQA with per-head q/k RMSNorm (Qwen3-MoE) and Multi-head Latent Attention (DeepSeek-V2/V3).

Two paths per module:
- `forward(x [B, T, H], cos, sin, mask)`: full-sequence attention for training and scoring (PyTorch SDPA, causal
  unless a boolean mask [B, 1, T, T] is given; autograd through everything).
- `forward_paged(x [N, H], cos, sin, meta, cache)`: the engine's path. It writes the new tokens into the paged
  cache (dsmath_kernels.cache_write / mla_cache_write) and attends with paged_decode / mla_decode on decode steps,
  paged_prefill / mla_prefill otherwise (queries are the last tokens of each sequence, so chunked prefill and
  shared prompt blocks work). Decode steps with meta.cascade read shared prompt blocks once per group of samples.

MLA (DeepSeek-V2, arXiv 2405.04434): c = RMSNorm(W_DKV x) [Dc] and a shared rope key k_pe [Dr] per token;
per head k_nope = W_UK c, v = W_UV c. Training expands K/V; the paged path caches only [c; k_pe] (Dc + Dr values
per token) and runs absorbed: q_lat = W_UK^T q_nope, scores = q_lat . c + q_pe . k_pe, o_lat = sum p c,
out = W_UV o_lat. Letters: B batch, T/N tokens, H hidden, Hq heads, Hkv kv heads, D head dim, Dc kv_lora_rank,
Dr rope dim, Dn nope dim, Dv value dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import dsmath_kernels as dk

from ..config import ModelConfig
from ..meta import ForwardMeta
from .fp8 import dense_weight, linear
from .rmsnorm import RMSNorm
from .rope import apply_rope


def sdpa(q, k, v, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, Hq, T, D], k [B, Hq, S, D], v [B, Hq, S, Dv] -> [B, T, Hq, Dv]. Causal when mask is None."""
    dv = v.shape[-1]
    if q.is_cuda and dv != q.shape[-1]:  # flash kernels want one head dim: pad V (zeros), slice the output
        v = F.pad(v, (0, q.shape[-1] - dv))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    return out[..., :dv].transpose(1, 2)


class GQAAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nh, self.nkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, b = cfg.hidden_size, cfg.attention_bias
        self.q_proj = linear(cfg, H, self.nh * self.d, bias=b)
        self.k_proj = linear(cfg, H, self.nkv * self.d, bias=b)
        self.v_proj = linear(cfg, H, self.nkv * self.d, bias=b)
        self.o_proj = linear(cfg, self.nh * self.d, H, bias=b)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.scale = cfg.softmax_scale()
        self.interleaved = cfg.rope.interleaved

    def _qkv(self, x, cos, sin):
        """x [..., T, H] -> q [..., T, Hq, D], k, v [..., T, Hkv, D] with rope applied."""
        lead = x.shape[:-1]
        q = self.q_norm(self.q_proj(x).view(*lead, self.nh, self.d))
        k = self.k_norm(self.k_proj(x).view(*lead, self.nkv, self.d))
        v = self.v_proj(x).view(*lead, self.nkv, self.d)
        c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [..., T, 1, D/2]
        return apply_rope(q, c, s, self.interleaved), apply_rope(k, c, s, self.interleaved), v

    def forward(self, x, cos, sin, mask=None):
        B, T, _ = x.shape
        q, k, v = self._qkv(x, cos, sin)  # [B, T, h, D]
        g = self.nh // self.nkv
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, h, T, D]
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        out = sdpa(q, k, v, self.scale, mask)  # [B, T, Hq, D]
        return self.o_proj(out.reshape(B, T, -1))

    def forward_paged(self, x, cos, sin, meta: ForwardMeta, cache):
        k_cache, v_cache = cache
        q, k, v = self._qkv(x, cos, sin)  # [N, Hq, D], [N, Hkv, D]
        dk.cache_write(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.is_decode:
            out = dk.paged_decode(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale,
                                  plan=meta.decode_plan, cascade=getattr(meta, "cascade", None))
        else:
            out = dk.paged_prefill(q, k_cache, v_cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens,
                                   self.scale, causal=True, max_seqlen_q=meta.max_seqlen_q)
        return self.o_proj(out.reshape(x.shape[0], -1))  # [N, H]


class MLAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, b = cfg.hidden_size, cfg.attention_bias
        self.nh = cfg.num_attention_heads
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.dc = cfg.kv_lora_rank
        dq = self.dn + self.dr
        if cfg.q_lora_rank is None:
            self.q_proj = linear(cfg, H, self.nh * dq, bias=False)
        else:
            self.q_a_proj = linear(cfg, H, cfg.q_lora_rank, bias=b)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)  # eps 1e-6 as in transformers, not rms_norm_eps
            self.q_b_proj = linear(cfg, cfg.q_lora_rank, self.nh * dq, bias=False)
        self.kv_a_proj_with_mqa = linear(cfg, H, self.dc + self.dr, bias=b)
        self.kv_a_layernorm = RMSNorm(self.dc)
        self.kv_b_proj = linear(cfg, self.dc, self.nh * (self.dn + self.dv), bias=False)
        self.o_proj = linear(cfg, self.nh * self.dv, H, bias=b)
        self.scale = cfg.softmax_scale()
        self.interleaved = cfg.rope.interleaved
        self.low_rank_q = cfg.q_lora_rank is not None

    def _q(self, x):
        """x [..., H] -> q_nope [..., Hq, Dn], q_pe [..., Hq, Dr] (before rope)."""
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.low_rank_q else self.q_proj(x)
        q = q.view(*x.shape[:-1], self.nh, self.dn + self.dr)
        return q.split([self.dn, self.dr], dim=-1)

    def _latent(self, x, cos, sin):
        """x [..., T, H] -> c [..., T, Dc] (normed latent), k_pe [..., T, Dr] (roped)."""
        c, k_pe = self.kv_a_proj_with_mqa(x).split([self.dc, self.dr], dim=-1)
        return self.kv_a_layernorm(c), apply_rope(k_pe, cos, sin, self.interleaved)

    def forward(self, x, cos, sin, mask=None):
        B, T, _ = x.shape
        q_nope, q_pe = self._q(x)  # [B, T, Hq, Dn|Dr]
        q_pe = apply_rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2), self.interleaved)
        c, k_pe = self._latent(x, cos, sin)  # [B, T, Dc], [B, T, Dr]
        kv = self.kv_b_proj(c).view(B, T, self.nh, self.dn + self.dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # [B, Hq, T, Dn + Dr]
        k = torch.cat((k_nope, k_pe.unsqueeze(2).expand(B, T, self.nh, self.dr)), dim=-1).transpose(1, 2)
        out = sdpa(q, k, v.transpose(1, 2), self.scale, mask)  # [B, T, Hq, Dv]
        return self.o_proj(out.reshape(B, T, -1))

    def absorbed_weights(self):
        """kv_b_proj.weight [Hq * (Dn + Dv), Dc] -> W_UK [Hq, Dn, Dc], W_UV [Hq, Dv, Dc] (an FP8 kv_b_proj is
        dequantised for the step, as DeepSeek's reference inference does: Hq * (Dn + Dv) * Dc values per layer)."""
        w = dense_weight(self.kv_b_proj, self.kv_a_layernorm.weight.dtype).view(self.nh, self.dn + self.dv, self.dc)
        return w[:, : self.dn], w[:, self.dn:]

    def forward_paged(self, x, cos, sin, meta: ForwardMeta, cache):
        q_nope, q_pe = self._q(x)  # [N, Hq, Dn], [N, Hq, Dr]
        q_pe = apply_rope(q_pe, cos.unsqueeze(-2), sin.unsqueeze(-2), self.interleaved)
        c, k_pe = self._latent(x, cos, sin)  # [N, Dc], [N, Dr]
        cache, kv_scale = cache if isinstance(cache, tuple) else (cache, None)  # fp8 cache: rows, per-token scales
        if kv_scale is None:
            dk.mla_cache_write(torch.cat((c, k_pe), dim=-1), cache, meta.slot_mapping)
        else:
            dk.mla_cache_write_fp8(torch.cat((c, k_pe), dim=-1), cache, kv_scale, meta.slot_mapping)
        w_uk, w_uv = self.absorbed_weights()
        q_lat = torch.einsum("nhd,hdc->nhc", q_nope, w_uk)  # [N, Hq, Dc]
        q = torch.cat((q_lat, q_pe), dim=-1)  # [N, Hq, Dc + Dr]
        if meta.is_decode:
            o_lat = dk.mla_decode(q, cache, meta.block_tables, meta.seq_lens, self.scale, v_head_dim=self.dc,
                                  plan=meta.decode_plan, cascade=getattr(meta, "cascade", None), kv_scale=kv_scale)
        else:
            o_lat = dk.mla_prefill(q, cache, meta.block_tables, meta.cu_seqlens_q, meta.seq_lens, self.scale,
                                   v_head_dim=self.dc, max_seqlen_q=meta.max_seqlen_q, kv_scale=kv_scale)
        out = torch.einsum("nhc,hvc->nhv", o_lat, w_uv)  # [N, Hq, Dv]
        return self.o_proj(out.reshape(x.shape[0], -1))

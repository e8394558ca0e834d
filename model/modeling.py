"""`MoEForCausalLM`: DeepSeek-V2/V3 (MLA) and Qwen3-MoE (GQA) decoder-only MoE models on dsmath kernels.

- `model(input_ids [B, T], attention_mask=None, *, return_hidden=False)` -> CausalLMOutput (.logits [B, T, V] or
  .hidden [B, T, H] final-normed hidden states, for the fused GRPO loss with `model.lm_head.weight`).
  Full-sequence attention (SDPA), autograd everywhere; `model.gradient_checkpointing = True` recomputes each
  decoder layer in backward (activation checkpointing) while training.
  Routing replay: `routing=` [B, T, L, K] expert ids (L = MoE layers, in order) makes every MoE layer use those
  experts, weights recomputed from the router logits at them (dsmath_kernels.route_topk_weights); `return_routing`
  adds .routing [B, T, L, K], the experts the gates' own top-k picks.
- `model.forward_paged(meta, kv_cache)` -> logits [B, V] float32: the engine's path over a paged KV cache
  (contract: model/README.md, metadata: model/meta.py). A cache allocated with routing=True also
  records each new token's experts per MoE layer at its slot (`KVCache.routing`, device-side, CUDA-graph safe).
- `from_pretrained(dir)` / `save_pretrained(dir)` (model/loader.py), `from_config(cfg)`, `from_preset(name)`.
Parameter names equal transformers' in-memory names, so state_dict keys line up with transformers 5.24.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelConfig
from .layers.attention import GQAAttention, MLAttention
from .layers.fp8 import FP8Experts, FP8Linear, fp8_param_ids, keep_float
from .layers.moe import MLP, MoE
from .layers.rmsnorm import RMSNorm
from .layers.rope import Rotary
from .meta import ForwardMeta


@dataclass
class CausalLMOutput:
    logits: torch.Tensor | None = None  # [B, T, V]
    hidden: torch.Tensor | None = None  # [B, T, H] after the final norm (return_hidden=True)
    routing: torch.Tensor | None = None  # [B, T, L, K] the gates' own top-k per MoE layer (return_routing=True)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        self.self_attn = MLAttention(cfg) if cfg.is_mla else GQAAttention(cfg)
        self.is_moe = bool(cfg.moe_layers[idx])
        if self.is_moe:
            self.mlp = MoE(cfg)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def _ffn(self, x, routing=None, return_routing=False):
        """-> (output, own top-k ids or None). routing / return_routing only reach MoE blocks."""
        if not self.is_moe:
            return self.mlp(x), None
        out = self.mlp(x, routing=routing, return_routing=return_routing)
        return out if return_routing else (out, None)

    def forward(self, x, cos, sin, mask=None, routing=None, return_routing=False):
        """-> (x, ids [B, T, K] of the gate's own top-k when return_routing and MoE, else None)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        h, ids = self._ffn(self.post_attention_layernorm(x), routing, return_routing)
        return x + h, ids

    def forward_paged(self, x, cos, sin, meta, cache, record=None):
        """record: (buffer [S + 1, K], rows [N]) — write each new token's experts at its row (MoE layers)."""
        x = x + self.self_attn.forward_paged(self.input_layernorm(x), cos, sin, meta, cache)
        h, ids = self._ffn(self.post_attention_layernorm(x), return_routing=record is not None)
        if ids is not None:
            buf, rows = record
            buf.index_copy_(0, rows, ids.to(buf.dtype))
        return x + h


class Backbone(nn.Module):
    """transformers' `model.` prefix: embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.rope)


class KVCache:
    """Paged cache, one entry per layer: MLA -> latent rows [NB, BS, Dc + Dr] (an fp8-e4m3 cache: (rows, per-token
    scales [NB, BS] float32)); GQA -> (k, v) [NB, BS, Hkv, D].
    All layers live in one allocation ([L, NB, BS, ...]) so the engine can size it in one go.
    `routing` (routing=True, MoE models): [NB * BS + 1, L_moe, K] int16 expert ids of the token at each cache slot
    per MoE layer, written by forward_paged beside its K/V (the last row takes padding rows' writes)."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype, device, routing: bool = False):
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        self.routing = None
        if routing and any(cfg.moe_layers):
            self.routing = torch.zeros(num_blocks * block_size + 1, sum(cfg.moe_layers), cfg.num_experts_per_tok,
                                       dtype=routing_dtype(cfg), device=device)
        L = cfg.num_hidden_layers
        self.scale = None
        if dtype == torch.float8_e4m3fn and not cfg.is_mla:
            raise ValueError("kv_cache_dtype: an fp8 cache is for MLA models (DeepSeek-V2/V3) only")
        if cfg.is_mla:
            self.data = torch.zeros(L, num_blocks, block_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                    dtype=dtype, device=device)
            self.layers = [self.data[i] for i in range(L)]
            if dtype == torch.float8_e4m3fn:  # e4m3 latent rows, one fp32 scale per token (row = fp8 * scale)
                self.scale = torch.ones(L, num_blocks, block_size, dtype=torch.float32, device=device)
                self.layers = [(self.data[i], self.scale[i]) for i in range(L)]
        else:
            self.data = torch.zeros(2, L, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim,
                                    dtype=dtype, device=device)
            self.layers = [(self.data[0, i], self.data[1, i]) for i in range(L)]

    def __getitem__(self, i):
        return self.layers[i]

    def __len__(self):
        return len(self.layers)


class MoEForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if cfg.quant is not None and cfg.quant.modules_to_not_convert:
            keep_float(self, cfg.quant.modules_to_not_convert)
        self.gradient_checkpointing = False

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: ModelConfig | dict, dtype=None, device=None, init_std: float = 0.02):
        """Random init (normal(0, init_std) for matrices, ones for norms, zeros for biases)."""
        cfg = ModelConfig.from_dict(cfg) if isinstance(cfg, dict) else cfg
        with torch.device("meta"):
            m = cls(cfg)
        if dtype is not None:
            m.cast(dtype)  # on meta: the weights are materialised once, directly in dtype
        m.to_empty(device=device or "cpu")
        m.tie_weights()
        m.init_weights(init_std)
        return m

    @classmethod
    def from_preset(cls, name: str, dtype=None, device=None):
        from .presets import preset
        return cls.from_config(preset(name), dtype=dtype, device=device)

    @classmethod
    def from_pretrained(cls, path: str, dtype=None, device=None, parallel=None):
        """parallel: a model.parallel.ParallelConfig to load only this rank's part (tensor / expert parallel)."""
        from .loader import load_pretrained
        shard = None
        if parallel is not None:
            from .parallel import parallelize
            shard = lambda m: parallelize(m, parallel)
        return load_pretrained(cls, path, dtype=dtype, device=device, shard=shard)

    def save_pretrained(self, path: str, max_shard_bytes: int = 5 * 2**30) -> None:
        from .loader import save_pretrained
        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, (FP8Linear, FP8Experts)):
                m.init_weights(std)  # quantised N(0, std)
        frozen = fp8_param_ids(self)
        for name, p in self.named_parameters():
            if id(p) in frozen:
                continue
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif p.ndim == 1:
                p.zero_()
            else:
                p.normal_(0.0, std)
        for mod in self.modules():
            if getattr(mod, "e_score_correction_bias", None) is not None:
                mod.e_score_correction_bias.zero_()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def cast(self, dtype: torch.dtype):
        """Cast to dtype; DeepSeek routers (gate.weight, e_score_correction_bias) stay float32 as in transformers,
        FP8 weights and their fp32 block scales keep their dtypes."""
        keep = fp8_param_ids(self)
        self._apply(lambda t: t if id(t) in keep or not t.is_floating_point() else t.to(dtype))
        self.tie_weights()
        if self.config.router_fp32:
            for name, mod in self.named_modules():
                if name.endswith("mlp.gate"):
                    mod.float()
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def num_moe_layers(self) -> int:
        """L of the routing layout [..., L, K]: the MoE layers, in order (dense layers have no routing)."""
        return sum(self.config.moe_layers)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # ---- training / scoring ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, return_hidden: bool = False,
                routing: torch.Tensor | None = None, return_routing: bool = False) -> CausalLMOutput:
        """input_ids [B, T]; attention_mask [B, T] (1 = token, 0 = padding) or None; position_ids [B, T] or None
        (default 0..T-1, as transformers does when none are given).
        routing [B, T, L, K] int16/32/64 (L = num_moe_layers, K = num_experts_per_tok): routing replay — MoE layer l
        sends token t to experts routing[:, t, l] (e.g. the engine's, CompletionOutput.routing) with weights
        recomputed from its router logits at those experts. return_routing: .routing [B, T, L, K] int16 = the
        experts the gates' own top-k picks (with routing given: from the same logits, for measuring agreement)."""
        B, T = input_ids.shape
        if routing is not None:
            self._check_routing(routing, B, T, input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.model.rotary(position_ids)  # [B, T, Dr/2]
        mask = None if attention_mask is None else _padding_mask(attention_mask)
        x = self.model.embed_tokens(input_ids)  # [B, T, H]
        own, j = [], 0
        for layer in self.model.layers:
            r = None
            if layer.is_moe and routing is not None:
                r = routing[:, :, j]  # [B, T, K]
            j += layer.is_moe
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, ids = checkpoint(layer, x, cos, sin, mask, r, return_routing, use_reentrant=False)
            else:
                x, ids = layer(x, cos, sin, mask, r, return_routing)
            if ids is not None:
                own.append(ids.to(routing_dtype(self.config)))
        x = self.model.norm(x)
        out = CausalLMOutput(routing=torch.stack(own, dim=2) if own else None)  # [B, T, L, K]
        if return_hidden:
            out.hidden = x
        else:
            out.logits = self.lm_head(x)
        return out

    def _check_routing(self, routing: torch.Tensor, B: int, T: int, device) -> None:
        c = self.config
        L, K = self.num_moe_layers, c.num_experts_per_tok
        if not isinstance(routing, torch.Tensor) or routing.dtype not in (torch.int16, torch.int32, torch.int64):
            raise TypeError(f"routing: expected an int16/int32/int64 tensor, got {getattr(routing, 'dtype', routing)}")
        if tuple(routing.shape) != (B, T, L, K):
            raise ValueError(f"routing: expected shape [B, T, moe_layers, top_k] = [{B}, {T}, {L}, {K}], got "
                             f"{list(routing.shape)}")
        if routing.device != torch.device(device):
            raise ValueError(f"routing: on device {routing.device}, input_ids on {device}")
        if routing.device.type == "cpu" and routing.numel():  # on GPU: route_topk_weights' DSMATH_CHECK_IDS
            lo, hi = int(routing.min()), int(routing.max())
            if lo < 0 or hi >= c.num_experts:
                raise ValueError(f"routing: expert ids must lie in [0, {c.num_experts}), got {lo}..{hi}")

    # ---- inference over the paged cache ------------------------------------------------------------------------
    def kv_cache_bytes_per_block(self, block_size: int, dtype=None, routing: bool = False) -> int:
        c = self.config
        per_token = c.kv_lora_rank + c.qk_rope_head_dim if c.is_mla else 2 * c.num_key_value_heads * c.head_dim
        elem = torch.empty((), dtype=dtype or self.dtype).element_size()
        if dtype == torch.float8_e4m3fn:
            per_token += 4  # its fp32 scale
        kv = c.num_hidden_layers * block_size * per_token * elem
        if routing and self.num_moe_layers:
            kv += block_size * self.num_moe_layers * c.num_experts_per_tok * routing_dtype(c).itemsize
        return kv

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype=None, device=None,
                          routing: bool = False) -> KVCache:
        """routing=True (MoE models): also a buffer recording each cached token's experts (KVCache.routing)."""
        return KVCache(self.config, num_blocks, block_size, dtype or self.dtype, device or self.device, routing)

    @torch.no_grad()
    def forward_paged(self, meta: ForwardMeta, kv_cache: KVCache) -> torch.Tensor:
        """One engine step: writes the new tokens' K/V (latent rows) into the cache, returns logits [M, V] float32
        of the tokens meta.logits_indices names (each sequence's last new token, or more for prompt log-probs)."""
        if not meta.is_decode and meta.max_seqlen_q is None:  # one host sync per step rather than one per layer
            meta = dataclasses.replace(meta, max_seqlen_q=int((meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).max()))
        cos, sin = self.model.rotary(meta.positions)  # [N, Dr/2]
        x = self.model.embed_tokens(meta.input_ids)  # [N, H]
        buf = getattr(kv_cache, "routing", None)  # [S + 1, L, K]: record the experts beside the K/V
        if buf is not None:  # padding rows (slot -1) write to the spare last row; no host sync
            rows = torch.where(meta.slot_mapping >= 0, meta.slot_mapping, buf.shape[0] - 1)  # [N]
        j = 0
        for i, layer in enumerate(self.model.layers):
            rec = (buf[:, j], rows) if buf is not None and layer.is_moe else None
            j += layer.is_moe
            x = layer.forward_paged(x, cos, sin, meta, kv_cache[i], rec)
        x = self.model.norm(x[meta.logits_indices])  # [M, H]
        return self.lm_head(x).float()


def routing_dtype(cfg: ModelConfig) -> torch.dtype:
    """Expert ids are stored as int16 (int32 beyond 32767 experts)."""
    return torch.int16 if cfg.num_experts <= 32767 else torch.int32


def _padding_mask(attention_mask: torch.Tensor) -> torch.Tensor | None:
    """[B, T] 1/0 -> bool [B, 1, T, T]: causal and key not padding. A query that would see no key (left padding)
    sees itself, so its (ignored) output stays finite. Right padding only (every row 1...1 0...0, the GRPO batch
    layout) -> None: under the causal mask a real token never sees a later pad, so plain causal attention (flash
    kernels) gives the same real-token outputs."""
    if bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
        return None
    T = attention_mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
    mask = causal[None] & attention_mask.bool()[:, None, :]  # [B, T, T]
    mask = mask | torch.eye(T, dtype=torch.bool, device=mask.device)[None]
    return mask[:, None]


__all__ = ["CausalLMOutput", "KVCache", "MoEForCausalLM"]

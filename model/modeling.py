"""`MoEForCausalLM`: DeepSeek-V2/V3 (MLA) and Qwen3-MoE (GQA) decoder-only MoE models on dsmath kernels.

- `model(input_ids [B, T], attention_mask=None, *, return_hidden=False)` -> CausalLMOutput (.logits [B, T, V] or
  .hidden [B, T, H] final-normed hidden states, for the fused GRPO loss with `model.lm_head.weight`).
  Full-sequence attention (SDPA), autograd everywhere; `model.gradient_checkpointing = True` recomputes each
  decoder layer in backward (activation checkpointing) while training.
- `model.forward_paged(meta, kv_cache)` -> logits [B, V] float32: the engine's path over a paged KV cache
  (contract: notes/MODEL_ENGINE_CONTRACT.md, metadata: model/meta.py).
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


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int):
        super().__init__()
        self.self_attn = MLAttention(cfg) if cfg.is_mla else GQAAttention(cfg)
        if cfg.moe_layers[idx]:
            self.mlp = MoE(cfg)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias, cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_paged(self, x, cos, sin, meta, cache):
        x = x + self.self_attn.forward_paged(self.input_layernorm(x), cos, sin, meta, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """transformers' `model.` prefix: embed_tokens, layers, norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.rope)


class KVCache:
    """Paged cache, one entry per layer: MLA -> latent rows [NB, BS, Dc + Dr]; GQA -> (k, v) [NB, BS, Hkv, D].
    All layers live in one allocation ([L, NB, BS, ...]) so the engine can size it in one go."""

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype, device):
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype
        L = cfg.num_hidden_layers
        if cfg.is_mla:
            self.data = torch.zeros(L, num_blocks, block_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                                    dtype=dtype, device=device)
            self.layers = [self.data[i] for i in range(L)]
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
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    # ---- training / scoring ---------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                position_ids: torch.Tensor | None = None, return_hidden: bool = False) -> CausalLMOutput:
        """input_ids [B, T]; attention_mask [B, T] (1 = token, 0 = padding) or None; position_ids [B, T] or None
        (default 0..T-1, as transformers does when none are given)."""
        B, T = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        cos, sin = self.model.rotary(position_ids)  # [B, T, Dr/2]
        mask = None if attention_mask is None else _padding_mask(attention_mask)
        x = self.model.embed_tokens(input_ids)  # [B, T, H]
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask)
        x = self.model.norm(x)
        if return_hidden:
            return CausalLMOutput(hidden=x)
        return CausalLMOutput(logits=self.lm_head(x))

    # ---- inference over the paged cache ------------------------------------------------------------------------
    def kv_cache_bytes_per_block(self, block_size: int, dtype=None) -> int:
        c = self.config
        per_token = c.kv_lora_rank + c.qk_rope_head_dim if c.is_mla else 2 * c.num_key_value_heads * c.head_dim
        elem = torch.empty((), dtype=dtype or self.dtype).element_size()
        return c.num_hidden_layers * block_size * per_token * elem

    def allocate_kv_cache(self, num_blocks: int, block_size: int, dtype=None, device=None) -> KVCache:
        return KVCache(self.config, num_blocks, block_size, dtype or self.dtype, device or self.device)

    @torch.no_grad()
    def forward_paged(self, meta: ForwardMeta, kv_cache: KVCache) -> torch.Tensor:
        """One engine step: writes the new tokens' K/V (latent rows) into the cache, returns logits [B, V] float32
        of each sequence's last new token (meta.logits_indices)."""
        if not meta.is_decode and meta.max_seqlen_q is None:  # one host sync per step rather than one per layer
            meta = dataclasses.replace(meta, max_seqlen_q=int((meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]).max()))
        cos, sin = self.model.rotary(meta.positions)  # [N, Dr/2]
        x = self.model.embed_tokens(meta.input_ids)  # [N, H]
        for i, layer in enumerate(self.model.layers):
            x = layer.forward_paged(x, cos, sin, meta, kv_cache[i])
        x = self.model.norm(x[meta.logits_indices])  # [B, H]
        return self.lm_head(x).float()


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

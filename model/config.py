"""Model config parsed from a Hugging Face `config.json` (deepseek_v2, deepseek_v3, qwen3_moe), without importing
transformers. Field defaults and the mapping of routing fields follow transformers 5.24's config classes and
routers, so a checkpoint gives the same model here as there:

- deepseek_v2: softmax gating; topk_method "greedy" (no groups) or "group_limited_greedy" (groups ranked by their
  max score); no renormalization (transformers' DeepseekV2TopkRouter ignores norm_topk_prob, and every released
  V2 config sets it false); weights * routed_scaling_factor. RoPE on interleaved pairs.
- deepseek_v3: sigmoid gating + e_score_correction_bias, groups ranked by their top-2 sum, renormalize if
  norm_topk_prob, * routed_scaling_factor. RoPE interleaved if rope_interleave (default true).
- qwen3_moe: GQA with q/k RMSNorm, softmax top-k, renormalize if norm_topk_prob, no shared experts; MoE on layer i
  when i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0, dense MLP otherwise.

`raw` keeps the whole original dict so `save_pretrained` writes back every field it did not understand.

`quantization_config` (DeepSeek-V3's FP8 checkpoints): {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic,
weight_block_size: [128, 128]} -> `ModelConfig.quant` (QuantConfig): every linear weight of the decoder layers
(attention projections, dense MLPs, shared and routed experts) is e4m3 with a `weight_scale_inv` per 128 x 128
block; embeddings, the LM head, routers and norms stay in float. Anything else (per-tensor FP8, other block sizes,
static activation scales, other methods) is refused here, before any weight is read.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass, field

SUPPORTED = ("deepseek_v2", "deepseek_v3", "qwen3_moe")

# transformers 5.24 class defaults for the fields we read (used when config.json omits them)
_DEFAULTS = {
    "deepseek_v2": {"vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "first_k_dense_replace": 0, "kv_lora_rank": 512,
        "q_lora_rank": 1536, "n_group": None, "n_routed_experts": 64, "n_shared_experts": 2, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "routed_scaling_factor": 1.0, "topk_group": None, "topk_method": "greedy",
        "norm_topk_prob": False, "v_head_dim": 128, "num_experts_per_tok": None, "moe_intermediate_size": 1407,
        "eos_token_id": 2, "bos_token_id": 1, "hidden_act": "silu"},
    "deepseek_v3": {"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "n_shared_experts": 1,
        "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "rope_interleave": True, "attention_bias": False,
        "mlp_bias": False, "eos_token_id": 1, "bos_token_id": 0, "hidden_act": "silu"},
    "qwen3_moe": {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
        "num_attention_heads": 32, "num_key_value_heads": 4, "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
        "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False, "decoder_sparse_step": 1,
        "moe_intermediate_size": 768, "num_experts_per_tok": 8, "num_experts": 128, "norm_topk_prob": False,
        "mlp_only_layers": None, "eos_token_id": None, "bos_token_id": None, "hidden_act": "silu", "mlp_bias": False},
}

_ALIASES = {"deepseek_v2": {"num_experts": "n_routed_experts"},
            "deepseek_v3": {"num_local_experts": "n_routed_experts"},
            "qwen3_moe": {"num_local_experts": "num_experts"}}


@dataclass
class RopeConfig:
    dim: int                       # rotated dims per head (qk_rope_head_dim for MLA, head_dim for GQA)
    theta: float = 10000.0
    kind: str = "default"          # "default" | "yarn"
    interleaved: bool = False      # pairs (x0, x1), (x2, x3)... (DeepSeek) vs halves (x_i, x_{i+d/2}) (Qwen)
    factor: float = 1.0            # yarn
    original_max_position_embeddings: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True


@dataclass
class QuantConfig:
    """FP8 block-scaled weights (DeepSeek-V3): e4m3 weights, one fp32 scale per block x block tile."""
    method: str = "fp8"
    block: int = 128
    activation_scheme: str = "dynamic"     # activations quantised per token per 128 channels on the fly
    modules_to_not_convert: list[str] = field(default_factory=list)  # module-name substrings kept in float

    def converts(self, module_name: str) -> bool:
        return not any(p in module_name for p in self.modules_to_not_convert)

    @classmethod
    def from_dict(cls, q: dict) -> QuantConfig:
        method = q.get("quant_method")
        if method != "fp8":
            raise ValueError(f"quantization_config.quant_method: {method!r} is not supported (fp8 only)")
        fmt = q.get("fmt", "e4m3")
        if fmt != "e4m3":
            raise ValueError(f"quantization_config.fmt: {fmt!r} is not supported (e4m3 only)")
        block = q.get("weight_block_size")
        if block is None:
            raise ValueError("quantization_config.weight_block_size: missing (per-tensor FP8 is not supported; "
                             "DeepSeek-V3 uses [128, 128])")
        if list(block) != [128, 128]:
            raise ValueError(f"quantization_config.weight_block_size: {list(block)} is not supported; only "
                             "[128, 128] (DeepSeek-V3 / DeepGEMM block scaling)")
        scheme = q.get("activation_scheme", "dynamic")
        if scheme != "dynamic":
            raise ValueError(f"quantization_config.activation_scheme: {scheme!r} is not supported (dynamic only)")
        skip = q.get("modules_to_not_convert") or q.get("ignored_layers") or []
        return cls(block=128, activation_scheme=scheme, modules_to_not_convert=list(skip))

    def to_dict(self) -> dict:
        d = {"quant_method": self.method, "fmt": "e4m3", "activation_scheme": self.activation_scheme,
             "weight_block_size": [self.block, self.block]}
        if self.modules_to_not_convert:
            d["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return d


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int                 # dense MLP layers
    moe_intermediate_size: int
    num_experts: int                       # routed experts
    num_experts_per_tok: int
    moe_layers: list[bool]                 # per layer: MoE block (True) or dense MLP (False)
    rope: RopeConfig
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    eos_token_id: int | list[int] | None = None
    bos_token_id: int | None = None
    # routing (route_topk arguments)
    scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    renormalize: bool = False
    routed_scaling_factor: float = 1.0
    n_shared_experts: int = 0
    router_fp32: bool = False              # DeepSeek keeps gate.weight (and the V3 bias) in float32
    # MLA (deepseek)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # GQA (qwen3_moe)
    num_key_value_heads: int = 0
    head_dim: int = 0
    dtype: str | None = None               # checkpoint dtype as config.json states it ("bfloat16", ...)
    quant: QuantConfig | None = None       # FP8 block-scaled weights (quantization_config), else None
    raw: dict = field(default_factory=dict, repr=False)

    @property
    def is_mla(self) -> bool:
        return self.model_type in ("deepseek_v2", "deepseek_v3")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    def softmax_scale(self) -> float:
        """Attention logit scale; DeepSeek's YaRN multiplies it by mscale(factor, mscale_all_dim)^2."""
        scale = self.qk_head_dim ** -0.5
        r = self.rope
        if self.is_mla and r.kind != "default" and r.mscale_all_dim:
            m = yarn_mscale(r.factor, r.mscale_all_dim)
            scale = scale * m * m
        return scale

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        mt = d.get("model_type")
        if mt not in SUPPORTED:
            raise ValueError(f"model_type: {mt!r} is not supported (supported: {', '.join(SUPPORTED)})")
        orig, d = d, {**d}
        for alias, key in _ALIASES[mt].items():  # transformers' attribute_map: either name may be in config.json
            if alias in d and key not in d:
                d[key] = d[alias]
        c = {**_DEFAULTS[mt], **d}
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act: only 'silu' is supported, got {c['hidden_act']!r}")
        keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "moe_intermediate_size", "num_experts_per_tok", "max_position_embeddings", "rms_norm_eps")
        common = {k: c[k] for k in keys}
        common.update(model_type=mt, tie_word_embeddings=bool(c["tie_word_embeddings"]),
                      attention_bias=bool(c["attention_bias"]),
                      mlp_bias=mt == "deepseek_v2" and bool(c.get("mlp_bias")),  # only V2's MLPs read it
                      eos_token_id=c.get("eos_token_id"), bos_token_id=c.get("bos_token_id"),
                      dtype=c.get("dtype") or c.get("torch_dtype"), raw=copy.deepcopy(orig),
                      quant=QuantConfig.from_dict(c["quantization_config"]) if c.get("quantization_config") else None)
        L = c["num_hidden_layers"]
        if mt == "qwen3_moe":
            if c.get("use_sliding_window"):
                raise ValueError("use_sliding_window: sliding-window attention is not supported")
            only = c.get("mlp_only_layers") or []
            step = c["decoder_sparse_step"]
            E = c["num_experts"]
            moe = [(i not in only) and E > 0 and (i + 1) % step == 0 for i in range(L)]
            head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
            rope = _rope(c, head_dim, interleaved=False)
            cfg = cls(**common, num_experts=E, moe_layers=moe, rope=rope, renormalize=bool(c["norm_topk_prob"]),
                      num_key_value_heads=c["num_key_value_heads"], head_dim=head_dim)
        else:
            if (c.get("moe_layer_freq") or 1) != 1:  # transformers ignores it; refuse rather than build another model
                raise ValueError(f"moe_layer_freq: only 1 is supported, got {c['moe_layer_freq']}")
            want = "softmax" if mt == "deepseek_v2" else "sigmoid"
            if c.get("scoring_func", want) != want:
                raise ValueError(f"scoring_func: {mt} uses {want!r}, got {c['scoring_func']!r}")
            E = c["n_routed_experts"]
            moe = [i >= (c["first_k_dense_replace"] or 0) for i in range(L)]
            interleaved = True if mt == "deepseek_v2" else bool(c.get("rope_interleave", True))
            rope = _rope(c, c["qk_rope_head_dim"], interleaved=interleaved)
            routing = _deepseek_routing(mt, c)
            cfg = cls(**common, num_experts=E, moe_layers=moe, rope=rope, **routing,
                      n_shared_experts=c["n_shared_experts"] or 0, router_fp32=True,
                      q_lora_rank=c["q_lora_rank"], kv_lora_rank=c["kv_lora_rank"],
                      qk_nope_head_dim=c["qk_nope_head_dim"], qk_rope_head_dim=c["qk_rope_head_dim"],
                      v_head_dim=c["v_head_dim"], num_key_value_heads=c["num_attention_heads"])
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if any(self.moe_layers) and not self.num_experts_per_tok:
            raise ValueError("num_experts_per_tok: must be set for a model with MoE layers")
        if self.num_experts_per_tok and self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok: {self.num_experts_per_tok} > {self.num_experts} experts")
        if self.rope.dim % 2:
            raise ValueError(f"rope dim: must be even, got {self.rope.dim}")
        if not self.is_mla and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads: {self.num_key_value_heads} does not divide "
                             f"{self.num_attention_heads} heads")

    def to_dict(self) -> dict:
        """The config.json to write: the original dict (every field preserved) with model_type set."""
        d = copy.deepcopy(self.raw) if self.raw else {}
        d["model_type"] = self.model_type
        return d


def _deepseek_routing(mt: str, c: dict) -> dict:
    n_group, topk_group = c.get("n_group") or 1, c.get("topk_group") or 1
    if mt == "deepseek_v2":
        method = c.get("topk_method") or "greedy"
        if method == "greedy":
            n_group, topk_group = 1, 1
        elif method != "group_limited_greedy":
            raise ValueError(f"topk_method: {method!r} is not supported for deepseek_v2 "
                             "(greedy, group_limited_greedy)")
        return {"scoring": "softmax", "n_group": n_group, "topk_group": topk_group, "renormalize": False,
                "routed_scaling_factor": float(c["routed_scaling_factor"])}
    return {"scoring": "sigmoid", "n_group": n_group, "topk_group": topk_group,
            "renormalize": bool(c["norm_topk_prob"]), "routed_scaling_factor": float(c["routed_scaling_factor"])}


def _rope(c: dict, dim: int, interleaved: bool) -> RopeConfig:
    """rope_scaling (legacy) wins over rope_parameters, as in transformers' convert_rope_params_to_dict."""
    p = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
    kind = p.get("rope_type", p.get("type", "default"))
    theta = float(p.get("rope_theta", c.get("rope_theta", 10000.0)))
    if kind == "default":
        return RopeConfig(dim=dim, theta=theta, interleaved=interleaved)
    if kind != "yarn":
        raise ValueError(f"rope_scaling: rope type {kind!r} is not supported (default, yarn)")
    orig = c.get("original_max_position_embeddings") or p.get("original_max_position_embeddings") \
        or c["max_position_embeddings"]
    factor = p.get("factor")
    if factor is None:
        factor = c["max_position_embeddings"] / orig
    return RopeConfig(dim=dim, theta=theta, kind="yarn", interleaved=interleaved, factor=float(factor),
                      original_max_position_embeddings=int(orig), beta_fast=float(p.get("beta_fast") or 32),
                      beta_slow=float(p.get("beta_slow") or 1), mscale=float(p.get("mscale") or 0),
                      mscale_all_dim=float(p.get("mscale_all_dim") or 0), attention_factor=p.get("attention_factor"),
                      truncate=bool(p.get("truncate", True)))


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def load_config(path: str) -> ModelConfig:
    """Parse `<path>/config.json` (or a config.json path)."""
    f = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(f):
        raise FileNotFoundError(f"config.json: not found at {f}")
    with open(f) as fh:
        return ModelConfig.from_dict(json.load(fh))

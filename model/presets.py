"""Named configs (HF config.json dicts) for tests and benches.

- `v2-lite`: DeepSeek-V2-Lite's exact shapes (27 layers, hidden 2048, 16 heads, MLA kv_lora_rank 512 without
  q low-rank, 1 dense layer then 26 MoE layers of 64 routed experts top-6 + 2 shared, vocab 102400, YaRN x40 over
  4K): ~15.7B parameters, ~2.4B active per token. Random weights only (benches); never build it in CPU tests.
- `qwen3-30b-a3b`: Qwen3-30B-A3B's shapes (48 layers, 128 experts top-8, GQA 32/4): ~30.5B parameters.
- `tiny` (alias `tiny-v2`), `tiny-v3`, `tiny-qwen3`: a few layers and experts, for CPU tests of each family.
"""

from __future__ import annotations

import copy

V2_LITE = {
    "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"], "vocab_size": 102400, "hidden_size": 2048,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
    "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "kv_lora_rank": 512, "q_lora_rank": None, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
    "norm_topk_prob": False, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "hidden_act": "silu",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "tie_word_embeddings": False, "bos_token_id": 100000, "eos_token_id": 100001, "attention_bias": False,
    "dtype": "bfloat16",
}

# Qwen/Qwen3-30B-A3B's config.json (30.5B parameters, 3.3B active): for memory plans and benches, random weights only
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "max_position_embeddings": 40960, "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06, "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False,
    "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu", "dtype": "bfloat16",
}

TINY_V2 = {
    "model_type": "deepseek_v2", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
    "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
    "kv_lora_rank": 32, "q_lora_rank": None, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "routed_scaling_factor": 1.0,
    "max_position_embeddings": 256, "rope_theta": 10000, "rms_norm_eps": 1e-06, "tie_word_embeddings": False,
    "eos_token_id": 1, "bos_token_id": 0,
}

TINY_V3 = {
    "model_type": "deepseek_v3", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
    "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
    "kv_lora_rank": 32, "q_lora_rank": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
    "n_group": 4, "topk_group": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5, "max_position_embeddings": 256,
    "rope_theta": 10000, "rms_norm_eps": 1e-06, "rope_interleave": True, "tie_word_embeddings": False,
    "eos_token_id": 1, "bos_token_id": 0,
}

TINY_QWEN3 = {
    "model_type": "qwen3_moe", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
    "moe_intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [1], "max_position_embeddings": 256, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False, "eos_token_id": 1, "bos_token_id": 0,
}

PRESETS = {"v2-lite": V2_LITE, "qwen3-30b-a3b": QWEN3_30B_A3B,
           "tiny": TINY_V2, "tiny-v2": TINY_V2, "tiny-v3": TINY_V3, "tiny-qwen3": TINY_QWEN3}


def preset(name: str, **overrides):
    """-> ModelConfig of a named preset, with config.json fields overridden by keyword."""
    from .config import ModelConfig
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r} (known: {', '.join(PRESETS)})")
    return ModelConfig.from_dict({**copy.deepcopy(PRESETS[name]), **overrides})


def preset_dict(name: str, **overrides) -> dict:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown {name!r} (known: {', '.join(PRESETS)})")
    return {**copy.deepcopy(PRESETS[name]), **overrides}

"""Per-rank GPU memory plan of a GRPO run, computed from the config alone (nothing is allocated or run).

    python -m train.grpo --plan-memory --model v2-lite --world-size 8 --gpu-gib 79.6 [any trainer flags]

The trainer (train/grpo.py) holds, per rank of N under torchrun (FSDP2):
  - policy master weights, float32 shards: 4 P / N bytes (P parameters);
  - AdamW moments, float32 shards: 8 P / N;
  - gradients, float32 shards: 4 P / N, during the update only (freed before each rollout);
  - reference, compute-dtype shards: b P / N (0 on the GPU with ref_offload: pinned host memory instead);
  - rollout weights, a full copy in the compute dtype: b P, during the rollout only (the engine sleeps after it);
  - FSDP2 all-gathers: this unit and the prefetched next one in the compute dtype, plus one unit's unsharded
    float32 gradient before its reduce-scatter, during the update;
  - KV cache: engine_memory_fraction of what is free when the engine wakes (after the static state above, the
    profiling forward's activations, the decode CUDA graphs' pool and the sampler's temporaries), rollout only;
  - training activations of one micro batch (micro_batch rows of prompt + max_tokens tokens): per token, each
    layer's saved tensors (or only its input under activation checkpointing, plus one layer recomputed), the
    loss's hidden states and one layer's backward temporaries.
Outside torch's allocator the CUDA context, cuBLAS workspaces and NCCL buffers take ~1 GiB (one rank) or ~2 GiB.
`peak_mem_gib` in metrics.jsonl is torch.cuda.max_memory_allocated, comparable with the plan's "allocated" peak
(bench/device_check.sh runs a V2-Lite-shaped step and compares).
"""

from __future__ import annotations

import torch

from ._pkg import model_module
from .config import GRPOConfig

GiB = 2**30


def _nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def parameter_counts(mcfg) -> dict:
    """{"total", "largest_unit"}: parameters of the model and of its largest FSDP2 unit (train.grpo.shard: a decoder
    layer, the embeddings, or the root: final norm + LM head (+ the embeddings when tied)), counted on meta."""
    with torch.device("meta"):
        lm = model_module().MoEForCausalLM(mcfg)
    total = sum(p.numel() for p in lm.parameters())
    units = [sum(p.numel() for p in layer.parameters()) for layer in lm.model.layers]
    if not mcfg.tie_word_embeddings:
        units.append(lm.model.embed_tokens.weight.numel())
    return {"total": total, "largest_unit": max(units + [total - sum(units)])}


def layer_activation_bytes(c, moe: bool, b: int) -> int:
    """Bytes one decoder layer saves for backward per token with compute dtype size b (our model's forward:
    float32 internals of RMSNorm and rope, inputs of every projection, flash-attention q/k/v/out + log-sum-exp,
    the router's float32 logits, moe_experts' permuted input and gate/up and down outputs)."""
    H = c.hidden_size
    n = 2 * (4 + b) * H + b * H                                       # two RMSNorms, projections' input
    if c.is_mla:
        Hq, dq = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank:
            n += (4 + 2 * b) * c.q_lora_rank
        n += 4 * 2 * (Hq + 1) * c.qk_rope_head_dim                    # rope (q_pe, k_pe) in float32
        n += (4 + 2 * b) * c.kv_lora_rank                            # kv_a_layernorm, kv_b_proj input
        n += b * 4 * Hq * dq + 4 * Hq + b * Hq * c.v_head_dim        # q, k, v (padded), out; lse; o_proj input
    else:
        Hq, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        n += (4 + b) * (Hq + Hkv) * D + 4 * (Hq + Hkv) * D            # q/k norms, rope
        n += b * 4 * Hq * D + 4 * Hq + b * Hq * D
    if moe:
        K, inter = c.num_experts_per_tok, c.moe_intermediate_size
        n += 4 * H + 4 * c.num_experts + 16 * K                      # router input and logits (float32), ids
        n += b * (H + K * 2 * inter + K * H) + 16 * K                 # moe_experts
        n += 4 * b * inter * c.n_shared_experts                      # shared experts (gate, up, silu, down input)
    else:
        n += 4 * b * c.intermediate_size
    return n


def inference_activation_bytes(c, b: int) -> int:
    """Peak bytes per token of one engine forward (nothing kept between layers but the residual stream)."""
    H = c.hidden_size
    if c.is_mla:
        Hq = c.num_attention_heads
        attn = Hq * (c.qk_nope_head_dim + c.qk_rope_head_dim) + 2 * Hq * (c.kv_lora_rank + c.qk_rope_head_dim)
    else:
        attn = (2 * c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    moe = c.num_experts_per_tok * (2 * H + 3 * c.moe_intermediate_size) + 3 * c.moe_intermediate_size * max(
        c.n_shared_experts, 1)
    return b * (4 * H + max(attn, moe, 3 * c.intermediate_size)) + 4 * (H + c.num_experts)


def plan_dtype(cfg: GRPOConfig) -> torch.dtype:
    """The compute dtype of the planned (GPU) run: cfg.dtype, else bfloat16 (the CUDA default)."""
    return torch.float32 if cfg.dtype == "float32" else torch.bfloat16


def plan(cfg: GRPOConfig, mcfg, world: int, gpu_gib: float, prompt_tokens: int = 1024,
         outside_gib: float | None = None) -> dict:
    """-> {"rollout": {part: GiB}, "update": {part: GiB}, "peak_allocated", "fits", ...} per rank."""
    dtype = plan_dtype(cfg)
    b = _nbytes(dtype)
    counts = parameter_counts(mcfg)
    P, unit = counts["total"], counts["largest_unit"]
    outside = outside_gib if outside_gib is not None else (1.0 if world == 1 else 2.0)
    master, adam, grads = 4 * P / world, 8 * P / world, 4 * P / world
    ref = 0.0 if cfg.beta <= 0 or cfg.ref_offload else b * P / world
    rollout = b * P

    # engine (train.grpo.make_engine): profiling prefill of max_num_batched_tokens, graphs, sampler, KV cache
    max_seqs = max(cfg.engine_max_num_seqs, cfg.group_size)
    prof = min(max(8192, cfg.group_size * max(1, cfg.problems_per_step // world)), mcfg.max_position_embeddings - 1)
    act_engine = prof * inference_activation_bytes(mcfg, b) + b * 2 * unit  # + one unit gathered by the weight sync
    graphs = act_engine * min(1.0, max_seqs / prof)
    sampler = 8 * max_seqs * mcfg.vocab_size * 4
    off = cfg.rollout_offload  # master shards and AdamW moments wait in host memory while the engine is awake
    static = ref + rollout + (0.0 if off else master + adam)
    free = gpu_gib * GiB - outside * GiB - static
    kv = max(0.0, cfg.engine_memory_fraction * (free - act_engine - graphs - sampler))
    kv_token = _kv_bytes_per_token(mcfg, b)

    # update: one micro batch of micro_batch rows, prompt + max_tokens tokens each (the longest case)
    T = cfg.micro_batch * (prompt_tokens + cfg.max_tokens)
    per_layer = [layer_activation_bytes(mcfg, m, b) for m in mcfg.moe_layers]
    if cfg.activation_checkpointing is not False:  # None: on, as on every CUDA run
        saved = T * (len(per_layer) * b * mcfg.hidden_size + max(per_layer))
    else:
        saved = T * sum(per_layer)
    act_train = saved + T * (b * mcfg.hidden_size + max(per_layer))     # loss input, one layer's backward temps
    gathers = 2 * b * unit + 4 * unit

    r = {"policy master weights (fp32 shards)": 0.0 if off else master,
         "AdamW moments (fp32 shards)": 0.0 if off else adam,
         "reference (shards)": ref, "rollout weights (full copy)": rollout, "KV cache": kv,
         "engine activations + CUDA graphs + sampler": act_engine + graphs + sampler}
    sync = master + ref + rollout + b * 2 * unit  # with rollout_offload: copying into the rollout weights
    u = {"policy master weights (fp32 shards)": master, "AdamW moments (fp32 shards)": adam,
         "reference (shards)": ref, "gradients (fp32 shards)": grads, "FSDP2 all-gathers + unsharded grads": gathers,
         "training activations (one micro batch)": act_train}
    r_total, u_total = max(sum(r.values()), sync if off else 0.0), sum(u.values())
    peak = max(r_total, u_total)
    return {"model_type": mcfg.model_type, "params_b": P / 1e9, "world": world, "gpu_gib": gpu_gib,
            "compute_dtype": str(dtype).replace("torch.", ""), "outside_gib": outside,
            "rollout": {k: v / GiB for k, v in r.items()}, "update": {k: v / GiB for k, v in u.items()},
            "rollout_gib": r_total / GiB, "update_gib": u_total / GiB, "peak_allocated_gib": peak / GiB,
            "fits": peak / GiB + outside <= gpu_gib and kv > 0,
            "kv_tokens": int(kv // kv_token), "rollout_tokens": cfg.group_size * max(1, cfg.problems_per_step // world)
            * (prompt_tokens + cfg.max_tokens), "micro_batch_tokens": T,
            "host_reference_gib": (b * P / world / GiB) if cfg.ref_offload and cfg.beta > 0 else 0.0,
            "host_train_state_gib": (master + adam) / GiB if off else 0.0}


def _kv_bytes_per_token(c, b: int) -> int:
    per = c.kv_lora_rank + c.qk_rope_head_dim if c.is_mla else 2 * c.num_key_value_heads * c.head_dim
    return c.num_hidden_layers * per * b


def format_plan(p: dict, cfg: GRPOConfig) -> str:
    head = (f"Memory plan per rank: {p['model_type']} {p['params_b']:.2f} B parameters, {p['world']} rank(s) x "
            f"{p['gpu_gib']:.1f} GiB, {p['compute_dtype']} compute with float32 master weights "
            f"(micro_batch {cfg.micro_batch} x {p['micro_batch_tokens'] // max(cfg.micro_batch, 1)} tokens, "
            f"activation checkpointing {'off' if cfg.activation_checkpointing is False else 'on'}, "
            f"KV fraction {cfg.engine_memory_fraction})")
    lines = [head, f"{'':46s} {'rollout':>9s} {'update':>9s}   GiB"]
    keys = list(dict.fromkeys(list(p["rollout"]) + list(p["update"])))
    for k in keys:
        a, b = p["rollout"].get(k), p["update"].get(k)
        lines.append(f"  {k:44s} {'-' if a is None else f'{a:.2f}':>9s} {'-' if b is None else f'{b:.2f}':>9s}")
    lines.append(f"  {'total allocated (torch)':44s} {p['rollout_gib']:9.2f} {p['update_gib']:9.2f}")
    out = p["outside_gib"]
    lines.append(f"  {'CUDA context, NCCL, cuBLAS (outside torch)':44s} {out:9.2f} {out:9.2f}")
    lines.append(f"  peak {p['peak_allocated_gib']:.2f} GiB allocated + {p['outside_gib']:.1f} outside of "
                 f"{p['gpu_gib']:.1f} GiB: {'fits' if p['fits'] else 'DOES NOT FIT'}; KV cache holds "
                 f"{p['kv_tokens']:,} tokens, a rollout needs up to {p['rollout_tokens']:,}")
    if p["host_train_state_gib"]:
        lines.append(f"  rollout_offload: {p['host_train_state_gib']:.2f} GiB of policy shards + AdamW moments in "
                     "host memory while the engine is awake")
    if p["host_reference_gib"]:
        lines.append(f"  reference offloaded: {p['host_reference_gib']:.2f} GiB of pinned host memory per rank")
    return "\n".join(lines)

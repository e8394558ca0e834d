"""Memory and time plan of a model on N GPUs with our tensor / expert parallel layout (model/parallel.py):

    python -m model.plan --model CONFIG --tp 8 --ep [--context 131072] [--kv-dtype fp8] [--json]

CONFIG is a config.json (or a directory holding one) or a preset name (`v3`: DeepSeek-V3 671B, FP8). It prints,
per rank: weight bytes by part (FP8 where the config has quantization_config: 1 byte per weight + one fp32 scale per
128 x 128 block), the KV cache left at a memory-utilisation target and how many sequences of `--context` tokens fit,
and the expected decode step time for a few batch sizes — HBM bytes read (weights actually touched: the experts a
batch activates, expected under uniform routing; the latent cache of every sequence) over the measured HBM bandwidth,
MLA attention FLOPs over peak tensor throughput, and the collectives (all-reduce after attention, the MoE
all-to-all in both directions, the all-gather of the token slices) as volume over NVLink bandwidth plus a fixed
latency per collective. Both attention layouts are printed: heads split (tensor parallel, our implementation:
latent cache replicated on every rank) and data-parallel attention (weights replicated, each rank caches only its
sequences) — the comparison docs/deepseek_v3_8xh200.md draws its choice from. It is a model: bandwidth-bound
estimates, not measurements (no launch overheads beyond the per-collective latency, perfect overlap nowhere).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass

from .config import ModelConfig, load_config
from .parallel import STATIC_MAX_TOKENS

GIB = 2**30

V3 = {  # DeepSeek-V3 / R1 config.json (the fields that size the model)
    "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128,
    "n_shared_experts": 1, "n_routed_experts": 256, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
    "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8,
    "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True,
    "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": [128, 128]},
    "dtype": "bfloat16",
}


@dataclass
class Hardware:
    hbm_gib: float = 140.0        # H200: 141 GB (143771 MiB as nvidia-smi reports it)
    hbm_tbs: float = 4.3          # measured HBM bandwidth (DEVGUIDE), TB/s
    bf16_tflops: float = 790.0    # measured dense bf16 tensor throughput
    nvlink_gbs: float = 450.0     # NVLink 4 per GPU per direction, GB/s
    coll_latency_us: float = 15.0  # fixed cost of one NCCL collective on 8 GPUs at decode sizes
    utilisation: float = 0.9      # gpu_memory_fraction
    reserve_gib: float = 6.0      # activations of a prefill chunk, NCCL buffers, CUDA graphs, allocator slack


def _mb(n_blocks_n: int, n_blocks_k: int) -> int:
    return n_blocks_n * n_blocks_k * 4  # fp32 scale per 128 x 128 block


def linear_bytes(n: int, k: int, fp8: bool, elem: int = 2) -> int:
    """Bytes of an [n, k] weight: e4m3 + block scales, or `elem`-byte floats."""
    return n * k + _mb(math.ceil(n / 128), math.ceil(k / 128)) if fp8 else n * k * elem


def plan(cfg: ModelConfig, world: int, expert_parallel: bool, context: int, kv_dtype: str = "bf16",
         hw: Hardware | None = None, batches=(1, 8, 32, 64, 128, 256)) -> dict:
    hw = hw or Hardware()
    fp8 = cfg.quant is not None
    H, V, L, W = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, world
    nh, K, E = cfg.num_attention_heads, cfg.num_experts_per_tok, cfg.num_experts
    n_moe = sum(cfg.moe_layers)
    n_dense = L - n_moe
    # ---- weights (bytes), whole model, split into what TP divides and what stays replicated
    if cfg.is_mla:
        dq, dc, dr = cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        rep_attn = (linear_bytes(cfg.q_lora_rank, H, fp8) if cfg.q_lora_rank else 0) + linear_bytes(dc + dr, H, fp8)
        tp_attn = (linear_bytes(nh * dq, cfg.q_lora_rank or H, fp8) + linear_bytes(nh * (cfg.qk_nope_head_dim +
                   cfg.v_head_dim), dc, fp8) + linear_bytes(H, nh * cfg.v_head_dim, fp8))
        kv_per_token_layer = dc + dr  # latent values per token per layer (shared by all heads)
        attn_flops_token = lambda ctx, heads: 2 * heads * ctx * (dc + dr + dc)  # noqa: E731  scores + o_lat
    else:
        d, nkv = cfg.head_dim, cfg.num_key_value_heads
        rep_attn = 0
        tp_attn = linear_bytes(nh * d, H, fp8) + 2 * linear_bytes(nkv * d, H, fp8) + linear_bytes(H, nh * d, fp8)
        kv_per_token_layer = 2 * nkv * d
        attn_flops_token = lambda ctx, heads: 4 * heads * ctx * d  # noqa: E731
    dense_mlp = 3 * linear_bytes(cfg.intermediate_size, H, fp8)
    expert = 3 * linear_bytes(cfg.moe_intermediate_size, H, fp8)
    shared = 3 * linear_bytes(cfg.moe_intermediate_size * cfg.n_shared_experts, H, fp8) if cfg.n_shared_experts else 0
    router = E * H * 4
    embed = V * H * 2
    head = 0 if cfg.tie_word_embeddings else V * H * 2
    total = (L * (rep_attn + tp_attn) + n_dense * dense_mlp + n_moe * (E * expert + shared + router) + embed + head)
    # ---- per rank, heads-split attention (ours)
    shared_rank = shared if expert_parallel else shared / W  # EP: replicated, run on each rank's token slice
    per_rank = {
        "attention": L * (rep_attn + tp_attn / W),
        "dense_mlp": n_dense * dense_mlp / W,
        "routed_experts": n_moe * E * expert / W,
        "shared_experts": n_moe * shared_rank,
        "routers": n_moe * router,
        "embedding": embed,
        "lm_head": head / W,
    }
    weights_rank = sum(per_rank.values())
    per_rank_dp = dict(per_rank, attention=L * (rep_attn + tp_attn))  # DP attention: attention replicated
    weights_rank_dp = sum(per_rank_dp.values())
    kv_elem = 1 if kv_dtype == "fp8" else 2
    kv_tok = L * (kv_per_token_layer * kv_elem + (4 if kv_dtype == "fp8" else 0))  # + one fp32 scale per token
    if not cfg.is_mla:  # GQA: KV heads split across ranks
        kv_tok_rank = kv_tok / W
    else:
        kv_tok_rank = kv_tok  # the latent is shared by all heads: every rank caches every sequence
    free = hw.hbm_gib * GIB * hw.utilisation - hw.reserve_gib * GIB
    kv_gib_rank = (free - weights_rank) / GIB
    kv_gib_rank_dp = (free - weights_rank_dp) / GIB
    tokens_tp = max(0.0, kv_gib_rank * GIB / kv_tok_rank)  # cache slots, shared by all sequences (replicated)
    tokens_dp = max(0.0, kv_gib_rank_dp * GIB / kv_tok) * W  # each rank its own sequences
    # ---- decode step time per batch size (all sequences at `context`)
    bw, nv, lat = hw.hbm_tbs * 1e12, hw.nvlink_gbs * 1e9, hw.coll_latency_us * 1e-6
    flops = hw.bf16_tflops * 1e12
    act_elem = 1 if fp8 else 2
    rows = []
    for B in batches:
        e_local = E / W if expert_parallel else E
        touched = e_local * (1 - (1 - K / E) ** B)  # experts with >= 1 token on a rank (uniform routing)
        exp_frac = 1 / W if not expert_parallel else 1
        moe_read = n_moe * touched * expert * exp_frac
        common = n_dense * dense_mlp / W + n_moe * (shared_rank + router) + head / W + B * H * 2
        layouts = {}
        for name, attn_w, kv_seq_rank, heads, cap in (
                ("tp_attention", L * (rep_attn + tp_attn / W), B, nh / W, tokens_tp),
                ("dp_attention", L * (rep_attn + tp_attn), math.ceil(B / W), nh, tokens_dp)):  # busiest rank
            kv_read = kv_seq_rank * context * kv_tok
            hbm = attn_w + moe_read + common + kv_read
            t_hbm = hbm / bw
            t_attn_flops = L * kv_seq_rank * attn_flops_token(context, heads) / flops
            # collectives (model/parallel.py), ring all-reduce of [B, H] bf16 = 2 (W-1)/W B H 2 bytes:
            # heads split: an all-reduce after every attention; the MoE exchange is, with expert parallelism, the
            # fixed-shape one up to STATIC_MAX_TOKENS tokens (routing all-gathered, one all-reduce of the partial
            # outputs) and the all-to-all above (sizes, FP8 rows out, bf16 results back, all-gather of the slices);
            # without, one all-reduce. Data-parallel attention: the all-to-all of the rank's own tokens only.
            ar = 2 * (W - 1) / W * B * H * 2
            a2a = n_moe * (math.ceil(B / W) if name == "dp_attention" else B / W) * K * (W - 1) / W * H * (act_elem + 2)
            if name == "dp_attention":
                vol, n_coll = a2a, n_moe * 3 + 1  # sizes, pairs out, results back; the any-rank-busy flag
            elif not expert_parallel:
                vol, n_coll = (L + n_moe) * ar, L + n_moe + 1
            elif B <= STATIC_MAX_TOKENS:
                vol, n_coll = (L + n_moe) * ar + n_moe * 2 * B * K * 4, L + 3 * n_moe + 1
            else:
                vol, n_coll = L * ar + a2a + n_moe * (W - 1) / W * B * H * 2, L + 4 * n_moe + 1
            t_comm = vol / nv + n_coll * lat
            step = max(t_hbm, t_attn_flops) + t_comm
            layouts[name] = {"fits": B * context <= cap, "hbm_gb": hbm / 1e9, "kv_read_gb": kv_read / 1e9,
                             "t_hbm_ms": t_hbm * 1e3,
                             "t_attn_flops_ms": t_attn_flops * 1e3, "comm_mb": vol / 1e6, "t_comm_ms": t_comm * 1e3,
                             "step_ms": step * 1e3, "tokens_per_s": B / step}
        rows.append({"batch": B, **layouts})
    return {
        "model": cfg.model_type, "world": W, "expert_parallel": expert_parallel, "fp8_weights": fp8,
        "context": context, "kv_dtype": kv_dtype, "hardware": hw.__dict__,
        "weights_total_gib": total / GIB,
        "per_rank_gib": {k: v / GIB for k, v in per_rank.items()}, "weights_rank_gib": weights_rank / GIB,
        "weights_rank_gib_dp_attention": weights_rank_dp / GIB,
        "kv_bytes_per_token": kv_tok, "kv_gib_rank": kv_gib_rank, "kv_gib_rank_dp_attention": kv_gib_rank_dp,
        "kv_tokens_tp_attention": tokens_tp, "kv_tokens_dp_attention": tokens_dp,
        "seqs_at_context_tp_attention": tokens_tp / context, "seqs_at_context_dp_attention": tokens_dp / context,
        "decode": rows,
    }


def _load(model: str) -> ModelConfig:
    if model in ("v3", "deepseek-v3"):
        return ModelConfig.from_dict(dict(V3))
    if os.path.exists(model):
        return load_config(model)
    from .presets import preset

    return preset(model)


def render(p: dict) -> str:
    out = [f"{p['model']} on {p['world']} GPUs, heads split (tensor parallel), experts "
           f"{'split E/N (expert parallel)' if p['expert_parallel'] else 'split by channel'}, "
           f"weights {'FP8 e4m3 + 128x128 scales' if p['fp8_weights'] else 'bf16'}, KV cache {p['kv_dtype']}",
           f"  weights, whole model       {p['weights_total_gib']:8.1f} GiB",
           "  weights per rank:"]
    out += [f"    {k:<24} {v:8.2f} GiB" for k, v in p["per_rank_gib"].items()]
    hw = p["hardware"]
    out += [f"    {'total':<24} {p['weights_rank_gib']:8.2f} GiB   (data-parallel attention: "
            f"{p['weights_rank_gib_dp_attention']:.2f} GiB)",
            f"  KV cache: {p['kv_bytes_per_token'] / 1024:.1f} KiB per token (all layers); at "
            f"{hw['utilisation']:.0%} of {hw['hbm_gib']:.0f} GiB minus {hw['reserve_gib']:.0f} GiB reserve:",
            f"    heads split:   {p['kv_gib_rank']:6.1f} GiB per rank, latent replicated -> "
            f"{p['kv_tokens_tp_attention'] / 1e6:6.2f} M tokens = {p['seqs_at_context_tp_attention']:6.1f} sequences "
            f"of {p['context']}",
            f"    DP attention:  {p['kv_gib_rank_dp_attention']:6.1f} GiB per rank, own sequences   -> "
            f"{p['kv_tokens_dp_attention'] / 1e6:6.2f} M tokens = {p['seqs_at_context_dp_attention']:6.1f} "
            f"sequences of {p['context']}",
            f"  decode step at {p['context']} tokens of context (HBM {hw['hbm_tbs']} TB/s, {hw['bf16_tflops']:.0f} "
            f"TFLOP/s, NVLink {hw['nvlink_gbs']:.0f} GB/s, {hw['coll_latency_us']:.0f} us per collective):",
            "    batch | heads split: HBM GB  KV GB  hbm ms  attn ms  comm ms   step ms   tok/s | DP attention: "
            "HBM GB  KV GB  hbm ms  attn ms  comm ms   step ms   tok/s",
            "    (per rank; * = the batch's KV cache does not fit that layout)"]

    def cols(a):
        return (f"{a['hbm_gb']:6.1f} {a['kv_read_gb']:6.1f} {a['t_hbm_ms']:7.2f} {a['t_attn_flops_ms']:8.2f} "
                f"{a['t_comm_ms']:8.2f} {a['step_ms']:9.2f} {a['tokens_per_s']:7.0f}{' ' if a['fits'] else '*'}")

    for r in p["decode"]:
        out.append(f"    {r['batch']:5d} |      {cols(r['tp_attention'])}|        {cols(r['dp_attention'])}")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m model.plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="config.json, a directory with one, or a preset (v3, v2-lite)")
    ap.add_argument("--tp", type=int, default=8, help="tensor_parallel_size (GPUs)")
    ap.add_argument("--ep", action="store_true", help="enable_expert_parallel (experts split E/N)")
    ap.add_argument("--context", type=int, default=131072, help="tokens of context per sequence")
    ap.add_argument("--kv-dtype", choices=("bf16", "fp8"), default="bf16")
    ap.add_argument("--batch", type=int, nargs="*", default=[1, 8, 32, 64, 128, 256], help="decode batch sizes")
    for f, v in Hardware().__dict__.items():
        ap.add_argument("--" + f.replace("_", "-"), type=float, default=v)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    a = ap.parse_args(argv)
    from .parallel import check_parallel  # noqa: PLC0415

    cfg = _load(a.model)
    check_parallel(cfg, a.tp, a.ep)
    hw = Hardware(**{f: getattr(a, f) for f in Hardware().__dict__})
    p = plan(cfg, a.tp, a.ep, a.context, a.kv_dtype, hw, tuple(a.batch))
    print(json.dumps(p) if a.json else render(p))


if __name__ == "__main__":
    main()

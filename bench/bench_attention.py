"""Benchmark of the paged attention ops: achieved KV bandwidth of paged_decode (GQA 32 q / 8 kv heads, D 128)
and mla_decode (DeepSeek-V2-Lite 16 heads, V3 128 heads; Dc 512, Dr 64) against the measured copy bandwidth,
and against torch SDPA on a contiguous copy of the same KV; paged_prefill TFLOP/s at 8K tokens (causal) against
SDPA and the dense bf16 peak. On GPU the Triton tensor-core decode (DSMATH_DECODE_BACKEND=triton) is timed
beside the default CUDA kernel. Batch x context in {1 x 131072, 8 x 32768, 64 x 4096, 256 x 1024}, block size 64.

    python bench/bench_attention.py            # GPU: real shapes (H200 ceilings: ~4.3 TB/s copy, ~790 TFLOP/s)
    python bench/bench_attention.py --quick    # CPU: small shapes, C++ decode vs SDPA (math) on contiguous KV

Prints a table, then ONE JSON line. Timing (bench/_util.py): median of reps; on GPU, CUDA events around CUDA-graph
replays of 10 calls (a captured decode step's view: no Python or launch overhead); perf_counter on CPU.
GB/s counts the KV bytes a call must read (K and V of every cached token; MLA: each latent row once)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

import dsmath_kernels as dk
from dsmath_kernels.attention import _decode_backend, _prefill_backend
from dsmath_kernels.attention_triton import paged_decode_triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import H200_BF16_TFLOPS, time_fn  # noqa: E402

BLOCK = 64


def timeit(fn, device, reps: int) -> float:
    """Median seconds per call; on GPU the calls are replayed from a CUDA graph (what a graph-captured decode
    step sees: no Python or launch overhead)."""
    if device.type == "cuda":
        return time_fn(fn, device, reps=reps, warmup=2, inner=10, graph=True)
    return time_fn(fn, device, reps=reps, warmup=1)


def copy_bandwidth(device, nbytes: int, reps: int) -> float:
    """Bytes read + written per second by a device copy of nbytes."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    return 2 * nbytes / time_fn(lambda: dst.copy_(src), device, reps=reps)


def paged_cache(B: int, L: int, row_shape, dtype, device):
    """A full paged cache for B sequences of L tokens: blocks randomly permuted, block_tables [B, L / BLOCK]."""
    nblk = -(-L // BLOCK)
    cache = torch.randn(B * nblk, BLOCK, *row_shape, device=device).to(dtype)
    tables = torch.randperm(B * nblk, device=device).to(torch.int32).view(B, nblk)
    return cache, tables


def sdpa_decode(q, k, v, scale):
    """SDPA on contiguous KV with the G query heads of each kv head as its query rows (one launch, no KV
    repetition, flash-eligible): q [B, Hkv, G, D], k [B, Hkv, L, D], v [B, Hkv, L, Dv] -> [B, Hkv, G, Dv]."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def bench_gqa(B, L, Hq, Hkv, D, dtype, device, reps):
    kc, bt = paged_cache(B, L, (Hkv, D), dtype, device)
    vc = torch.randn_like(kc)
    q = torch.randn(B, Hq, D, device=device).to(dtype)
    sl = torch.full((B,), L, dtype=torch.int32, device=device)
    plan = dk.plan_decode(B, L, num_kv_heads=Hkv, num_q_heads=Hq, device=device)
    t = timeit(lambda: dk.paged_decode(q, kc, vc, bt, sl, D**-0.5, plan=plan), device, reps)
    t_tri = None
    if device.type == "cuda":
        t_tri = timeit(lambda: paged_decode_triton(q, kc, vc, bt, sl, D**-0.5, plan.num_splits, plan.chunk), device,
                       reps)
    # baseline: SDPA on a contiguous copy of the same KV
    k = kc[bt.long()].reshape(B, L, Hkv, D).transpose(1, 2).contiguous()
    v = vc[bt.long()].reshape(B, L, Hkv, D).transpose(1, 2).contiguous()
    t_ref = timeit(lambda: sdpa_decode(q.view(B, Hkv, Hq // Hkv, D), k, v, D**-0.5), device, reps)
    nbytes = 2 * B * L * Hkv * D * k.element_size()
    return t, t_tri, t_ref, nbytes, plan


def bench_mla(B, L, H, Dc, Dr, dtype, device, reps):
    kv, bt = paged_cache(B, L, (Dc + Dr,), dtype, device)
    q = torch.randn(B, H, Dc + Dr, device=device).to(dtype)
    sl = torch.full((B,), L, dtype=torch.int32, device=device)
    plan = dk.plan_decode(B, L, num_kv_heads=1, num_q_heads=H, device=device)
    scale = (Dc + Dr) ** -0.5
    t = timeit(lambda: dk.mla_decode(q, kv, bt, sl, scale, v_head_dim=Dc, plan=plan), device, reps)
    t_tri = None
    if device.type == "cuda":
        kv4 = kv.unsqueeze(2)
        t_tri = timeit(lambda: paged_decode_triton(q, kv4, kv4[..., :Dc], bt, sl, scale, plan.num_splits,
                                                   plan.chunk), device, reps)
    k = kv[bt.long()].reshape(B, 1, L, Dc + Dr)  # contiguous copy; one shared latent head (MQA)
    t_ref = timeit(lambda: sdpa_decode(q.unsqueeze(1), k, k[..., :Dc], scale), device, reps)
    nbytes = B * L * (Dc + Dr) * k.element_size()
    return t, t_tri, t_ref, nbytes, plan


def bench_prefill(L, Hq, Hkv, D, dtype, device, reps):
    kc, bt = paged_cache(1, L, (Hkv, D), dtype, device)
    vc = torch.randn_like(kc)
    q = torch.randn(L, Hq, D, device=device).to(dtype)
    cu = torch.tensor([0, L], dtype=torch.int32, device=device)
    sl = torch.tensor([L], dtype=torch.int32, device=device)
    t = timeit(lambda: dk.paged_prefill(q, kc, vc, bt, cu, sl, D**-0.5, True, max_seqlen_q=L), device, reps)
    k = kc[bt.long()].reshape(1, L, Hkv, D).transpose(1, 2).contiguous()
    v = vc[bt.long()].reshape(1, L, Hkv, D).transpose(1, 2).contiguous()
    qq = q.unsqueeze(0).transpose(1, 2)
    t_ref = timeit(lambda: F.scaled_dot_product_attention(qq, k, v, is_causal=True, enable_gqa=True), device, reps)
    flops = 4.0 * Hq * D * L * (L + 1) / 2  # QK^T and PV over the causal triangle
    return t, t_ref, flops


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small CPU shapes (CI smoke run)")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reps = args.reps or (20 if device.type == "cuda" else 3)
    if device.type == "cuda":
        shapes = [(1, 131072), (8, 32768), (64, 4096), (256, 1024)]
        gqa, mla_heads, mla_dims, pre = (32, 8, 128), (16, 128), (512, 64), (8192, 32, 8, 128)
        copy_bytes = 1 << 30
    else:
        shapes = [(1, 16384), (4, 2048)]
        gqa, mla_heads, mla_dims, pre = (8, 2, 64), (4,), (64, 16), (512, 4, 1, 64)
        copy_bytes = 1 << 26
    copy_bw = copy_bandwidth(device, copy_bytes, reps)
    rows = []
    for B, L in shapes:
        t, t_tri, t_ref, nbytes, plan = bench_gqa(B, L, *gqa, dtype, device, reps)
        rows.append(("paged_decode", f"{B}x{L} Hq{gqa[0]}/Hkv{gqa[1]} D{gqa[2]}", t, t_tri, t_ref, nbytes, plan))
        for H in mla_heads:
            t, t_tri, t_ref, nbytes, plan = bench_mla(B, L, H, *mla_dims, dtype, device, reps)
            rows.append(("mla_decode", f"{B}x{L} H{H} Dc{mla_dims[0]}+{mla_dims[1]}", t, t_tri, t_ref, nbytes,
                         plan))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    L, Hq, Hkv, D = pre
    t_p, t_pref, flops = bench_prefill(L, Hq, Hkv, D, dtype, device, reps)

    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {dtype}, block {BLOCK}, "
          f"decode backend {_decode_backend(device)}, prefill backend {_prefill_backend(device)}, "
          f"copy bandwidth {copy_bw / 1e9:.1f} GB/s")
    print(f"{'op':<14}{'shape':<34}{'splits':>7}{'ms':>10}{'GB/s':>10}{'% copy':>8}{'SDPA ms':>10}{'speed-up':>9}"
          f"{'triton ms':>11}{'% copy':>8}")
    results = []
    for op, shape, t, t_tri, t_ref, nbytes, plan in rows:
        bw = nbytes / t
        tri = f"{t_tri * 1e3:>11.3f}{100 * nbytes / t_tri / copy_bw:>7.1f}%" if t_tri else f"{'-':>11}{'-':>8}"
        print(f"{op:<14}{shape:<34}{plan.num_splits:>7}{t * 1e3:>10.3f}{bw / 1e9:>10.1f}{100 * bw / copy_bw:>7.1f}%"
              f"{t_ref * 1e3:>10.3f}{t_ref / t:>8.2f}x{tri}")
        results.append({"op": op, "shape": shape, "splits": plan.num_splits, "ms": round(t * 1e3, 4),
                         "GBps": round(bw / 1e9, 1), "frac_copy": round(bw / copy_bw, 3),
                         "sdpa_ms": round(t_ref * 1e3, 4), "speedup_vs_sdpa": round(t_ref / t, 2),
                         "triton_ms": round(t_tri * 1e3, 4) if t_tri else None,
                         "triton_frac_copy": round(nbytes / t_tri / copy_bw, 3) if t_tri else None})
    tf = flops / t_p / 1e12
    print(f"{'paged_prefill':<14}{f'1x{L} causal Hq{Hq}/Hkv{Hkv} D{D}':<34}{'':>7}{t_p * 1e3:>10.3f}"
          f"{tf:>9.1f}T{100 * tf / H200_BF16_TFLOPS:>7.1f}%{t_pref * 1e3:>10.3f}{t_pref / t_p:>8.2f}x"
          "   (TFLOP/s, % of bf16 peak)")
    results.append({"op": "paged_prefill", "shape": f"1x{L} causal Hq{Hq}/Hkv{Hkv} D{D}", "ms": round(t_p * 1e3, 4),
                    "TFLOPs": round(tf, 2), "frac_peak_bf16": round(tf / H200_BF16_TFLOPS, 4),
                    "sdpa_ms": round(t_pref * 1e3, 4), "speedup_vs_sdpa": round(t_pref / t_p, 2)})
    print(json.dumps({"bench": "attention", "device": device.type, "dtype": str(dtype).replace("torch.", ""),
                      "block_size": BLOCK, "copy_GBps": round(copy_bw / 1e9, 1), "results": results}))


if __name__ == "__main__":
    main()

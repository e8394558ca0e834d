"""FP8 block-scaled GEMM bench (issue 17): dsmath `fp8_gemm` (W8A8: per-token activation quantisation + the Triton
kernel with 128 x 128 weight scales, wgmma FP8 on sm_90) and the weight-only path (`activation="native"`), against
torch's bf16 matmul of the same shape (cuBLAS; the weight held in bf16: twice the bytes), at DeepSeek-V3 shapes
under 8-way tensor parallelism; and the FP8 routed-expert layer `moe_experts_fp8` against the bf16 `moe_experts`
at V3's MoE shape (E 256, top-8, H 7168, I 2048). Decode rows (M <= 64) are bound by reading the weights:
GB/s of weight bytes is reported next to TFLOP/s; the fraction columns use the H200's measured ceilings
(bf16 790 TFLOP/s — FP8 peak is about twice that — and 4.3 TB/s).
Usage: python bench/bench_fp8.py [--quick] [--device cpu|cuda] [--tokens 1,64,4096]"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import H200_BF16_TFLOPS, H200_COPY_GBPS, device_name, print_json, print_table, time_fn  # noqa: E402

import dsmath_kernels as dk  # noqa: E402

DENSE = {  # name: (N, K) of one rank's weight under TP 8
    "q_a_proj": (1536, 7168), "q_b_proj/8": (3072, 1536), "o_proj/8": (7168, 2048), "mlp_down/8": (7168, 2304)}
MOE = {"v3": dict(E=256, K=8, H=7168, I=2048), "tiny": dict(E=16, K=4, H=256, I=128)}


def dense_rows(tokens, device, reps):
    rows = []
    for name, (N, K) in DENSE.items():
        w32 = torch.randn(N, K, device=device) / K**0.5
        wq, ws = dk.quantize_fp8_blocks(w32)
        wb = w32.to(torch.bfloat16)
        del w32
        for M in tokens:
            x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
            t_bf16 = time_fn(lambda: F.linear(x, wb), device, reps=reps, graph=device.type == "cuda")
            t_w8a8 = time_fn(lambda: dk.fp8_linear(x, wq, ws, activation="fp8"), device, reps=reps,
                             graph=device.type == "cuda") if _w8a8_ok(device) else None
            t_w8 = time_fn(lambda: dk.fp8_linear(x, wq, ws, activation="native"), device, reps=reps,
                           graph=device.type == "cuda")
            flops = 2 * M * N * K
            best = min(t for t in (t_w8a8, t_w8) if t is not None)
            rows.append({"op": f"dense {name}", "M": M, "N": N, "K": K, "bf16_us": t_bf16 * 1e6,
                         "w8a8_us": None if t_w8a8 is None else t_w8a8 * 1e6, "w8a16_us": t_w8 * 1e6,
                         "tflops": flops / best / 1e12, "frac_bf16_peak": flops / best / 1e12 / H200_BF16_TFLOPS,
                         "weight_gbps": N * K / best / 1e9, "frac_hbm": N * K / best / 1e9 / H200_COPY_GBPS,
                         "speedup_vs_bf16": t_bf16 / best})
    return rows


def _w8a8_ok(device) -> bool:
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def moe_rows(shape, tokens, device, reps):
    s = MOE[shape]
    E, K, H, Im = s["E"], s["K"], s["H"], s["I"]
    rows = []
    gate, gs = dk.quantize_fp8_blocks(torch.randn(E, Im, H, device=device) / H**0.5)
    up, us = dk.quantize_fp8_blocks(torch.randn(E, Im, H, device=device) / H**0.5)
    w13, s13 = torch.cat([gate, up], 1), torch.cat([gs, us], 1)
    del gate, up
    w2, s2 = dk.quantize_fp8_blocks(torch.randn(E, H, Im, device=device) / Im**0.5)
    b13 = dk.dequantize_fp8_blocks(w13, s13).to(torch.bfloat16) if Im % 128 == 0 else None  # gate|up blocks align
    b2 = dk.dequantize_fp8_blocks(w2, s2).to(torch.bfloat16)
    for T in tokens:
        x = torch.randn(T, H, device=device, dtype=torch.bfloat16)
        ids = torch.stack([torch.randperm(E, device=device)[:K] for _ in range(T)]).int()
        weights = torch.rand(T, K, device=device)
        graph = device.type == "cuda" and T <= 256
        t_bf16 = time_fn(lambda: dk.moe_experts(x, b13, b2, weights, ids), device, reps=reps, graph=graph) \
            if b13 is not None else None
        t8 = time_fn(lambda: dk.moe_experts_fp8(x, w13, s13, w2, s2, weights, ids), device, reps=reps, graph=graph)
        hit = torch.unique(ids).numel()
        flops = 6 * T * K * H * Im
        rows.append({"op": f"moe {shape}", "M": T, "N": 2 * Im, "K": H, "bf16_us": t_bf16 and t_bf16 * 1e6,
                     "w8a8_us": t8 * 1e6, "w8a16_us": None, "tflops": flops / t8 / 1e12,
                     "frac_bf16_peak": flops / t8 / 1e12 / H200_BF16_TFLOPS,
                     "weight_gbps": hit * 3 * H * Im / t8 / 1e9,
                     "frac_hbm": hit * 3 * H * Im / t8 / 1e9 / H200_COPY_GBPS,
                     "speedup_vs_bf16": t_bf16 / t8 if t_bf16 else None})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", default="1,64,4096")
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU)")
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()
    device = torch.device(a.device)
    tokens = [int(t) for t in a.tokens.split(",")]
    if a.quick or device.type == "cpu":
        global DENSE
        DENSE = {"small": (256, 512)}
        tokens = [t for t in tokens if t <= 64] or [1]
        rows = dense_rows(tokens, device, 3) + moe_rows("tiny", tokens, device, 3)
    else:
        rows = dense_rows(tokens, device, a.reps) + moe_rows("v3", tokens, device, a.reps)
    print(f"FP8 block-scaled GEMMs on {device_name(device)} (activation auto = "
          f"{dk.fp8.resolve_activation('auto', device)})")
    print_table(rows, [("op", "op", "s"), ("M", "M", "d"), ("N", "N", "d"), ("K", "K", "d"),
                       ("bf16_us", "bf16 us", ".1f"),
                       ("w8a8_us", "W8A8 us", ".1f"), ("w8a16_us", "W8A16 us", ".1f"), ("tflops", "TFLOP/s", ".1f"),
                       ("frac_bf16_peak", "of bf16 peak", ".2f"), ("weight_gbps", "weight GB/s", ".0f"),
                       ("frac_hbm", "of HBM", ".2f"), ("speedup_vs_bf16", "x bf16", ".2f")])
    print_json({"bench": "fp8", "device": device_name(device), "rows": rows})


if __name__ == "__main__":
    main()

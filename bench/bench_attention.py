"""Benchmark of the paged attention ops: achieved KV bandwidth of paged_decode (GQA 32 q / 8 kv heads, D 128)
and mla_decode (DeepSeek-V2-Lite 16 heads, V3 128 heads; Dc 512, Dr 64) against the measured copy bandwidth,
and against torch SDPA on a contiguous copy of the same KV; paged_prefill TFLOP/s at 8K tokens (causal) against
SDPA and the dense bf16 peak. Batch x context in {1 x 131072, 8 x 32768, 64 x 4096, 256 x 1024}, block size 64.
Every row also prints the bytes and FLOPs the op must move (KV read once, q and out; 2 x heads x tokens x
(D + Dv) FLOPs) and the H200 roofline time max(bytes / 4.3 TB/s, FLOPs / 790 TFLOP/s), so a GPU run reads off
the fraction of the roofline directly ("% roof" = predicted / measured). The "alt" column: GQA — the Triton
split-KV kernel (DSMATH_DECODE_BACKEND=triton); MLA — the previous default, the CUDA-core kernel.

Case rollout-prefix: 16 GRPO samples sharing a 4,096-token prompt plus 256 tokens each (V2-Lite MLA shapes,
16 heads) — shared-prefix (cascade) decode against plain paged decode on the same cache, and against the
per-token C++ kernel plain decode used before (CPU) / the CUDA-core kernel (GPU).

    python bench/bench_attention.py            # GPU: real shapes (H200 ceilings: ~4.3 TB/s copy, ~790 TFLOP/s)
    python bench/bench_attention.py --quick    # CPU: small shapes, C++ decode vs SDPA (math) on contiguous KV
    python bench/bench_attention.py --case rollout-prefix --device cpu --json PATH

Prints a table, then ONE JSON line. Timing (bench/_util.py): median of reps; on GPU, CUDA events around CUDA-graph
replays of 10 calls (a captured decode step's view: no Python or launch overhead); perf_counter on CPU.
GB/s counts the KV bytes a call must read (K and V of every cached token; MLA: each latent row once)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import dsmath_kernels as dk
from dsmath_kernels.attention import _decode_backend, _mla_backend, _prefill_backend
from dsmath_kernels.attention_triton import paged_decode_triton
from dsmath_kernels.reference.attention import fork_tables, paginate_like

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import H200_BF16_TFLOPS, H200_COPY_GBPS, time_fn  # noqa: E402

BLOCK = 64


def h200_seconds(nbytes: float, flops: float) -> float:
    """Roofline time on an H200: max(bytes / 4.3 TB/s, flops / 790 TFLOP/s) (bench/_util.py ceilings)."""
    return max(nbytes / (H200_COPY_GBPS * 1e9), flops / (H200_BF16_TFLOPS * 1e12))


def decode_cost(kv_tokens: int, kv_row_bytes: int, B: int, Hq: int, D: int, Dv: int, q_tokens: int | None = None,
                elem: int = 2) -> tuple[float, float]:
    """(bytes, flops) one decode call must move: every KV row read once, q in, out back; QK and PV products."""
    q_tokens = kv_tokens if q_tokens is None else q_tokens
    nbytes = kv_tokens * kv_row_bytes + B * Hq * (D + Dv) * elem
    return nbytes, 2.0 * Hq * q_tokens * (D + Dv)


class previous_mla_backend:
    """Context: plain mla_decode through the kernel it used before the tiled kernels (CUDA-core / per-token C++)."""

    def __init__(self, device):
        self.name = "cuda" if device.type == "cuda" else "cpu"

    def __enter__(self):
        self.old = os.environ.get("DSMATH_DECODE_BACKEND")
        os.environ["DSMATH_DECODE_BACKEND"] = self.name

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("DSMATH_DECODE_BACKEND", None)
        else:
            os.environ["DSMATH_DECODE_BACKEND"] = self.old


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
    cost = decode_cost(B * L, 2 * Hkv * D * k.element_size(), B, Hq, D, D, elem=k.element_size())
    return t, t_tri, t_ref, nbytes, plan, cost


def bench_mla(B, L, H, Dc, Dr, dtype, device, reps):
    kv, bt = paged_cache(B, L, (Dc + Dr,), dtype, device)
    q = torch.randn(B, H, Dc + Dr, device=device).to(dtype)
    sl = torch.full((B,), L, dtype=torch.int32, device=device)
    plan = dk.plan_decode(B, L, num_kv_heads=1, num_q_heads=H, device=device, tiled=True)
    scale = (Dc + Dr) ** -0.5
    t = timeit(lambda: dk.mla_decode(q, kv, bt, sl, scale, v_head_dim=Dc, plan=plan), device, reps)
    t_alt = None
    if device.type == "cuda":
        old = dk.plan_decode(B, L, num_kv_heads=1, num_q_heads=H, device=device)
        with previous_mla_backend(device):
            t_alt = timeit(lambda: dk.mla_decode(q, kv, bt, sl, scale, v_head_dim=Dc, plan=old), device, reps)
    k = kv[bt.long()].reshape(B, 1, L, Dc + Dr)  # contiguous copy; one shared latent head (MQA)
    t_ref = timeit(lambda: sdpa_decode(q.unsqueeze(1), k, k[..., :Dc], scale), device, reps)
    nbytes = B * L * (Dc + Dr) * k.element_size()
    cost = decode_cost(B * L, (Dc + Dr) * k.element_size(), B, H, Dc + Dr, Dc, elem=k.element_size())
    return t, t_alt, t_ref, nbytes, plan, cost


class env_var:
    """Context: set one environment variable (None: unset) for the duration."""

    def __init__(self, name: str, value: str | None):
        self.name, self.value = name, value

    def __enter__(self):
        self.old = os.environ.get(self.name)
        if self.value is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.value

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop(self.name, None)
        else:
            os.environ[self.name] = self.old


def interleaved_cpu(fns: dict, reps: int) -> dict:
    """CPU: the calls of fns timed in turn within every rep (so load changes hit all alike): name -> (median wall
    seconds, median CPU seconds of this process, all threads)."""
    for f in fns.values():
        f()
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            f()
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - w0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def bench_rollout_prefix(device, dtype, reps, n=16, prompt=4096, own=256, H=16, Dc=512, Dr=64) -> dict:
    """n samples forked from one prompt (shared full blocks, as the engine's block manager leaves them), each with
    `own` more tokens: cascade mla_decode vs plain mla_decode vs the previous plain kernel, on one cache. On CPU
    also plain decode on issue 16's row-block kernel (DSMATH_CPU_ATTN_KERNEL=rows), the calls interleaved, with
    CPU time beside wall time (the machine may be shared)."""
    from dsmath_kernels import cascade as cas

    g = torch.Generator().manual_seed(0)
    lens = [prompt + own] * n
    bt, nb = fork_tables(prompt, lens, BLOCK, generator=g)
    shared = torch.randn(prompt, Dc + Dr, generator=g)
    rows = [torch.cat([shared, torch.randn(own, Dc + Dr, generator=g)]).to(dtype) for _ in range(n)]
    kv = paginate_like(rows, bt, nb, BLOCK, fill=0.0).to(device)
    bt, sl = bt.to(device), torch.tensor(lens, dtype=torch.int32, device=device)
    q = torch.randn(n, H, Dc + Dr, generator=g).to(dtype).to(device)
    scale = (Dc + Dr) ** -0.5
    plan = dk.plan_decode(n, prompt + own, num_kv_heads=1, num_q_heads=H, device=device, tiled=True)
    sp = dk.shared_prefix(bt.cpu(), lens, BLOCK, num_q_heads=H, device=device)
    assert sp is not None and sp.num_groups == 1
    old_plan = dk.plan_decode(n, prompt + own, num_kv_heads=1, num_q_heads=H, device=device)

    def cascade():
        return dk.mla_decode(q, kv, bt, sl, scale, v_head_dim=Dc, plan=plan, cascade=sp)

    def plain():
        return dk.mla_decode(q, kv, bt, sl, scale, v_head_dim=Dc, plan=plan)

    def plain_rows():
        with env_var(cas.CPU_ENGINE_ENV, "rows"):
            return plain()

    def before():
        with previous_mla_backend(device):
            return dk.mla_decode(q, kv, bt, sl, scale, v_head_dim=Dc, plan=old_plan)

    cpu_ms = {}
    if device.type == "cpu":
        t = interleaved_cpu({"cascade": cascade, "plain": plain, "rows": plain_rows, "before": before}, reps)
        wall = {k: v[0] for k, v in t.items()}
        cpu_ms = {f"{k}_cpu_ms": round(v[1] * 1e3, 3) for k, v in t.items()}
    else:
        wall = {"cascade": timeit(cascade, device, reps), "plain": timeit(plain, device, reps),
                "before": timeit(before, device, reps)}
    elem = torch.empty((), dtype=dtype).element_size()
    row = (Dc + Dr) * elem
    plain_cost = decode_cost(n * (prompt + own), row, n, H, Dc + Dr, Dc, elem=elem)
    cascade_cost = decode_cost(prompt // BLOCK * BLOCK + n * (prompt + own - prompt // BLOCK * BLOCK), row, n, H,
                               Dc + Dr, Dc, q_tokens=n * (prompt + own), elem=elem)
    out = {"case": "rollout-prefix", "device": device.type, "dtype": str(dtype).replace("torch.", ""),
           "threads": torch.get_num_threads() if device.type == "cpu" else None,
           "shape": f"{n} samples x ({prompt} shared + {own}) H{H} Dc{Dc}+{Dr} block {BLOCK}",
           "cascade_ms": round(wall["cascade"] * 1e3, 3), "paged_ms": round(wall["plain"] * 1e3, 3),
           "paged_before_ms": round(wall["before"] * 1e3, 3), "speedup": round(wall["plain"] / wall["cascade"], 2),
           "speedup_vs_before": round(wall["before"] / wall["cascade"], 2),
           "paged_MB": round(plain_cost[0] / 1e6, 2), "cascade_MB": round(cascade_cost[0] / 1e6, 2),
           "GFLOP": round(plain_cost[1] / 1e9, 3),
           "h200_paged_us": round(h200_seconds(*plain_cost) * 1e6, 2),
           "h200_cascade_us": round(h200_seconds(*cascade_cost) * 1e6, 2)}
    if device.type == "cpu":
        out.update({"paged_rows_ms": round(wall["rows"] * 1e3, 3),
                    "speedup_vs_rows": round(wall["rows"] / wall["cascade"], 2), **cpu_ms,
                    "cpu_speedup": round(cpu_ms["plain_cpu_ms"] / cpu_ms["cascade_cpu_ms"], 2),
                    "cpu_speedup_vs_rows": round(cpu_ms["rows_cpu_ms"] / cpu_ms["cascade_cpu_ms"], 2),
                    "cascade_GFLOPs_cpu_time": round(plain_cost[1] / cpu_ms["cascade_cpu_ms"] / 1e6, 1),
                    "isa": cas.cpu_isa(), "loadavg_1min": round(os.getloadavg()[0], 2), "reps": reps})
    return out


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


def print_rollout(r: dict) -> None:
    print(f"rollout-prefix on {r['device']} ({r['dtype']}, threads {r['threads']}): {r['shape']}")
    cpu = r["device"] == "cpu"
    print(f"{'path':<44}{'ms':>10}{'CPU ms' if cpu else '':>10}{'MB read':>10}{'H200 pred us':>14}")
    rows = [("cascade (shared prefix once)", "cascade_ms", "cascade_cpu_ms", "cascade_MB", "h200_cascade_us"),
            ("plain paged decode", "paged_ms", "plain_cpu_ms", "paged_MB", "h200_paged_us")]
    if cpu:
        rows.append(("plain, issue-16 row-block kernel (rows)", "paged_rows_ms", "rows_cpu_ms", "paged_MB", None))
    rows.append(("plain, previous kernel", "paged_before_ms", "before_cpu_ms", "paged_MB", None))
    for name, ms, cms, mb, pred in rows:
        c = f"{r[cms]:>10.3f}" if cpu else f"{'':>10}"
        p = f"{r[pred]:>14.2f}" if pred else f"{'':>14}"
        print(f"{name:<44}{r[ms]:>10.3f}{c}{r[mb]:>10.1f}{p}")
    print(f"cascade speed-up: {r['speedup']:.2f}x over plain, {r['speedup_vs_before']:.2f}x over the previous kernel; "
          f"H200 roofline predicts {r['h200_paged_us'] / r['h200_cascade_us']:.2f}x")
    if cpu:
        print(f"CPU time: {r['cpu_speedup']:.2f}x over plain, {r['cpu_speedup_vs_rows']:.2f}x over the issue-16 "
              f"row-block plain path; cascade {r['cascade_GFLOPs_cpu_time']:.1f} GFLOP per CPU second ({r['isa']}, "
              f"load {r['loadavg_1min']})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small CPU shapes (CI smoke run)")
    ap.add_argument("--case", choices=["all", "rollout-prefix"], default="all")
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the JSON result here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.quick else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    reps = args.reps or (20 if device.type == "cuda" else 3)
    rollout = bench_rollout_prefix(device, dtype, reps)
    if args.case == "rollout-prefix":
        print_rollout(rollout)
        out = rollout
    else:
        out = bench_all(device, dtype, reps, rollout)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))


def bench_all(device, dtype, reps, rollout: dict) -> dict:
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
        r = bench_gqa(B, L, *gqa, dtype, device, reps)
        rows.append(("paged_decode", f"{B}x{L} Hq{gqa[0]}/Hkv{gqa[1]} D{gqa[2]}", *r))
        for H in mla_heads:
            r = bench_mla(B, L, H, *mla_dims, dtype, device, reps)
            rows.append(("mla_decode", f"{B}x{L} H{H} Dc{mla_dims[0]}+{mla_dims[1]}", *r))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    L, Hq, Hkv, D = pre
    t_p, t_pref, flops = bench_prefill(L, Hq, Hkv, D, dtype, device, reps)

    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {dtype}, block {BLOCK}, "
          f"decode backend {_decode_backend(device)} (MLA: {_mla_backend(device)}), prefill backend "
          f"{_prefill_backend(device)}, copy bandwidth {copy_bw / 1e9:.1f} GB/s")
    print(f"{'op':<14}{'shape':<34}{'splits':>7}{'ms':>10}{'GB/s':>9}{'% copy':>8}{'MB':>9}{'GFLOP':>8}"
          f"{'H200 ms':>9}{'% roof':>8}{'SDPA ms':>10}{'speed-up':>9}{'alt ms':>10}{'% copy':>8}")
    results = []
    for op, shape, t, t_alt, t_ref, nbytes, plan, (mb, fl) in rows:
        bw = nbytes / t
        pred = h200_seconds(mb, fl)
        alt = f"{t_alt * 1e3:>10.3f}{100 * nbytes / t_alt / copy_bw:>7.1f}%" if t_alt else f"{'-':>10}{'-':>8}"
        print(f"{op:<14}{shape:<34}{plan.num_splits:>7}{t * 1e3:>10.3f}{bw / 1e9:>9.1f}{100 * bw / copy_bw:>7.1f}%"
              f"{mb / 1e6:>9.1f}{fl / 1e9:>8.2f}{pred * 1e3:>9.4f}{100 * pred / t:>7.1f}%"
              f"{t_ref * 1e3:>10.3f}{t_ref / t:>8.2f}x{alt}")
        results.append({"op": op, "shape": shape, "splits": plan.num_splits, "ms": round(t * 1e3, 4),
                        "GBps": round(bw / 1e9, 1), "frac_copy": round(bw / copy_bw, 3),
                        "MB": round(mb / 1e6, 3), "GFLOP": round(fl / 1e9, 4), "h200_pred_ms": round(pred * 1e3, 5),
                        "frac_roofline": round(pred / t, 4),
                        "sdpa_ms": round(t_ref * 1e3, 4), "speedup_vs_sdpa": round(t_ref / t, 2),
                        "alt_ms": round(t_alt * 1e3, 4) if t_alt else None,
                        "alt_frac_copy": round(nbytes / t_alt / copy_bw, 3) if t_alt else None})
    tf = flops / t_p / 1e12
    pre_bytes = 2 * L * Hq * D * 2 + 2 * L * Hkv * D * 2
    pred = h200_seconds(pre_bytes, flops)
    print(f"{'paged_prefill':<14}{f'1x{L} causal Hq{Hq}/Hkv{Hkv} D{D}':<34}{'':>7}{t_p * 1e3:>10.3f}"
          f"{tf:>8.1f}T{100 * tf / H200_BF16_TFLOPS:>7.1f}%{pre_bytes / 1e6:>9.1f}{flops / 1e9:>8.2f}"
          f"{pred * 1e3:>9.4f}{100 * pred / t_p:>7.1f}%{t_pref * 1e3:>10.3f}{t_pref / t_p:>8.2f}x"
          "   (TFLOP/s, % of bf16 peak)")
    results.append({"op": "paged_prefill", "shape": f"1x{L} causal Hq{Hq}/Hkv{Hkv} D{D}", "ms": round(t_p * 1e3, 4),
                    "TFLOPs": round(tf, 2), "frac_peak_bf16": round(tf / H200_BF16_TFLOPS, 4),
                    "h200_pred_ms": round(pred * 1e3, 5), "frac_roofline": round(pred / t_p, 4),
                    "sdpa_ms": round(t_pref * 1e3, 4), "speedup_vs_sdpa": round(t_pref / t_p, 2)})
    print_rollout(rollout)
    return {"bench": "attention", "device": device.type, "dtype": str(dtype).replace("torch.", ""),
            "block_size": BLOCK, "copy_GBps": round(copy_bw / 1e9, 1), "results": results, "rollout_prefix": rollout}


if __name__ == "__main__":
    main()

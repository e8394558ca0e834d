"""MoE expert layer bench: dsmath `moe_experts` (permutation + Triton grouped GEMMs on a GPU, C++ permutation +
per-expert torch.matmul on CPU) against torch's `_grouped_mm` (argsort permutation, two grouped GEMMs, index_add
combine) where the torch has it, a per-expert matmul loop (transformers' DeepseekV3Experts style) and, as the
ceiling, a dense matmul of the same FLOPs. Shapes: DeepSeek-V2-Lite (E 64, top-6, H 2048, I 1408) and DeepSeek-V3
(E 256, top-8, H 7168, I 2048), T tokens, uniform and Zipf-skewed routing, forward (inference) and
forward+backward (training). FLOPs: forward 6*T*K*H*I, forward+backward 18*T*K*H*I. For T <= 256 the layer is
bound by reading the weights of the experts hit: GB/s of expert weights read is reported too.
On CUDA, forward rows at T <= 256 are CUDA-graph replays (decode runs captured); the loop baseline syncs, eager.
Usage: python bench/bench_moe.py [--quick] [--device cpu|cuda] [--shapes lite,v3] [--tokens 1,16,...]"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import H200_BF16_TFLOPS, H200_COPY_GBPS, device_name, print_json, print_table, time_fn  # noqa: E402

import dsmath_kernels as dk  # noqa: E402
from dsmath_kernels.moe import _gemm_backend, _permute_backend  # noqa: E402
from dsmath_kernels.reference import moe_experts_ref  # noqa: E402

SHAPES = {"lite": dict(E=64, K=6, H=2048, I=1408), "v3": dict(E=256, K=8, H=7168, I=2048),
          "tiny": dict(E=16, K=4, H=256, I=128)}


def make_inputs(s, T, routing, dtype, device):
    E, K, H, Im = s["E"], s["K"], s["H"], s["I"]
    x = torch.randn(T, H, device=device, dtype=dtype)
    wgu = (torch.randn(E, 2 * Im, H, device=device, dtype=dtype) / H**0.5)
    wd = (torch.randn(E, H, Im, device=device, dtype=dtype) / Im**0.5)
    p = torch.ones(E, device=device) if routing == "uniform" else 1.0 / torch.arange(1, E + 1, device=device) ** 1.2
    ids = torch.multinomial(p.expand(T, E), K, replacement=False).int() if T else torch.zeros(0, K, device=device)
    weights = torch.rand(T, K, device=device)
    return x, wgu, wd, weights, ids.int()


def loop_layer(x, wgu, wd, weights, ids):
    """Per-expert torch matmul loop (what transformers' DeepseekV3Experts does)."""
    out = torch.zeros_like(x, dtype=torch.float32)
    for e in torch.unique(ids).tolist():
        tok, slot = torch.where(ids == e)
        g, u = (x[tok] @ wgu[e].T).chunk(2, dim=-1)
        y = (F.silu(g) * u) @ wd[e].T
        out.index_add_(0, tok, y.float() * weights[tok, slot, None])
    return out.to(x.dtype)


def grouped_mm_layer(wgu_t, wd_t):
    """torch._grouped_mm baseline; weights pre-transposed to [E, K, N] outside the timing."""

    def layer(x, weights, ids):
        T, K = ids.shape
        flat = ids.reshape(-1).long()
        order = flat.argsort(stable=True)  # [T*K]
        counts = torch.zeros(wgu_t.shape[0], dtype=torch.long, device=ids.device).scatter_add_(
            0, flat, torch.ones_like(flat))  # bincount without its host sync (graph-capturable)
        offs = torch.cumsum(counts, 0).int()
        tok = order // K
        g, u = torch._grouped_mm(x[tok], wgu_t, offs=offs).chunk(2, dim=-1)
        y = torch._grouped_mm((F.silu(g) * u).to(x.dtype), wd_t, offs=offs)  # [T*K, H]
        w = weights.reshape(-1)[order, None]
        return torch.zeros_like(x, dtype=torch.float32).index_add_(0, tok, y.float() * w).to(x.dtype)

    layer.weights = (wgu_t, wd_t)
    return layer


def try_time(fn, device, **kw):
    """Median seconds, or None when the implementation is unavailable here; a failed graph capture retries eager."""
    try:
        return time_fn(fn, device, **kw)
    except Exception as e:  # noqa: BLE001  (baseline unavailable on this torch/device)
        print(f"  (failed{' in graph capture' if kw.get('graph') else ''}: {type(e).__name__}: "
              f"{str(e).splitlines()[0][:100] if str(e) else ''})", file=sys.stderr)
        if kw.get("graph"):
            torch.cuda.synchronize()
            return try_time(fn, device, **{**kw, "graph": False})
        return None


def train_step(layer, params, dout):
    out = layer(*params)
    torch.autograd.backward(out, dout)


def bench_case(name, s, T, routing, dtype, device, reps, backward):
    x, wgu, wd, weights, ids = make_inputs(s, T, routing, dtype, device)
    E, K, H, Im = s["E"], s["K"], s["H"], s["I"]
    flops = 6.0 * T * K * H * Im
    hit = int(torch.unique(ids).numel()) if T else 0
    wbytes = hit * 3 * H * Im * x.element_size()
    graph = device.type == "cuda" and T <= 256
    rows = []

    def row(impl, secs, mult=1.0, ceiling=None):
        r = dict(shape=name, T=T, routing=routing, phase="fwd+bwd" if mult > 1 else "fwd", impl=impl, ms=None)
        if secs:
            r.update(ms=secs * 1e3, tflops=mult * flops / secs / 1e12)
            if T <= 256 and mult == 1:
                r["gbps"] = wbytes / secs / 1e9
        rows.append(r)
        return r

    with torch.no_grad():
        ours = row("dsmath", try_time(lambda: dk.moe_experts(x, wgu, wd, weights, ids), device, reps=reps,
                                      graph=graph))
        if device.type == "cpu" and T * E * H * Im <= 2**26:
            row("reference", try_time(lambda: moe_experts_ref(x, wgu, wd, weights, ids), device, reps=reps))
        base = [row("loop", try_time(lambda: loop_layer(x, wgu, wd, weights, ids), device, reps=reps))]
        gmm = grouped_mm_layer(wgu.transpose(1, 2).contiguous(), wd.transpose(1, 2).contiguous())
        base.append(row("torch._grouped_mm", try_time(lambda: gmm(x, weights, ids), device, reps=reps, graph=graph)))
        a1, b1 = torch.randn(T * K, H, device=device, dtype=dtype), torch.randn(H, 2 * Im, device=device, dtype=dtype)
        a2, b2 = torch.randn(T * K, Im, device=device, dtype=dtype), torch.randn(Im, H, device=device, dtype=dtype)
        dense = row("dense mm (ceiling)", try_time(lambda: (a1 @ b1, a2 @ b2), device, reps=reps))
    _finish(ours, base, dense)
    if backward and T > 0:  # memory: weights, one transposed copy for _grouped_mm, one set of grads at a time
        base_b = bench_backward(x, wgu, wd, weights, ids, gmm, device, reps, row)
        _finish(base_b[0], base_b[1:], None)
    return rows


def bench_backward(x, wgu, wd, weights, ids, gmm_fwd, device, reps, row):
    """fwd+bwd rows: dsmath, the loop, torch._grouped_mm (reusing the forward's transposed weight copies)."""
    reps = max(3, reps // 3)
    dout = torch.randn_like(x)
    params = [t.requires_grad_(True) for t in (x, wgu, wd, weights)]

    def run(layer, ps):
        r = try_time(lambda: train_step(layer, ps, dout), device, reps=reps)
        for p in ps:
            p.grad = None
        return r

    out = [row("dsmath", run(lambda *p: dk.moe_experts(*p, ids), params), mult=3.0),
           row("loop", run(lambda *p: loop_layer(*p, ids), params), mult=3.0)]
    for p in params:
        p.requires_grad_(False)
    wgu_t, wd_t = (t.requires_grad_(True) for t in gmm_fwd.weights)
    pg = [x.requires_grad_(True), wgu_t, wd_t, weights.requires_grad_(True)]
    out.append(row("torch._grouped_mm", run(lambda xx, a, b, w: grouped_mm_layer(a, b)(xx, w, ids), pg), mult=3.0))
    for t in pg:
        t.requires_grad_(False)
    return out


def _finish(ours, base, dense):
    times = [b["ms"] for b in base if b["ms"]]
    if ours["ms"] and times:
        ours["speedup"] = min(times) / ours["ms"]
    if ours["ms"] and dense and dense["ms"]:
        ours["of_dense"] = ours["tflops"] / dense["tflops"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few reps (CPU smoke run)")
    ap.add_argument("--shapes", default=None, help="comma list of lite, v3, tiny")
    ap.add_argument("--tokens", default=None, help="comma list of T")
    ap.add_argument("--routing", default="uniform,zipf")
    ap.add_argument("--backward-max-t", type=int, default=8192, help="time fwd+bwd for T up to this")
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    dtype = getattr(torch, args.dtype or ("float32" if cpu else "bfloat16"))
    shapes = (args.shapes or ("tiny" if (args.quick or cpu) else "lite,v3")).split(",")
    tokens = [int(t) for t in (args.tokens or ("1,16,128" if (args.quick or cpu) else "1,16,128,1024,8192,32768"))
              .split(",")]
    reps = 3 if args.quick else (10 if cpu else 20)
    rows = []
    for name in shapes:
        for T in tokens:
            for routing in args.routing.split(","):
                rows += bench_case(name, SHAPES[name], T, routing, dtype, device, reps, T <= args.backward_max_t)
    print(f"# MoE experts on {device_name(device)}, {str(dtype).replace('torch.', '')}; backends: permute "
          f"{_permute_backend(device)}, gemm {_gemm_backend(device)}; ceilings H200 {H200_BF16_TFLOPS} TFLOP/s, "
          f"{H200_COPY_GBPS} GB/s")
    print_table(rows, [("shape", "shape", "s"), ("T", "T", "d"), ("routing", "routing", "s"), ("phase", "phase", "s"),
                       ("impl", "impl", "s"), ("ms", "ms", ".3f"), ("tflops", "TFLOP/s", ".2f"),
                       ("gbps", "weights GB/s", ".0f"), ("of_dense", "of dense", ".2f"),
                       ("speedup", "x best baseline", ".2f")])
    print_json({"bench": "moe_experts", "device": device_name(device), "dtype": str(dtype), "rows": rows})


if __name__ == "__main__":
    main()

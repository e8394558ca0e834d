"""route_topk bench: our kernel (CUDA on a GPU, C++ threads on CPU) vs the PyTorch reference chain
(softmax/sigmoid, grouping, sort/topk, gather) at DeepSeek-V3 (E 256, top-8, 8 groups keep 4, sigmoid + bias)
and DeepSeek-V2-Lite (E 64, top-6, softmax) shapes, T in {1, 64, 4096, 65536}.

On CUDA both sides are timed as CUDA-graph replays of 20 calls (the routing step runs inside a captured decode
step, so launch overhead is not what we measure). GB/s counts logits read + weights/ids written.
Usage: python bench/bench_route_topk.py [--quick] [--device cpu|cuda]"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import H200_COPY_GBPS, device_name, print_json, print_table, time_fn  # noqa: E402

import dsmath_kernels as dk  # noqa: E402
from dsmath_kernels.reference import route_topk_ref  # noqa: E402
from dsmath_kernels.routing import _backend  # noqa: E402

SHAPES = {
    "deepseek-v3": dict(E=256, K=8, scoring="sigmoid", n_group=8, topk_group=4, renormalize=True,
                        routed_scaling_factor=2.5),
    "deepseek-v2-lite": dict(E=64, K=6, scoring="softmax", n_group=1, topk_group=1, renormalize=False,
                             routed_scaling_factor=1.0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="fewer reps (CI / CPU smoke run)")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    reps = 5 if args.quick else 30
    rows = []
    for name, s in SHAPES.items():
        for T in (1, 64, 4096, 65536):
            logits = torch.randn(T, s["E"], device=device).to(dtype)
            bias = torch.randn(s["E"], device=device) * 0.1 if s["scoring"] == "sigmoid" else None
            kw = {k: v for k, v in s.items() if k not in ("E", "K")}
            ours = lambda: dk.route_topk(logits, s["K"], bias=bias, **kw)  # noqa: E731
            ref = lambda: route_topk_ref(logits, s["K"], bias=bias, **kw)  # noqa: E731
            graph = device.type == "cuda"
            inner = 20 if graph else (50 if T <= 64 else 1)
            t_ours = time_fn(ours, device, reps=reps, inner=inner, graph=graph)
            t_ref = time_fn(ref, device, reps=reps, inner=inner, graph=graph)
            nbytes = T * s["E"] * logits.element_size() + T * s["K"] * 8
            gbps = nbytes / t_ours / 1e9
            rows.append(dict(shape=name, T=T, backend=_backend(device, s["E"], s["K"], s["n_group"]),
                             us=t_ours * 1e6, ref_us=t_ref * 1e6, gbps=gbps,
                             frac=gbps / H200_COPY_GBPS if device.type == "cuda" else None,
                             speedup=t_ref / t_ours))
    print(f"route_topk on {device_name(device)}, logits {args.dtype}")
    print_table(rows, [("shape", "shape", "s"), ("T", "T", "d"), ("backend", "backend", "s"), ("us", "time us", ".2f"),
                       ("ref_us", "torch ref us", ".2f"), ("gbps", "GB/s", ".1f"),
                       ("frac", "of copy BW", ".1%"), ("speedup", "speed-up", ".1f")])
    print_json({"bench": "route_topk", "device": device_name(device), "dtype": args.dtype, "rows": rows})


if __name__ == "__main__":
    main()

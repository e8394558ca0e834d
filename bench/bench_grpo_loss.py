"""GRPO loss bench: forward + backward (d hidden and d LM-head weight) of `dsmath_kernels.grpo_loss` vs the naive
full-logits version (what TRL / a plain PyTorch trainer does: logits = hidden @ W.T in the input dtype, .float(),
log_softmax, gather, the GRPO surrogate + k3 KL, autograd), at B*T tokens, hidden H, vocab V, bf16.

Reported per variant: median time of fwd+bwd, model TFLOP/s (6·N·V·H: the three GEMMs any method must do; the
fused path recomputes the logits in the backward, a fourth GEMM it is not credited for), fraction of the H200 bf16
ceiling, and PEAK EXTRA MEMORY: the highest memory in use during one fwd+bwd minus what was in use just before
(inputs, old/ref log-probs, advantages already allocated; the grads d hidden / d weight are created inside the
step and count for every variant).
  CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before.
  CPU:  the process's resident-set high-water mark (VmHWM in /proc/self/status) after resetting it by writing "5"
        to /proc/self/clear_refs, minus VmRSS before. torch's CPU allocator does not cache; glibc is pinned (mallopt)
        to serve every block over 64 KiB by mmap and unmap it on free, so no freed memory lingers in RSS to hide a
        later allocation. The reading includes allocator / library scratch: what the machine actually provided.
Variants: naive; fused with backend "torch" (chunked PyTorch; the CPU path); on CUDA also backend "triton" in both
backward modes (DSMATH_GRPO_BWD=split: d logits tile -> [N, Vc] buffer -> cuBLAS; fused: atomics, fully on chip).
The issue's targets: peak extra memory <= 10% of naive and time <= naive on H100/H200; CPU "done when": <= 25%.

Usage: python bench/bench_grpo_loss.py [--quick] [--device cpu|cuda] [--tokens 8192,32768] [--hidden 2048]
       [--vocab 102400]. Defaults: CUDA 8192,32768 x 2048 x 102400; CPU (and --quick) 1024 x 256 x 32768
(the issue's 4:1 tokens-to-hidden ratio, at a size two shared CPU cores finish in about a minute)."""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import H200_BF16_TFLOPS, device_name, print_json, print_table, time_fn  # noqa: E402

from dsmath_kernels import grpo_loss  # noqa: E402
from dsmath_kernels.reference.grpo import aggregate_ref, per_token_loss_ref  # noqa: E402

T_SEQ = 128  # tokens per sequence; B = tokens // T_SEQ


def make_inputs(N: int, H: int, V: int, dtype: torch.dtype, device: torch.device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    B = max(1, N // T_SEQ)
    T = N // B
    hidden = torch.randn(B, T, H, device=device, dtype=dtype, generator=g).requires_grad_()
    weight = torch.randn(V, H, device=device, dtype=dtype, generator=g)
    weight.mul_(2.0 / H**0.5).requires_grad_()
    targets = torch.randint(0, V, (B, T), device=device, generator=g)
    mask = torch.rand(B, T, device=device, generator=g) < 0.9
    logp0 = -torch.rand(B, T, device=device, generator=g) * 5
    return {"hidden": hidden, "weight": weight, "targets": targets, "mask": mask,
            "advantages": torch.randn(B, device=device, generator=g),
            "old_logprobs": logp0 + 0.1 * torch.randn(B, T, device=device, generator=g),
            "ref_logprobs": logp0 + 0.1 * torch.randn(B, T, device=device, generator=g)}


def naive_loss(x: dict, temperature: float = 1.0) -> torch.Tensor:
    logits = (x["hidden"] @ x["weight"].T).float() / temperature  # [B, T, V] — the tensor the fused path avoids
    logp = torch.log_softmax(logits, dim=-1).gather(-1, x["targets"].unsqueeze(-1)).squeeze(-1)  # [B, T]
    loss_t, _, _ = per_token_loss_ref(logp, x["advantages"], x["old_logprobs"], x["ref_logprobs"], 0.04, 0.2, 0.2)
    return aggregate_ref(loss_t, x["mask"], "grpo")


def step_fn(x: dict, variant: str):
    def step():
        if variant == "naive":
            loss = naive_loss(x)
        else:
            loss, _ = grpo_loss(x["hidden"], x["weight"], x["targets"], x["mask"], x["advantages"],
                                old_logprobs=x["old_logprobs"], ref_logprobs=x["ref_logprobs"],
                                backend=variant.split("-")[0])
        loss.backward()
        x["hidden"].grad = None
        x["weight"].grad = None
    return step


def _proc_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(key + r":\s+(\d+)", f.read()).group(1))


def pin_glibc_malloc() -> None:
    """Fixed mmap threshold (64 KiB; setting it also stops glibc raising it after frees) and no heap retention."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 64 << 10)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 0)  # M_TRIM_THRESHOLD


def peak_extra_bytes(fn, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = _proc_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    fn()
    return (_proc_kb("VmHWM") - before) * 1024


def run_variant(x: dict, variant: str, device: torch.device, reps: int) -> dict:
    if variant.startswith("triton-"):
        os.environ["DSMATH_GRPO_BWD"] = variant.split("-")[1]
    fn = step_fn(x, variant)
    fn()  # warm-up: kernels compiled, libraries loaded, before any measurement
    peak = peak_extra_bytes(fn, device)
    t = time_fn(fn, device, reps=reps, warmup=1 if device.type == "cuda" else 0)
    return {"variant": variant, "s": t, "peak_extra": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small shape, few reps (CPU smoke run)")
    ap.add_argument("--dtype", default=None, help="default bfloat16 on CUDA; float32 on CPU, where bf16 GEMMs are "
                    "~100x slower (no bf16 units) and fp32 makes the naive baseline leaner (no .float() copy)")
    ap.add_argument("--tokens", default=None, help="comma-separated B*T values")
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    if not cuda:
        pin_glibc_malloc()
    small = args.quick or not cuda
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else ([1024] if small else [8192, 32768])
    H = args.hidden or (256 if small else 2048)
    V = args.vocab or (32768 if small else 102400)
    reps = 2 if small else 10
    variants = ["naive", "torch"] + (["triton-split", "triton-fused"] if cuda else [])
    rows = []
    for N in tokens:
        x = make_inputs(N, H, V, dtype, device)
        res = {v: run_variant(x, v, device, reps) for v in variants}
        base = res["naive"]
        for v, r in res.items():
            tflops = 6 * N * V * H / r["s"] / 1e12
            rows.append({"tokens": N, "H": H, "V": V, "variant": v, "ms": r["s"] * 1e3, "tflops": tflops,
                         "frac": tflops / H200_BF16_TFLOPS if cuda else None, "speedup": base["s"] / r["s"],
                         "peak_extra_mib": r["peak_extra"] / 2**20,
                         "mem_vs_naive": r["peak_extra"] / max(base["peak_extra"], 1)})
        del x
    print(f"grpo_loss fwd+bwd on {device_name(device)}, {str(dtype)[6:]}, T={T_SEQ} per sequence, old+ref log-probs, "
          f"beta 0.04, loss_type grpo")
    print_table(rows, [("tokens", "B*T", "d"), ("H", "H", "d"), ("V", "V", "d"), ("variant", "variant", "s"),
                       ("ms", "time ms", ".1f"), ("tflops", "TFLOP/s", ".2f"), ("frac", "of bf16 peak", ".1%"),
                       ("speedup", "vs naive", ".2f"), ("peak_extra_mib", "peak extra MiB", ".1f"),
                       ("mem_vs_naive", "mem / naive", ".1%")])
    fused = [r for r in rows if r["variant"] != "naive"]
    print_json({"bench": "grpo_loss", "device": device_name(device), "dtype": str(dtype)[6:], "rows": rows,
                "max_mem_vs_naive": max(r["mem_vs_naive"] for r in fused),
                "mem_target_met": all(r["mem_vs_naive"] <= (0.10 if cuda else 0.25) for r in fused)})


if __name__ == "__main__":
    main()

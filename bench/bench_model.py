"""Model bench: forward and forward+backward tokens/s and peak memory of the `v2-lite` preset (DeepSeek-V2-Lite
shapes, random bf16 weights) on one sequence of 4K and 16K tokens — our MoEForCausalLM (dsmath kernels) against
transformers' DeepseekV2ForCausalLM (SDPA attention, its default experts implementation: grouped_mm where the GPU
supports it) with the same config.

Forward = logits of every token under no_grad; forward+backward = logits.sum().backward() into bf16 gradients of
every parameter. TFLOP/s counts 2 * active parameters (6 of 64 routed experts, embedding excluded) per token plus
causal attention (2 * T^2/2 * heads * (192 + 128) per layer), x3 for forward+backward; "of peak" is against the
H200's ~790 dense bf16 TFLOP/s. A configuration that runs out of memory is reported as OOM.

Usage: python bench/bench_model.py [--tokens 4096,16384] [--no-baseline] [--ckpt] [--layers N]
       python bench/bench_model.py --quick            (tiny preset on CPU, fp32: a smoke run)"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _util import H200_BF16_TFLOPS, device_name, print_json, print_table, time_fn  # noqa: E402

from model import MoEForCausalLM  # noqa: E402
from model.presets import preset, preset_dict  # noqa: E402


def flops_per_token_fwd(cfg, T: int) -> float:
    """Matmul FLOPs per token of a forward pass over T tokens (active parameters + causal attention)."""
    with torch.device("meta"):
        m = MoEForCausalLM(cfg)
    total = sum(p.numel() for p in m.parameters())
    experts = sum(p.numel() for n, p in m.named_parameters() if ".experts." in n)
    active = total - experts * (cfg.num_experts - cfg.num_experts_per_tok) / cfg.num_experts
    active -= cfg.vocab_size * cfg.hidden_size  # the embedding is a lookup
    qk, v = (cfg.qk_head_dim, cfg.v_head_dim) if cfg.is_mla else (cfg.head_dim, cfg.head_dim)
    attn = cfg.num_hidden_layers * 2 * (T / 2) * cfg.num_attention_heads * (qk + v)
    return 2 * active + attn


def build(impl: str, cfg_dict: dict, dtype, device, ckpt: bool):
    torch.manual_seed(0)
    if impl == "ours":
        m = MoEForCausalLM.from_config(cfg_dict, dtype=dtype, device=device)
        m.gradient_checkpointing = ckpt
        return m
    import transformers

    cfg = transformers.AutoConfig.for_model(**cfg_dict)
    with torch.device(device):
        m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if ckpt:
        m.gradient_checkpointing_enable()
    return m


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def run_one(model, mode: str, ids, device, reps: int) -> tuple[float, float | None]:
    def fwd():
        with torch.no_grad():
            return model(ids).logits

    def fwd_bwd():
        model.zero_grad(set_to_none=False)
        model(ids).logits.sum().backward()

    fn = fwd if mode == "fwd" else fwd_bwd
    model.train(mode != "fwd")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t = time_fn(fn, device, reps=reps, warmup=1)
    return t, peak_gib(device)


def bench(args, device, dtype) -> list[dict]:
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    cfg_dict = preset_dict(args.preset, **overrides)
    cfg = preset(args.preset, **overrides)
    rows = []
    for impl in ["ours"] + ([] if args.no_baseline else ["transformers"]):
        model = build(impl, cfg_dict, dtype, device, args.ckpt)
        for T in args.tokens:
            ids = torch.randint(0, cfg.vocab_size, (1, T), device=device)
            for mode in ("fwd", "fwd+bwd"):
                row = {"impl": impl, "mode": mode, "tokens": T}
                try:
                    t, mem = run_one(model, mode, ids, device, args.reps)
                    tflops = flops_per_token_fwd(cfg, T) * T * (3 if mode != "fwd" else 1) / t / 1e12
                    row.update(ms=t * 1e3, tok_s=T / t, peak_gib=mem, tflops=tflops,
                               frac=tflops / H200_BF16_TFLOPS if device.type == "cuda" else None)
                except torch.cuda.OutOfMemoryError:
                    row.update(oom=True)
                except Exception as e:  # report and keep going: one broken configuration must not hide the rest
                    row.update(error=f"{type(e).__name__}: {e}"[:300])
                    print(f"{impl} {mode} {T}: {row['error']}", file=sys.stderr)
                model.zero_grad(set_to_none=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = {(r["mode"], r["tokens"]): r.get("ms") for r in rows if r["impl"] == "transformers"}
    for r in rows:
        b = base.get((r["mode"], r["tokens"]))
        r["speedup"] = b / r["ms"] if r["impl"] == "ours" and b and r.get("ms") else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="v2-lite")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", default="4096,16384", help="comma-separated sequence lengths (batch 1)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--layers", type=int, default=0, help="override num_hidden_layers (0: the preset's)")
    ap.add_argument("--ckpt", action="store_true", help="activation checkpointing in forward+backward (both impls)")
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers")
    ap.add_argument("--quick", action="store_true", help="tiny preset, CPU, fp32, short sequences")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.device, args.dtype, args.tokens, args.reps = "tiny", "cpu", "float32", "64,256", 2
    args.tokens = [int(t) for t in str(args.tokens).split(",")]
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    rows = bench(args, device, dtype)
    for r in rows:
        if r.get("oom") or r.get("error"):
            r["ms"] = r["tok_s"] = None
    layers = args.layers or preset(args.preset).num_hidden_layers
    print(f"{args.preset} ({layers} layers) on {device_name(device)}, {args.dtype}, batch 1, activation "
          f"checkpointing {'on' if args.ckpt else 'off'}")
    print_table(rows, [("impl", "impl", "s"), ("mode", "mode", "s"), ("tokens", "tokens", "d"),
                       ("ms", "ms", ".1f"), ("tok_s", "tokens/s", ".0f"), ("tflops", "TFLOP/s", ".1f"),
                       ("frac", "of peak", ".1%"), ("peak_gib", "peak GiB", ".1f"), ("speedup", "speed-up", ".2f")])
    for r in rows:
        if r.get("oom") or r.get("error"):
            print(f"{r['impl']} {r['mode']} {r['tokens']}: {'out of memory' if r.get('oom') else r['error']}")
    print_json({"bench": "model", "preset": args.preset, "layers": layers, "device": device_name(device),
                "dtype": args.dtype, "ckpt": args.ckpt, "rows": rows})


if __name__ == "__main__":
    main()

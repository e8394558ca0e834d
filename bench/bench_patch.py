"""dsmath_kernels.patch on transformers' own models: a training step (forward + backward with labels; patched: fused
LM-head loss, route_topk, moe_experts) and a generate step (greedy decode, per new token) of the patched and the
unpatched model, time and peak memory side by side. Baseline: transformers as it ships (its default experts
implementation, "grouped_mm" = torch._grouped_mm; `--baseline eager` for the per-expert loop).
Configs: the tiny test models (tiny-qwen3, tiny-v3, fp32) and one-layer models at real shapes: Qwen3-30B-A3B
(H 2048, 128 experts top-8, I 768, vocab 151936) and DeepSeek-V2-Lite (H 2048, 64 experts top-6 + 2 shared,
I 1408, vocab 102400), bf16, random weights.
One model per config, measured as transformers ships it, then patched in place (same weights) with the routers and
experts only ("dsmath moe") and with the fused LM-head loss too ("dsmath"), measured each time.
Time: wall clock (CUDA: events); on CPU also the process's CPU time, which other jobs on a shared machine disturb
far less, and the speed-up columns (x, over the first variant) use it there.
Peak memory: the step's peak beyond what was held before it, as bench_grpo_loss measures it (CUDA:
max_memory_allocated; CPU: VmHWM after resetting it, glibc pinned so freed buffers cannot hide later ones);
parameter gradients are allocated before the step on both sides, so the peak is activations, logits, temporaries.
Usage: python bench/bench_patch.py [--device cpu|cuda] [--configs tiny-qwen3,tiny-v3,qwen3-30b-a3b]
       [--train-tokens 256] [--batch 1] [--reps 3] [--baseline grouped_mm|eager]"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from _util import device_name, print_json, print_table, time_fn  # noqa: E402
from bench_grpo_loss import peak_extra_bytes, pin_glibc_malloc  # noqa: E402

QWEN3_30B_A3B = {
    "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False, "eos_token_id": 1, "bos_token_id": 0,
}
CONFIGS = {  # name -> (config dict or preset, dtype)
    "tiny-qwen3": ("tiny-qwen3", torch.float32),
    "tiny-v3": ("tiny-v3", torch.float32),
    "qwen3-30b-a3b": (QWEN3_30B_A3B, torch.bfloat16),
    "v2-lite": ("v2-lite", torch.bfloat16),  # one MoE layer of DeepSeek-V2-Lite
}


def build(name: str, device: torch.device, baseline: str):
    import transformers

    from model.presets import preset_dict

    spec, dtype = CONFIGS[name]
    d = dict(spec) if isinstance(spec, dict) else preset_dict(spec)
    if name == "v2-lite":
        d.update(num_hidden_layers=1, first_k_dense_replace=0)
    cfg = transformers.AutoConfig.for_model(**d)
    torch.manual_seed(0)
    with torch.device(device):
        m = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype, experts_implementation=baseline)
    if name.startswith("tiny"):
        from tests.tiny_models import randomize

        randomize(m)
    return m


VARIANTS = {  # name -> patch() options (None: transformers as it ships)
    "transformers": None,
    "dsmath moe": {"loss": False},  # route_topk + moe_experts, transformers' LM head and loss
    "dsmath": {},  # + the fused LM-head loss
}


def measure(fn, device: torch.device, reps: int) -> tuple[float, float | None, float]:
    """(median wall seconds, median CPU seconds of this process (CPU only: robust to other jobs on a shared
    machine), peak MB of the step beyond what was held before it); the peak run is the warm-up."""
    peak = max(0.0, peak_extra_bytes(fn, device) / 2**20)  # < 0 when the step frees more than it allocates
    if device.type == "cuda":
        return time_fn(fn, device, reps=reps, warmup=0), None, peak
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), peak


def run_config(name: str, args, device: torch.device) -> list[dict]:
    """Train and generate steps of transformers' model, then of the same model patched in place per variant."""
    import dsmath_kernels

    model = build(name, device, args.baseline)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(2, V, (args.gen_batch, args.prompt), generator=g).to(device)
    ids = torch.randint(2, V, (args.batch, args.train_tokens), generator=g).to(device)
    new = args.new_tokens

    def gen():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    def step():
        model.zero_grad(set_to_none=False)  # gradients stay allocated: the step's peak is the activations' and loss's
        model(ids, labels=ids).loss.backward()

    rows = []
    for variant in args.variants.split(","):
        dsmath_kernels.unpatch(model)
        opts = VARIANTS[variant]
        patched = 0 if opts is None else len(dsmath_kernels.patch(model, **opts).patched)
        row = {"config": name, "variant": variant, "patched": patched, "train_tokens": args.batch * args.train_tokens}
        model.eval()
        t, c, row["gen_mb"] = measure(gen, device, args.reps)
        row["gen_ms"], row["gen_cpu_ms"] = t / new * 1e3, (c / new * 1e3 if c is not None else None)
        model.train()
        step()  # gradients allocated before measuring
        row["train_s"], row["train_cpu_s"], row["train_mb"] = measure(step, device, args.reps)
        model.zero_grad(set_to_none=True)
        base = rows[0] if rows else row
        key_t, key_g = ("train_s", "gen_ms") if device.type == "cuda" else ("train_cpu_s", "gen_cpu_ms")
        row["train_x"], row["gen_x"] = base[key_t] / row[key_t], base[key_g] / row[key_g]
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--configs", default=None, help=f"comma list of {list(CONFIGS)}")
    p.add_argument("--train-tokens", type=int, default=None, help="tokens per sequence of the training step")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--baseline", default="grouped_mm", choices=["grouped_mm", "eager"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {list(VARIANTS)}; the first is "
                   "the baseline of the speed-up columns")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.train_tokens is None:
        args.train_tokens = 4096 if device.type == "cuda" else 256
    default = "tiny-qwen3,tiny-v3,qwen3-30b-a3b" + (",v2-lite" if device.type == "cuda" else "")
    pin_glibc_malloc()
    rows = []
    for name in (args.configs or default).split(","):
        rows += run_config(name, args, device)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"device: {device_name(device)}; baseline: transformers experts_implementation={args.baseline}; "
          f"train: B={args.batch} x T={args.train_tokens}, fwd+bwd with labels; generate: B={args.gen_batch}, "
          f"prompt {args.prompt}, {args.new_tokens} new tokens (ms per token)")
    print_table(rows, [("config", "config", "s"), ("variant", "variant", "s"), ("train_tokens", "tokens", "d"),
                       ("train_s", "train s", ".3f"), ("train_cpu_s", "CPU s", ".3f"), ("train_x", "x", ".2f"),
                       ("train_mb", "train peak MB", ".0f"), ("gen_ms", "gen ms/tok", ".1f"),
                       ("gen_cpu_ms", "CPU ms", ".1f"), ("gen_x", "x", ".2f"), ("gen_mb", "gen peak MB", ".0f")])
    print_json({"bench": "patch", "device": device_name(device), "baseline": args.baseline, "rows": rows})


if __name__ == "__main__":
    main()

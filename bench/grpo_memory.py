"""GRPO per-rank memory on a CPU: the proof that training state is sharded and nothing is held in full.

For each world size, `torchrun --nproc-per-node W -m train.grpo` runs one step (rollout, reference log-probs with
beta > 0, update, the end-of-run DCP checkpoint and the Hugging Face export) on a Qwen3-MoE-layout checkpoint of
the chosen size (fp32 safetensors on disk) and, as the runtime's own baseline, on a tiny checkpoint of the same
layout. Each worker reports its lifetime peak RSS (OUT/memory.json); the excess over the baseline, per rank, must
stay under 2x the model's fp32 size. The sharded design needs ~1.6x at world size 4: fp32 master shards, AdamW
moments and gradients (16 bytes/param / 4 = 1x), the bf16 rollout copy (0.5x, only while generating), the bf16
reference shard (0.125x). Compute is bf16 (FSDP2 mixed precision), as on GPUs.

    python bench/grpo_memory.py --size 250m --world 1,2,4      # the proof (bench/RESULTS.md), ~1 GB checkpoint
    python bench/grpo_memory.py --size ci --world 4 --one-launch   # CI-sized (tests/test_train_scale.py)

--one-launch runs the baseline and the model back to back in the same torchrun workers (one process start-up
instead of two; the high-water mark is reset in between), to fit the CI budget.

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _util import print_json, print_table  # noqa: E402

LAYOUT = {"model_type": "qwen3_moe", "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
          "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
          "max_position_embeddings": 512, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
          "tie_word_embeddings": False, "eos_token_id": 1, "bos_token_id": 0}
SIZES = {  # hidden, layers, experts, expert intermediate, vocab
    "250m": dict(hidden_size=1024, num_hidden_layers=7, num_experts=16, moe_intermediate_size=512,
                 intermediate_size=2048, vocab_size=24000),
    "ci": dict(hidden_size=384, num_hidden_layers=10, num_experts=16, moe_intermediate_size=384,
               intermediate_size=768, vocab_size=8000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_experts=4, moe_intermediate_size=32, intermediate_size=64,
                 vocab_size=128, num_attention_heads=4, head_dim=16),
}


def write_checkpoint(path: str, size: str, seed: int = 0) -> int:
    """A random fp32 checkpoint of the layout, written one tensor at a time (no model in memory). -> parameters."""
    from model.config import ModelConfig
    from model.loader import hf_config, hf_split, write_hf_checkpoint
    from model.modeling import MoEForCausalLM

    cfg = ModelConfig.from_dict({**LAYOUT, **SIZES[size]})
    with torch.device("meta"):
        meta = MoEForCausalLM(cfg)
    named = list(meta.named_parameters())
    plan = [(n, v.shape, torch.float32) for k, t in named for n, v in hf_split(k, t)]

    def tensors():
        g = torch.Generator().manual_seed(seed)
        for k, t in named:
            full = torch.ones(t.shape) if k.endswith("norm.weight") else torch.randn(t.shape, generator=g) * 0.02
            yield from hf_split(k, full)

    write_hf_checkpoint(path, hf_config(cfg, torch.float32), plan, tensors())
    return sum(t.numel() for _, t in named)


def trainer_flags(model_dir: str, out: str) -> list[str]:
    return ["--config", "toy", "--model", model_dir, "--tokenizer", "char", "--out", out, "--steps", "1",
            "--warmstart-steps", "0", "--problems-per-step", "4", "--group-size", "2", "--max-tokens", "4",
            "--beta", "0.04", "--dtype", "bfloat16", "--save-every", "0", "--threads", "1", "--micro-batch", "8",
            "--engine-cpu-kv-gib", "0.02"]


def run_world(model_dirs: list[str], world: int, outs: list[str], timeout: int) -> list[dict]:
    """torchrun the trainer on each model (one launch each, or all in one launch: --worker mode)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)]
    if len(model_dirs) == 1:
        cmd = torchrun + ["-m", "train.grpo", *trainer_flags(model_dirs[0], outs[0])]
    else:
        cmd = torchrun + [os.path.abspath(__file__), "--worker", ",".join(model_dirs), "--outs", ",".join(outs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "python"), ROOT, os.environ.get("PYTHONPATH", "")])}
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"torchrun world {world} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    res = []
    for out in outs:
        mem = json.load(open(os.path.join(out, "memory.json")))
        res.append({"run_peak": mem["run_peak_gib"], "load_peak": mem["load_peak_gib"], "start": mem["start_gib"],
                    "wall_s": time.time() - t0,
                    "metrics": [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]})
    return res


def worker(model_dirs: list[str], outs: list[str]) -> None:
    """Inside torchrun: train.grpo.run on each model in turn, the RSS high-water mark reset in between."""
    import gc

    import torch.distributed as dist

    from train.config import parse_config
    from train.grpo import run

    for d, out in zip(model_dirs, outs):
        run(parse_config(trainer_flags(d, out)))
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    dist.destroy_process_group()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="250m", choices=[s for s in SIZES if s != "tiny"])
    ap.add_argument("--world", default="1,2,4", help="comma-separated world sizes")
    ap.add_argument("--workdir", default=None, help="keep checkpoints and runs here (default: a temp dir, removed)")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--one-launch", action="store_true", help="baseline and model in the same worker processes")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--outs", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        sys.path.insert(0, ROOT)
        return worker(a.worker.split(","), a.outs.split(","))
    work = a.workdir or tempfile.mkdtemp(prefix="grpo_memory_")
    sys.path.insert(0, ROOT)
    try:
        dirs = {s: os.path.join(work, f"ckpt_{s}") for s in ("tiny", a.size)}
        params = {s: write_checkpoint(d, s) for s, d in dirs.items()}
        fp32_gib = params[a.size] * 4 / 2**30
        rows = []
        for w in [int(x) for x in a.world.split(",")]:
            outs = [os.path.join(work, f"run_{s}_w{w}") for s in ("tiny", a.size)]
            if a.one_launch:
                base, big = run_world([dirs["tiny"], dirs[a.size]], w, outs, a.timeout)
            else:
                base, big = (run_world([dirs[s]], w, [o], a.timeout)[0] for s, o in zip(("tiny", a.size), outs))
            # the runtime's baseline per rank: the tiny run's peak (and, in one launch, what the workers held when
            # the model's run started)
            floor = [max(t, s) for t, s in zip(base["run_peak"], big["start"])] if a.one_launch else base["run_peak"]
            excess = [b - t for b, t in zip(big["run_peak"], floor)]
            rows.append({"world": w, "fp32_gib": fp32_gib, "baseline_gib": max(floor),
                         "peaks_gib": " ".join(f"{x:.2f}" for x in big["run_peak"]),
                         "excess_gib": max(excess), "excess_x": max(excess) / fp32_gib,
                         "load_x": max(b - t for b, t in zip(big["load_peak"], floor)) / fp32_gib,
                         "ok": max(excess) <= 2 * fp32_gib, "wall_s": big["wall_s"], "per_rank": big["run_peak"],
                         "baseline_per_rank": floor})
        print(f"GRPO per-rank peak RSS, {a.size} Qwen3-MoE layout: {params[a.size] / 1e6:.0f} M parameters, "
              f"{fp32_gib:.3f} GiB fp32; baseline = the same run on a {params['tiny'] / 1e6:.2f} M checkpoint")
        print_table(rows, [("world", "world", "d"), ("baseline_gib", "baseline GiB", ".3f"),
                           ("peaks_gib", "peak per rank GiB", "s"), ("excess_gib", "max excess GiB", ".3f"),
                           ("excess_x", "excess / fp32 size", ".2f"), ("load_x", "load excess / fp32", ".2f"),
                           ("ok", "<= 2x", ""), ("wall_s", "wall s", ".0f")])
        result = {"bench": "grpo_memory", "size": a.size, "params": params[a.size], "fp32_gib": fp32_gib,
                  "rows": [{k: v for k, v in r.items() if k != "peaks_gib"} for r in rows]}
        print_json(result)
        return result
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
